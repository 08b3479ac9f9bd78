"""Non-TF weight files: safetensors, torch state_dicts (.pth/.pt/.bin) and numpy (.npy dict, .npz).

Untrusted files are parsed, never executed: safetensors is parsed by hand (a JSON header and raw
bytes), torch files go through `torch.load(weights_only=True)`, and a pickled `.npy` dict goes
through an unpickler that can only rebuild numpy arrays, dtypes, scalars and plain containers.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from slimtune.checkpoint.base import (
    ITEMSIZE,
    CheckpointReader,
    TensorInfo,
    empty_array,
    numel,
    pread_into,
    widen_bfloat16,
)
from slimtune.errors import CheckpointError

# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "C64": "complex64",
}
_SAFETENSORS_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}
_STORAGE = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2",
    "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1",
    "uint64": "<u8", "uint32": "<u4", "uint16": "<u2", "uint8": "u1", "bool": "?",
    "complex64": "<c8", "complex128": "<c16",
}
MAX_SAFETENSORS_HEADER = 100 << 20
MAX_DIM = 1 << 48


class SafetensorsReader(CheckpointReader):
    """Lazy reader for a .safetensors file (each tensor pread into a fresh array)."""

    format = "safetensors"

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self._fd = os.open(path, os.O_RDONLY)
        try:
            infos, self._offsets, self.metadata = self._parse_header(path)
        except BaseException:
            os.close(self._fd)
            self._fd = -1   # __del__ will call close() again: never close a reused descriptor
            raise
        super().__init__(path, infos)

    def _parse_header(self, path: Path) -> tuple[dict[str, TensorInfo], dict[str, int], dict[str, str]]:
        file_size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{path} is too short to be a safetensors file")
        header_size = struct.unpack("<Q", head)[0]
        if header_size > min(file_size - 8, MAX_SAFETENSORS_HEADER):
            raise CheckpointError(f"{path}: safetensors header claims {header_size} bytes, more than the file holds")
        try:
            header = json.loads(os.pread(self._fd, header_size, 8), object_pairs_hook=_no_duplicate_keys)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:   # ValueError: JSON and huge ints
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header is not a JSON object")
        data_start = 8 + header_size
        data_size = file_size - data_start
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{path}: safetensors __metadata__ must map names to strings")
        infos, offsets, spans = {}, {}, []
        for name, spec in header.items():
            try:
                code, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
                valid = all(type(d) is int and 0 <= d <= MAX_DIM for d in shape) \
                    and type(begin) is int and type(end) is int
            except (KeyError, TypeError, ValueError):
                valid = False
            if valid:
                product = 1
                for d in shape:
                    product *= max(d, 1)
                valid = len(shape) <= 32 and product <= MAX_DIM
            if not valid:
                raise CheckpointError(f"{path}: malformed safetensors entry for {name!r}")
            dtype = SAFETENSORS_DTYPES.get(code)
            if dtype is None:
                raise CheckpointError(f"{path}: {name!r} has safetensors dtype {code}, which cannot be read")
            if not 0 <= begin <= end <= data_size or end - begin != numel(shape) * ITEMSIZE[dtype]:
                raise CheckpointError(
                    f"{path}: {name!r} has data offsets [{begin}, {end}) that do not fit its shape or the file")
            infos[name] = TensorInfo(shape, dtype, end - begin)
            offsets[name] = data_start + begin
            spans.append((begin, end, name))
        # As the reference library: the tensors tile the data region exactly, in offset order.
        covered = 0
        for begin, end, name in sorted(spans):
            if begin != covered:
                problem = "overlaps the previous tensor" if begin < covered else f"leaves a gap at byte {covered}"
                raise CheckpointError(f"{path}: {name!r} at data offsets [{begin}, {end}) {problem}")
            covered = end
        if covered != data_size:
            raise CheckpointError(f"{path}: the tensors cover {covered} of the {data_size} data bytes "
                                  "(the file is not fully covered: extra or missing bytes)")
        _reference_check(path)   # a second opinion: anything the reference library refuses, we refuse
        return infos, offsets, metadata

    def _read_raw(self, name: str) -> np.ndarray:
        info = self._infos[name]
        array = empty_array(info.shape, _STORAGE[info.dtype])
        pread_into(self._fd, array, self._offsets[name])
        return array

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a key given twice is an error (which one would count is a guess)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reference_check(path: Path) -> None:
    """Let the `safetensors` library validate the header too: whatever it refuses, we refuse.

    It only parses the header and maps the file (no tensor is read), so this costs little; the
    reads themselves stay ours (pread into fresh arrays, no mapping kept).
    """
    try:
        from safetensors import safe_open
    except ImportError:   # pragma: no cover - a hard dependency; our own checks still apply
        return
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except Exception as exc:   # SafetensorError, OSError, ...: the library's own reason
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a valid safetensors file ({reason[:300]})") from None


def write_safetensors(
    path: str | os.PathLike,
    names: Iterable[str],
    infos: Mapping[str, TensorInfo],
    read: Any,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Stream tensors into a .safetensors file one at a time (never all in memory).

    `infos[name]` gives shape and dtype up front (the header comes first); `read(name)` returns the
    tensor's stored array (bfloat16 as uint16 bit patterns).
    """
    path = Path(path)
    order = list(names)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name in order:
        info = infos[name]
        code = _SAFETENSORS_CODES.get(info.dtype)
        if code is None:
            raise CheckpointError(f"{name}: safetensors cannot hold dtype {info.dtype}")
        size = numel(info.shape) * ITEMSIZE[info.dtype]
        header[name] = {"dtype": code, "shape": list(info.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)   # data starts 8-byte aligned, as the spec recommends
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name in order:
            array = np.asarray(read(name), dtype=_STORAGE[infos[name].dtype], order="C")
            if array.shape != infos[name].shape:
                raise CheckpointError(f"{name}: read shape {array.shape}, expected {infos[name].shape}")
            out.write(array.reshape(-1).view(np.uint8))
    return path


# ---------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------
_TORCH_DTYPES = {
    "float64": "float64", "float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
    "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8",
    "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64", "bool": "bool",
    "complex64": "complex64", "complex128": "complex128",
}
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


# Bytes per element of the storage classes torch.save names in a checkpoint's persistent ids.
_STORAGE_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
    "BoolStorage": 1, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
    "UInt16Storage": 2, "UInt32Storage": 4, "UInt64Storage": 8, "UntypedStorage": 1,
}
# A deflated member expands at most ~1032x; data.pkl is metadata, so this also bounds its read.
_MAX_DEFLATE_RATIO = 1032


class _Placeholder:
    """Stands for any global in a dry-run unpickling of data.pkl: accepts anything, runs nothing."""

    def __init__(self, name: str = "", *args: Any, **kwargs: Any) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> "_Placeholder":
        return _Placeholder()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageLister(pickle.Unpickler):
    """Unpickles data.pkl without building anything, only to list (key, storage type, numel)."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.storages: list[tuple[str, str, int]] = []

    def find_class(self, module: str, name: str) -> Any:
        return _Placeholder(name)

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            _, kind, key, _, count = pid
            self.storages.append((str(key), getattr(kind, "name", ""), count))
        return _Placeholder()


def _is_zipfile(path: Path) -> bool:
    """zipfile.is_zipfile, minus its exceptions: a damaged end record raises BadZipFile from it."""
    try:
        return zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
        return True   # zip-like enough: the zip checks below say what is wrong


def _check_torch_zip(path: Path, verify_crc: bool = True) -> None:
    """What torch.load(mmap=True) leaves unchecked: every member's CRC-32, and each storage
    record's size against the tensor data the pickle says it holds."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            _check_zip_layout(archive, path)
            for member in members:
                if member.compress_type == zipfile.ZIP_STORED and member.compress_size != member.file_size:
                    raise CheckpointError(f"{path}: zip member {member.filename!r} is stored with two different "
                                          f"sizes ({member.compress_size} and {member.file_size})")
                if member.compress_type != zipfile.ZIP_STORED \
                        and member.file_size > _MAX_DEFLATE_RATIO * member.compress_size + 4096:
                    raise CheckpointError(f"{path}: zip member {member.filename!r} claims an impossible size")
                if verify_crc:
                    with archive.open(member) as stream:   # zipfile checks the CRC-32 at the end
                        while stream.read(1 << 22):
                            pass
            pickles = [m for m in members if m.filename == "data.pkl" or m.filename.endswith("/data.pkl")]
            if len(pickles) != 1:
                return   # not torch's layout: torch.load says what is wrong
            prefix = pickles[0].filename[: -len("data.pkl")]
            lister = _StorageLister(io.BytesIO(archive.read(pickles[0])))
            try:
                lister.load()
            except Exception as exc:  # torch.load will name the problem; nothing here was run
                raise CheckpointError(f"{path}: data.pkl is not a readable pickle "
                                      f"({type(exc).__name__}: {str(exc)[:200]})") from None
            sizes = {m.filename: m.file_size for m in members}
            for key, kind, count in lister.storages:
                record = f"{prefix}data/{key}"
                itemsize = _STORAGE_ITEMSIZE.get(kind)
                if record not in sizes:
                    raise CheckpointError(f"{path}: storage record {record!r} is missing")
                if itemsize is None or type(count) is not int or count < 0:
                    continue   # a storage type we do not know: torch.load decides
                if sizes[record] != count * itemsize:
                    raise CheckpointError(f"{path}: storage record {record!r} holds {sizes[record]} bytes, "
                                          f"its tensor data needs {count * itemsize}")
    except CheckpointError:
        raise
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{path}: corrupt zip archive ({exc})") from None
    except (OSError, EOFError, zlib.error, NotImplementedError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the zip archive ({type(exc).__name__}: {exc})") from None


class TorchReader(CheckpointReader):
    """A torch state_dict file; zip-format files are memory-mapped, so loading is lazy.

    Zip members are CRC-checked and storage records sized against their tensors first
    (`verify_checksums=False` skips the CRC pass, not the size check).
    """

    format = "torch"

    def __init__(self, path: str | os.PathLike, verify_checksums: bool = True) -> None:
        import torch

        path = Path(path)
        is_zip = _is_zipfile(path)
        if is_zip:
            _check_torch_zip(path, verify_crc=verify_checksums)
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except Exception as exc:   # torch raises many types for hostile or foreign files
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: torch.load(weights_only=True) refused the file ({first_line})") from None
        state = loaded
        while isinstance(state, Mapping):
            inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
            if inner is None or any(isinstance(v, torch.Tensor) for v in state.values()):
                break
            state = inner
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state_dict of named tensors")
        self._tensors: dict[str, Any] = {}
        self.skipped: list[str] = []   # non-tensor entries (epoch counters, configs): listed, never hidden
        infos = {}
        for name, value in state.items():
            if not isinstance(value, torch.Tensor) or str(value.dtype).removeprefix("torch.") not in _TORCH_DTYPES:
                self.skipped.append(str(name))
                continue
            tensor = value.detach()
            dtype = str(tensor.dtype).removeprefix("torch.")
            self._tensors[str(name)] = tensor
            infos[str(name)] = TensorInfo(tuple(tensor.shape), dtype, tensor.numel() * tensor.element_size())
        super().__init__(path, infos)

    def _read_raw(self, name: str) -> np.ndarray:
        import torch

        tensor = self._tensors[name]
        if tensor.dtype == torch.bfloat16:
            return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
        return tensor.contiguous().numpy()

    def to_torch(self, name: str) -> "Any":
        """Return the stored tensor itself (already torch; no copy)."""
        self._info(name)
        if self._closed:
            raise CheckpointError(f"checkpoint {self.path} is closed")
        return self._tensors[name]

    def close(self) -> None:
        """Drop the tensors (and with them the file mapping)."""
        self._tensors = {}
        super().close()


# ---------------------------------------------------------------------------------------------
# numpy
# ---------------------------------------------------------------------------------------------
# What a numpy pickle of arrays needs. `numpy.ndarray` itself is not here: called directly it
# hands out uninitialised memory of any size. Arrays come only from `_reconstruct` followed by
# the BUILD that fills them from the file's bytes (see _PendingArray), or from `_frombuffer`.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),   # how Python 2 pickles carried bytes; harmless
}


def _one_line(text: object) -> str:
    """Text from a file, safe inside a one-line message (control characters escaped)."""
    return str(text).encode("unicode_escape", "backslashreplace").decode("ascii")[:200]


class _NdarrayToken:
    """Stands for `numpy.ndarray` in a pickle: calling it is an error, not an allocation."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise CheckpointError("refusing to unpickle numpy.ndarray(...): it allocates memory the file does not fill")


_NDARRAY_TOKEN = _NdarrayToken()


class _PendingArray:
    """What `_reconstruct` returns: an array whose shape, dtype and bytes all come from the
    pickle's BUILD state, checked against each other; one never built is refused."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise CheckpointError("pickled array has a malformed state")
        version, shape, dtype, fortran, data = state if len(state) == 5 else (1, *state)
        if version != 1:   # as numpy's own ndarray.__setstate__
            raise CheckpointError(f"pickled array has state version {version!r}; numpy writes 1")
        if not isinstance(dtype, np.dtype) or not isinstance(shape, tuple) \
                or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError("pickled array has a malformed shape or dtype")
        count = numel(shape)
        order = "F" if fortran else "C"
        if dtype.hasobject:
            if not isinstance(data, list) or len(data) != count:
                raise CheckpointError(f"pickled object array of shape {shape} holds "
                                      f"{len(data) if isinstance(data, list) else 'no'} items")
            array = np.empty(count, dtype=object)
            array[:] = data
            self.array = array.reshape(shape, order=order)
            return
        if isinstance(data, str):
            data = data.encode("latin1")   # Python 2 pickles carry the bytes as a latin-1 str
        if not isinstance(data, (bytes, bytearray)) or len(data) != count * dtype.itemsize:
            size = len(data) if isinstance(data, (bytes, bytearray, str)) else "no"
            raise CheckpointError(f"pickled array of shape {shape} and dtype {dtype} comes with {size} "
                                  f"bytes, not {count * dtype.itemsize}")
        self.array = np.frombuffer(bytes(data), dtype=dtype, count=count).reshape(shape, order=order).copy(
            order=order)


def _resolve_pending(value: Any) -> Any:
    """Replace every built _PendingArray by its array (refusing unbuilt ones)."""
    if isinstance(value, _PendingArray):
        if value.array is None:
            raise CheckpointError("pickled array has no data (it was never filled from the file)")
        return value.array
    return value


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays/dtypes/scalars and plain containers."""

    def __init__(self, file: Any, *, max_bytes: int, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._max_bytes = max_bytes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            if name == "_reconstruct":
                return self._reconstruct
            if name == "scalar":
                return self._scalar
            if name == "_frombuffer":
                return self._frombuffer
            return super().find_class(module, name)
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY_TOKEN   # only ever an argument of _reconstruct, never called
        if module.startswith("numpy.dtypes") and name.endswith("DType"):
            return super().find_class(module, name)
        raise CheckpointError(f"refusing to unpickle {_one_line(module)}.{_one_line(name)}: only numpy arrays are allowed in a weights .npy")

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError("refusing a pickle with persistent references in a weights .npy")

    @staticmethod
    def _reconstruct(cls: Any, shape: Any, dtype: Any) -> _PendingArray:
        # numpy pickles call this with shape (0,) and fill in shape, dtype and data by BUILD.
        if cls is not _NDARRAY_TOKEN:
            raise CheckpointError("refusing to rebuild an ndarray subclass from a weights .npy")
        return _PendingArray()

    @staticmethod
    def _scalar(dtype: Any, data: Any = None) -> Any:
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise CheckpointError("pickled scalar is not a plain numpy number")
        if isinstance(data, str):
            data = data.encode("latin1")
        if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
            raise CheckpointError(f"pickled {dtype} scalar does not come with {dtype.itemsize} bytes")
        return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]

    @staticmethod
    def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(shape, tuple) \
                or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError("pickled buffer array has a malformed shape or dtype")
        data = bytes(buffer)
        if len(data) != numel(shape) * dtype.itemsize:
            raise CheckpointError(f"pickled buffer array of shape {shape} comes with {len(data)} bytes")
        return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if order == "F" else "C").copy()


class _BoundedFile(io.RawIOBase):
    """A read-only file view that never hands out more than the file holds, so a lying length
    inside the pickle cannot make the unpickler allocate a huge buffer."""

    def __init__(self, handle: BinaryIO, end: int) -> None:
        self._handle = handle
        self._end = end

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._handle.tell()

    def readinto(self, buffer: Any) -> int:
        remaining = self._end - self._handle.tell()
        view = memoryview(buffer)[: max(0, remaining)]
        return self._handle.readinto(view) if len(view) else 0

    def read(self, size: int = -1) -> bytes:
        remaining = max(0, self._end - self._handle.tell())
        return self._handle.read(remaining if size is None or size < 0 else min(size, remaining))

    def readline(self, size: int = -1) -> bytes:
        remaining = max(0, self._end - self._handle.tell())
        return self._handle.readline(remaining if size is None or size < 0 else min(size, remaining))


_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, ValueError, SyntaxError,
               OSError, EOFError, TypeError, struct.error, OverflowError, MemoryError, tokenize.TokenError)


_MAX_NPY_HEADER = 1 << 20   # numpy's own limit for safe header parsing is 10 KB; be generous


def _read_npy_header_full(handle: BinaryIO) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Parse a .npy header: (shape, dtype, fortran order). The header's length field is checked
    before anything is read by it (numpy would try to read a lying 4 GB length in one call)."""
    head = handle.read(8)
    if len(head) < 8 or head[:6] != b"\x93NUMPY":
        raise ValueError("no .npy magic")
    version = (head[6], head[7])
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f"unknown .npy format version {version[0]}.{version[1]}")
    width = 2 if version == (1, 0) else 4
    length_bytes = handle.read(width)
    if len(length_bytes) < width:
        raise ValueError("truncated .npy header")
    length = int.from_bytes(length_bytes, "little")
    if length > _MAX_NPY_HEADER:
        raise ValueError(f".npy header claims {length} bytes")
    body = handle.read(length)
    if len(body) < length:
        raise ValueError(f".npy header claims {length} bytes, the file holds {len(body)}")
    stream = io.BytesIO(head + length_bytes + body)
    stream.seek(8)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    return tuple(shape), dtype, bool(fortran)


def _check_zip_layout(archive: zipfile.ZipFile, path: Path) -> None:
    """Cross-check the central directory against the local headers: members must tile the file
    from its first byte to the central directory, so an entry dropped from a damaged central
    directory shows up as bytes nobody accounts for instead of silently vanishing."""
    members = sorted(archive.infolist(), key=lambda m: m.header_offset)
    handle = archive.fp
    position = 0
    for member in members:
        if member.header_offset != position:
            raise CheckpointError(f"{path}: damaged zip central directory: bytes {position}..{member.header_offset} "
                                  "belong to no listed member (an entry may have been dropped)")
        handle.seek(member.header_offset)
        local = handle.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{path}: damaged zip: no local header for {member.filename!r}")
        name_length, extra_length = struct.unpack("<2H", local[26:30])
        position = member.header_offset + 30 + name_length + extra_length + member.compress_size
        if member.flag_bits & 0x08:   # a data descriptor follows the data
            handle.seek(position)
            descriptor = handle.read(4)
            position += (4 if descriptor == b"PK\x07\x08" else 0) + \
                (20 if member.file_size >= 0xFFFFFFFF or member.compress_size >= 0xFFFFFFFF else 12)
    if position != archive.start_dir:
        raise CheckpointError(f"{path}: damaged zip central directory: bytes {position}..{archive.start_dir} "
                              "belong to no listed member (an entry may have been dropped)")


def _read_npy_header(handle: BinaryIO) -> tuple[tuple[int, ...], np.dtype]:
    shape, dtype, _ = _read_npy_header_full(handle)
    return shape, dtype


def _flatten(prefix: str, value: Any, out: dict[str, np.ndarray], path: Path) -> None:
    try:
        value = _resolve_pending(value)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {prefix!r}: {exc}") from None
    if isinstance(value, Mapping):
        for key, item in value.items():
            key = key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else str(key)
            _flatten(f"{prefix}/{key}" if prefix else key, item, out, path)
    elif isinstance(value, (list, tuple)):
        # The classic vgg16.npy maps a layer to [weights, biases].
        for i, item in enumerate(value):
            _flatten(f"{prefix}/{i}", item, out, path)
    elif isinstance(value, (np.ndarray, np.generic)):
        out[prefix] = _as_plain_array(np.asarray(value), prefix, path)
    else:
        raise CheckpointError(f"{path}: {prefix!r} holds a {type(value).__name__}, not an array")


def _as_plain_array(array: np.ndarray, name: str, path: Path) -> np.ndarray:
    if array.dtype.kind == "O":
        flat = array.reshape(-1)
        if not all(isinstance(x, (bytes, str)) for x in flat):
            raise CheckpointError(f"{path}: {name!r} is an object array that is not all strings")
        converted = np.empty(flat.size, dtype=object)
        converted[:] = [x.encode("utf-8") if isinstance(x, str) else x for x in flat]
        return converted.reshape(array.shape)
    if array.dtype.kind in "SU":
        return _as_plain_array(array.astype(object), name, path)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not np.little_endian):
        array = array.astype(array.dtype.newbyteorder("<"))
    if _numpy_dtype_name(array.dtype) is None:
        raise CheckpointError(f"{path}: {name!r} has numpy dtype {array.dtype}, which is not supported")
    return array


def _numpy_dtype_name(dtype: np.dtype) -> str | None:
    if dtype.kind in "OSU":
        return "string"
    name = dtype.name
    return name if name in ITEMSIZE else None


def _info_for(array: np.ndarray) -> TensorInfo:
    dtype = _numpy_dtype_name(array.dtype) or str(array.dtype)
    if dtype == "string":
        return TensorInfo(array.shape, dtype, sum(len(x) for x in array.reshape(-1)))
    return TensorInfo(array.shape, dtype, array.nbytes)


class NumpyReader(CheckpointReader):
    """A `.npy` holding a pickled name -> array dict (nested dicts/lists are joined with '/'),
    or a `.npz` archive (members read lazily)."""

    format = "numpy"

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self._arrays: dict[str, np.ndarray] = {}
        self._npz: Any = None
        with open(path, "rb") as handle:
            is_npz = handle.read(4) == b"PK\x03\x04"
        infos = self._open_npz(path) if is_npz else self._open_npy(path)
        super().__init__(path, infos)

    def _open_npy(self, path: Path) -> dict[str, TensorInfo]:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            try:
                shape, dtype = _read_npy_header(handle)
            except (ValueError, SyntaxError, OSError, tokenize.TokenError) as exc:
                raise CheckpointError(f"{path}: not a valid .npy file ({exc})") from None
            if dtype.kind != "O" or shape != ():
                raise CheckpointError(
                    f"{path} holds a single {dtype} array of shape {shape}; a weights .npy must hold a dict "
                    f"of named arrays (np.save(path, {{name: array}}))"
                )
            try:
                # First walk the opcodes: every length inside the pickle is checked against the
                # bytes that follow it. The C unpickler allocates a BINBYTES8's claimed size
                # before reading it (a 1 KB file made it allocate 330 MB, then fail).
                start = handle.tell()
                for _ in pickletools.genops(_BoundedFile(handle, file_size)):
                    pass
                handle.seek(start)
                bounded = _BoundedFile(handle, file_size)
                # The C unpickler allocates a counted opcode's claimed length before reading it (a
                # BINBYTES claiming 4 GiB allocated 4 GiB); pickletools reads only what the file
                # holds, so a first pass over the opcodes refuses any length the file cannot back.
                start = handle.tell()
                for _ in pickletools.genops(bounded):
                    pass
                handle.seek(start)
                unpickler = _RestrictedUnpickler(bounded, max_bytes=file_size, encoding="latin1")
                obj = unpickler.load()
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: {exc}") from None
            except Exception as exc:  # any malformed pickle: truncated, bad opcode, bad reduce args
                raise CheckpointError(f"{path}: corrupt pickled dict ({type(exc).__name__}: {exc})") from None
        try:
            obj = _resolve_pending(obj)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        if isinstance(obj, np.ndarray) and obj.shape == ():
            obj = obj.item()
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of named arrays")
        _flatten("", obj, self._arrays, path)
        return {name: _info_for(array) for name, array in self._arrays.items()}

    def _open_npz(self, path: Path) -> dict[str, TensorInfo]:
        infos = {}
        self._members: dict[str, tuple[zipfile.ZipInfo, bool]] = {}
        try:
            archive = zipfile.ZipFile(path)
        except _ZIP_ERRORS as exc:
            raise CheckpointError(f"{path}: not a valid .npz archive ({exc})") from None
        try:
            members = archive.infolist()
            _check_zip_layout(archive, path)
            for member in members:
                if not member.filename.endswith(".npy"):
                    raise CheckpointError(f"{path}: zip member {member.filename!r} is not a .npy array")
                name = member.filename[: -len(".npy")]
                with archive.open(member) as stream:
                    shape, dtype, fortran = _read_npy_header_full(stream)
                # numpy allocates the whole array before reading a member, so the declared shape
                # must be backed by the member's size, itself bounded by deflate's ~1032x ratio.
                ratio_bound = member.compress_size if member.compress_type == zipfile.ZIP_STORED \
                    else _MAX_DEFLATE_RATIO * member.compress_size + 4096
                if numel(shape) * dtype.itemsize > min(member.file_size, ratio_bound):
                    raise CheckpointError(f"{path}: {name!r} declares more data than its archive member holds")
                if dtype.kind == "O":
                    raise CheckpointError(
                        f"{path}: {name!r} is a pickled object array; .npz weights must be plain arrays")
                dtype_name = _numpy_dtype_name(dtype)
                if dtype_name is None:
                    raise CheckpointError(f"{path}: {name!r} has numpy dtype {dtype}, which is not supported")
                infos[name] = TensorInfo(tuple(shape), dtype_name, numel(shape) * dtype.itemsize)
                self._members[name] = (member, fortran)
        except CheckpointError:
            archive.close()
            raise
        except _ZIP_ERRORS as exc:
            archive.close()
            raise CheckpointError(f"{path}: not a valid .npz archive ({type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
        self._npz = archive
        return infos

    def _read_raw(self, name: str) -> np.ndarray:
        if self._npz is None:
            # The dict was unpickled whole; hand out the array itself rather than hold it twice.
            return self._arrays[name]
        member, fortran = self._members[name]
        info = self._infos[name]
        try:
            with self._npz.open(member) as stream:
                shape, dtype, _ = _read_npy_header_full(stream)
                stored = tuple(reversed(shape)) if fortran else tuple(shape)
                array = empty_array(stored, dtype)
                target = memoryview(array.reshape(-1).view(np.uint8))
                got = 0
                while got < len(target):
                    count = stream.readinto(target[got:])
                    if not count:
                        break
                    got += count
                # Reading to the member's end is what makes zipfile compare its CRC-32.
                if got != len(target) or stream.read(1):
                    raise CheckpointError(f"{self.path}: {name!r} holds {'less' if got < len(target) else 'more'} "
                                          f"data than its header declares")
        except CheckpointError:
            raise
        except _ZIP_ERRORS as exc:
            raise CheckpointError(f"{self.path}: cannot read {name!r} ({type(exc).__name__}: {exc})") from None
        if fortran:
            array = array.T
        if tuple(array.shape) != info.shape:
            raise CheckpointError(f"{self.path}: {name!r} changed shape between reads")
        if not array.flags.c_contiguous:
            array = array.copy(order="C")   # (np.ascontiguousarray would make a 0-d array 1-d)
        return _as_plain_array(array, name, self.path)

    def close(self) -> None:
        """Close the archive / drop the arrays."""
        if self._npz is not None:
            self._npz.close()
            self._npz = None
        self._members = {}
        self._arrays = {}
        super().close()


__all__ = [
    "NumpyReader",
    "SafetensorsReader",
    "TorchReader",
    "widen_bfloat16",
    "write_safetensors",
]
