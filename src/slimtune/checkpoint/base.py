"""The reader interface every checkpoint format implements, plus the shared read-into helper.

A reader is a lazy, read-only `Mapping[str, np.ndarray]`: listing names, shapes and dtypes costs
nothing, and each lookup reads that one tensor into a fresh array. Values keep the file's own
layout (TF kernels stay HWIO); bfloat16 values are widened to float32 by `__getitem__` (lossless)
while `to_torch` hands them over as torch.bfloat16 without a copy.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimtune.errors import CheckpointError

if TYPE_CHECKING:
    import torch

FORMATS = ("tf_v1", "tf_v2", "safetensors", "torch", "numpy")

# Bytes per element of each dtype name we report (strings have no fixed width).
ITEMSIZE = {
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
    "qint8": 1, "quint8": 1, "qint16": 2, "quint16": 2, "qint32": 4,
    "bool": 1, "complex64": 8, "complex128": 16,
}


@dataclass(frozen=True)
class TensorInfo:
    """What a listing needs to know about one stored tensor, without reading it."""

    shape: tuple[int, ...]
    dtype: str           # 'float32', 'bfloat16', 'string', ...
    nbytes: int          # bytes of the values (strings: as stored in the file)


def numel(shape: tuple[int, ...]) -> int:
    """Number of elements of a shape (Python ints: no overflow)."""
    total = 1
    for dim in shape:
        total *= dim
    return total


def widen_bfloat16(raw: np.ndarray) -> np.ndarray:
    """Turn bfloat16 bit patterns (uint16) into float32 values, exactly."""
    wide = raw.astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32)


# Arrays at least this big get their own anonymous mapping (see empty_array).
_OWN_MAPPING_BYTES = 1 << 20


def empty_array(shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """A fresh, writable, uninitialised array to read a tensor into.

    Big arrays get a private anonymous mapping, pre-faulted with MAP_POPULATE, instead of numpy's
    allocator: numpy asks for transparent huge pages on large arrays, and on a busy machine with
    `defrag=madvise` each huge-page fault can stall in memory compaction (measured 3-4x slower
    reads). The mapping is freed with the array.
    """
    dtype = np.dtype(dtype)
    count = numel(shape)
    nbytes = count * dtype.itemsize
    if nbytes < _OWN_MAPPING_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.empty(shape, dtype=dtype)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    buffer = mmap.mmap(-1, nbytes, flags=flags)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


def pread_into(fd: int, array: np.ndarray, offset: int) -> None:
    """Fill a contiguous array with file bytes at `offset`: no intermediate buffer."""
    target = memoryview(array.reshape(-1).view(np.uint8))
    done = 0
    total = len(target)
    while done < total:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [target[done:]], offset + done)
        else:  # pragma: no cover - non-Linux fallback
            chunk = os.pread(fd, total - done, offset + done)
            target[done:done + len(chunk)] = chunk
            got = len(chunk)
        if got <= 0:
            raise CheckpointError(f"file ended {total - done} bytes early while reading a tensor")
        done += got


class CheckpointReader(Mapping[str, np.ndarray]):
    """Lazy name -> array view of one checkpoint (any supported format)."""

    format: str = ""

    def __init__(self, path: str | os.PathLike, infos: dict[str, TensorInfo]) -> None:
        self.path = Path(path)
        self._infos = infos
        self._closed = False

    # -- subclass hook ----------------------------------------------------------------------
    def _read_raw(self, name: str) -> np.ndarray:
        """Read one tensor in its stored dtype (bfloat16 as uint16 bit patterns)."""
        raise NotImplementedError

    # -- Mapping ----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> np.ndarray:
        info = self._info(name)
        raw = self._read_checked(name)
        return widen_bfloat16(raw) if info.dtype == "bfloat16" else raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} {str(self.path)!r}: {len(self)} tensors>"

    # -- metadata ---------------------------------------------------------------------------
    def _info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in checkpoint {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Stored shape of a tensor."""
        return self._info(name).shape

    def dtype(self, name: str) -> str:
        """Stored dtype name ('float32', 'bfloat16', 'string', ...)."""
        return self._info(name).dtype

    def nbytes(self, name: str) -> int:
        """Bytes of a tensor's values as stored (bfloat16 counts 2 per element)."""
        return self._info(name).nbytes

    def infos(self) -> dict[str, TensorInfo]:
        """Name -> TensorInfo for every tensor, in file order."""
        return dict(self._infos)

    # -- torch ------------------------------------------------------------------------------
    def to_torch(self, name: str) -> "torch.Tensor":
        """Read one tensor as a torch tensor sharing the freshly read buffer (bfloat16 kept)."""
        import torch

        info = self._info(name)
        if info.dtype == "string":
            raise CheckpointError(f"{name} in {self.path} is a string tensor; torch has no string tensors")
        raw = self._read_checked(name)
        if not raw.flags.writeable or not raw.flags.c_contiguous:
            raw = np.array(raw, order="C")   # torch.from_numpy wants an owned, writable buffer
        tensor = torch.from_numpy(raw)
        if info.dtype == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        return tensor

    def load_all_torch(
        self, names: Iterable[str] | None = None, *, skip_strings: bool = True
    ) -> dict[str, "torch.Tensor"]:
        """Read many tensors (default: all) into torch tensors; string tensors are skipped."""
        selected = list(self._infos) if names is None else list(names)
        result = {}
        for name in selected:
            if skip_strings and self._info(name).dtype == "string":
                continue
            result[name] = self.to_torch(name)
        return result

    # -- lifecycle --------------------------------------------------------------------------
    def _read_checked(self, name: str) -> np.ndarray:
        if self._closed:
            raise CheckpointError(f"checkpoint {self.path} is closed")
        raw = self._read_raw(name)
        expected = self._infos[name].shape
        if raw.shape != expected:   # a reader bug or a lying file, never silently reshaped
            raise CheckpointError(f"{name} in {self.path}: read shape {raw.shape}, index says {expected}")
        return raw

    def close(self) -> None:
        """Release files and mappings; later reads raise CheckpointError."""
        self._closed = True

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
