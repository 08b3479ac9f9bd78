"""What the `ckpt inspect`, `ckpt to-npy` and `ckpt convert` commands do, as plain functions."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from slimtune.checkpoint.base import TensorInfo, numel
from slimtune.checkpoint.reader import read_checkpoint
from slimtune.checkpoint.torch_io import SAFETENSORS_DTYPES, write_safetensors
from slimtune.errors import CheckpointError

_SAFETENSORS_OK = set(SAFETENSORS_DTYPES.values())


def _human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def inspect_checkpoint(path: str | os.PathLike, tensor: str | None = None) -> str:
    """Describe a checkpoint: a name/shape/dtype/bytes table with totals, or one tensor's values."""
    with read_checkpoint(path) as reader:
        if tensor is not None:
            return _describe_tensor(reader, tensor)
        infos = reader.infos()
        rows = [(name, _shape_text(i.shape), i.dtype, str(i.nbytes)) for name, i in infos.items()]
        headers = ("name", "shape", "dtype", "bytes")
        widths = [max([len(h)] + [len(r[k]) for r in rows]) for k, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
        for row in rows:
            lines.append("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2]),
                                    row[3].rjust(widths[3])]).rstrip())
        total_bytes = sum(i.nbytes for i in infos.values())
        parameters = sum(numel(i.shape) for i in infos.values() if i.dtype != "string")
        lines.append(
            f"{len(infos)} tensors, {parameters:,} numeric values, {total_bytes:,} bytes ({_human(total_bytes)}); "
            f"format {reader.format}: {reader.path}"
        )
        return "\n".join(lines)


def _describe_tensor(reader, name: str) -> str:
    if name not in reader:
        close = [n for n in reader if name.split("/")[-1] in n][:5]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise CheckpointError(f"{name} is not in {reader.path}{hint}")
    value = reader[name]
    shape, dtype, nbytes = _shape_text(reader.shape(name)), reader.dtype(name), reader.nbytes(name)
    lines = [f"{name}: shape {shape}, dtype {dtype}, {nbytes:,} bytes"]
    if reader.dtype(name) != "string" and value.size and value.dtype.kind in "fiub":
        as_float = value.astype(np.float64)
        finite = np.isfinite(as_float)
        lines.append(
            f"min {as_float.min():.6g}  max {as_float.max():.6g}  mean {as_float.mean():.6g}  std {as_float.std():.6g}"
            + ("" if finite.all() else f"  non-finite {int((~finite).sum())}")
        )
    with np.printoptions(threshold=64, edgeitems=3, precision=6):
        lines.append(np.array2string(value, separator=", "))
    return "\n".join(lines)


def checkpoint_to_npy(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export every tensor as a name -> array dict: `.npy` (np.load(..., allow_pickle=True).item())
    or `.npz` (string tensors become fixed-width bytes so no pickle is needed to load them)."""
    out = Path(out)
    if out.suffix not in (".npy", ".npz"):
        raise CheckpointError(f"--out must end in .npy or .npz, not {out.name}")
    with read_checkpoint(path) as reader:
        arrays = {name: reader[name] for name in reader}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        for name, array in arrays.items():
            if array.dtype.kind == "O":
                arrays[name] = array.astype(np.bytes_) if array.size else np.zeros(array.shape, dtype="S1")
        with open(out, "wb") as handle:
            np.savez(handle, **arrays)
    else:
        # What np.save(out, dict) writes, but with pickle protocol 5: arrays are written straight
        # from their buffers instead of through a bytes copy each (np.save's protocol 4 would keep
        # all those copies alive until the end, doubling peak memory).
        holder = np.empty((), dtype=object)
        holder[()] = arrays
        with open(out, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, np.lib.format.header_data_from_array_1_0(holder))
            pickle.dump(holder, handle, protocol=5)
    return out


@dataclass
class ConversionReport:
    """What `convert_checkpoint` wrote and what it left out (nothing is dropped silently)."""

    output: Path
    written: dict[str, str] = field(default_factory=dict)        # source name -> written name
    dropped: list[str] = field(default_factory=list)             # rename returned None
    unsupported: dict[str, str] = field(default_factory=dict)    # name -> dtype safetensors lacks

    def __str__(self) -> str:
        text = f"{self.output} ({len(self.written)} tensors"
        if self.dropped:
            text += f"; {len(self.dropped)} dropped by the name map"
        if self.unsupported:
            text += f"; {len(self.unsupported)} not representable in safetensors: " + ", ".join(
                f"{name} ({dtype})" for name, dtype in list(self.unsupported.items())[:5])
            if len(self.unsupported) > 5:
                text += ", ..."
        return text + ")"


def convert_checkpoint(
    path: str | os.PathLike,
    out_safetensors: str | os.PathLike,
    rename: Callable[[str], str | None] | None = None,
) -> ConversionReport:
    """Write a checkpoint's tensors (values unchanged, optionally renamed) to one .safetensors file.

    `rename(name)` returns the new name, or None to drop the tensor. Tensors safetensors cannot hold
    (strings, complex128) are reported in `unsupported`. Streams one tensor at a time.
    """
    out = Path(out_safetensors)
    report = ConversionReport(out)
    with read_checkpoint(path) as reader:
        infos: dict[str, TensorInfo] = {}
        source_of: dict[str, str] = {}
        for name in reader:
            info = TensorInfo(reader.shape(name), reader.dtype(name), reader.nbytes(name))
            if info.dtype not in _SAFETENSORS_OK:
                report.unsupported[name] = info.dtype
                continue
            new_name = rename(name) if rename is not None else name
            if new_name is None:
                report.dropped.append(name)
                continue
            if new_name in source_of:
                raise CheckpointError(f"rename maps both {source_of[new_name]} and {name} to {new_name}")
            source_of[new_name] = name
            infos[new_name] = info
            report.written[name] = new_name

        def read_stored(new_name: str) -> np.ndarray:
            return reader._read_checked(source_of[new_name])   # stored form: bfloat16 stays 16-bit

        write_safetensors(out, list(infos), infos, read_stored,
                          metadata={"format": "pt", "source": str(reader.path), "source_format": reader.format})
    return report
