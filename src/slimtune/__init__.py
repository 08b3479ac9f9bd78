"""slimtune: fine-tune TF-Slim image classifiers on PyTorch.

    import slimtune
    model = slimtune.create_model("resnet_v1_50", num_classes=2, checkpoint_path=None)
    plan = slimtune.restore(model, "resnet_v1_50.ckpt", exclude_scopes=["resnet_v1_50/logits"])
"""

from typing import Any

__version__ = "0.1.0"

from .errors import SlimtuneError  # noqa: E402
from .nets.registry import create_model, get_model_spec, list_models, register_model  # noqa: E402

__all__ = ["SlimtuneError", "__version__", "create_model", "get_model_spec", "list_models", "read_checkpoint",
           "register_model", "restore"]


def __getattr__(name: str) -> Any:
    # The checkpoint machinery is imported on first use so `import slimtune` stays light.
    if name == "restore":
        from .checkpoint.restore import restore
        return restore
    if name == "read_checkpoint":
        from .checkpoint.reader import read_checkpoint
        return read_checkpoint
    raise AttributeError(f"module 'slimtune' has no attribute {name!r}")
