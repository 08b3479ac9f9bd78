"""slimtune: fine-tune TF-Slim image classifiers on PyTorch.

    import slimtune
    model = slimtune.create_model("resnet_v1_50", num_classes=2)
    plan = slimtune.restore(model, "resnet_v1_50.ckpt", exclude_scopes=["resnet_v1_50/logits"])

Imports flow one way, bottom to top (tests/test_layering.py checks it, lazy imports included):
    0  errors, utils, malloc
    1  config, runtime (device, DDP, seeding), compiled_inference (--compile for eval/predict),
       checkpoint (readers, restore, run checkpoints in a train_dir), data, preprocessing
    2  nets
    3  evaluate, train (which may evaluate during training), predict, features, probe
    4  demo, cli
A module imports its own tier and those below, never above, and the packages form no cycle.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Attributes are imported on first use: `import slimtune` stays light, and the torch-free parts
# (slimtune.testing, the checkpoint readers) also import where torch is not installed.
_LAZY = {
    "SlimtuneError": "slimtune.errors",
    "create_model": "slimtune.nets.registry",
    "get_model_spec": "slimtune.nets.registry",
    "list_models": "slimtune.nets.registry",
    "register_model": "slimtune.nets.registry",
    "restore": "slimtune.checkpoint.restore",
    "read_checkpoint": "slimtune.checkpoint.reader",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slimtune' has no attribute {name!r}")
