"""`--format tf-checkpoint`: a TF V2 checkpoint with slim's variable names and layouts.

The restore direction reversed: every trained tensor goes back under its slim variable name
(torch_to_slim: weight -> weights, a norm's weight/bias -> gamma/beta, running_* -> moving_*)
in TF's layout (OIHW -> HWIO, depthwise [C*M, 1, H, W] -> [H, W, C, M], dense [out, in] -> [in, out]),
so a net fine-tuned in slimtune loads into TF-Slim's graph with a plain `tf.train.Saver`
(`tools/tf_reference/check_exported_tf_checkpoint.py` proves that on the real TF-Slim). The
bundle is written by the project's own V2 writer (tensor-bundle index table + one data shard,
CRC32C per tensor) and verified by reading it back with slimtune's V2 reader into a fresh net.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint.names import torch_to_slim, torch_to_tf_array
from ..errors import ConfigError
from .prepare import ExportSource
from .verify import check_close, compare

_V2_SUFFIXES = (".index", ".data-00000-of-00001")


def _norm_paths(model: nn.Module) -> set[str]:
    """Module paths whose weight/bias are a norm's gamma/beta (anything holding running statistics)."""
    return {path for path, module in model.named_modules()
            if "running_mean" in dict(module.named_buffers(recurse=False))}


def slim_variables(model: nn.Module) -> dict[str, np.ndarray]:
    """The net's state as slim variables: {slim name: TF-layout float32 array}."""
    norms = _norm_paths(model)
    variables: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue  # a torch counter, no slim variable
        parent = name.rpartition(".")[0]
        slim_name = torch_to_slim(name, is_norm=parent in norms)
        array = tensor.detach().cpu().float().numpy()
        variables[slim_name] = np.ascontiguousarray(torch_to_tf_array(slim_name, array))
    return variables


def _files(prefix: Path) -> list[Path]:
    return [Path(str(prefix) + suffix) for suffix in _V2_SUFFIXES]


def export_tf_checkpoint(source: ExportSource, batch: torch.Tensor, eager: np.ndarray, out: Path,
                         quiet: bool = False):
    """Write `out`.index + `out`.data-00000-of-00001 (+ a `checkpoint` state file), verified by reading back."""
    from ..checkpoint.reader import read_checkpoint, write_tf_checkpoint
    from ..checkpoint.restore import restore
    from .run import ExportResult

    prefix = Path(str(out)).expanduser()
    for suffix in _V2_SUFFIXES:
        if prefix.name.endswith(suffix):
            prefix = prefix.with_name(prefix.name[: -len(suffix)])
    if prefix.is_dir():
        raise ConfigError(f"--output {prefix} is a directory: give a checkpoint prefix, e.g. {prefix / 'model.ckpt'}")
    temporary = prefix.with_name(f".{prefix.name}.partial-{os.getpid()}")
    variables = slim_variables(source.model)
    try:
        write_tf_checkpoint(temporary, variables, version=2)
        reader = read_checkpoint(str(temporary))
        try:
            if sorted(reader.keys()) != sorted(variables):
                raise ConfigError("tf-checkpoint: the written bundle does not list the variables written")
            for name, array in variables.items():
                if not np.array_equal(np.asarray(reader[name]), array):
                    raise ConfigError(f"tf-checkpoint: {name} reads back different values")
        finally:
            close = getattr(reader, "close", None)
            if close:
                close()
        fresh = source.spec.build(source.num_classes, image_size=source.image_size if source.spec.sized_by_input
                                  else None).eval()
        restore(fresh, str(temporary))
        with torch.no_grad():
            logits = fresh(batch).float().numpy()
        comparison = compare(eager, logits)
        line = check_close(comparison, "slimtune's TF V2 reader + restore")
        if not quiet:
            print(line, file=sys.stderr)
        for written, final in zip(_files(temporary), _files(prefix)):
            os.replace(written, final)
        state = prefix.parent / "checkpoint"
        state.write_text(f'model_checkpoint_path: "{prefix.name}"\nall_model_checkpoint_paths: "{prefix.name}"\n',
                         encoding="utf-8")
        if not quiet:
            print(f"wrote {prefix}.index and {prefix}.data-00000-of-00001 ({len(variables)} slim variables)",
                  file=sys.stderr)
        return ExportResult(prefix, "tf-checkpoint", comparison, [line], _files(prefix) + [state])
    finally:
        for path in _files(temporary):
            path.unlink(missing_ok=True)
