"""Checkpoint I/O without TensorFlow: TF V1/V2, safetensors, torch and numpy weight files.

    reader = read_checkpoint("vgg_16.ckpt")        # lazy Mapping[str, np.ndarray]
    reader.shape("vgg_16/fc8/weights"), reader.dtype(...), reader.to_torch(...)
    write_tf_checkpoint("out/model.ckpt", {"w": array}, version=2)
"""

from importlib import import_module
from typing import Any

from slimtune.checkpoint.base import CheckpointReader, TensorInfo
from slimtune.checkpoint.inspect import ConversionReport, checkpoint_to_npy, convert_checkpoint, inspect_checkpoint
from slimtune.checkpoint.reader import read_checkpoint, sniff_format, write_tf_checkpoint

# The restore engine needs torch; it is imported on first use so the readers stay torch-free.
_LAZY = {
    "restore": "restore", "plan_restore": "restore", "RestorePlan": "restore", "TensorFate": "restore",
    "NameMap": "rules", "auto_align": "alignment", "AmbiguousMappingError": "alignment",
    "slim_to_torch": "names", "torch_to_slim": "names", "tf_to_torch_array": "names", "torch_to_tf_array": "names",
    "parse_scopes": "scopes", "in_scope": "scopes", "select_params": "scopes",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"slimtune.checkpoint.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'slimtune.checkpoint' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "CheckpointReader",
    "ConversionReport",
    "TensorInfo",
    "checkpoint_to_npy",
    "convert_checkpoint",
    "inspect_checkpoint",
    "read_checkpoint",
    "sniff_format",
    "write_tf_checkpoint",
]
