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
import zipfile
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
            header = json.loads(os.pread(self._fd, header_size, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header is not a JSON object")
        data_start = 8 + header_size
        data_size = file_size - data_start
        metadata = header.pop("__metadata__", None) or {}
        infos, offsets = {}, {}
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
                raise CheckpointError(f"{path}: {name} has safetensors dtype {code}, which cannot be read")
            if not 0 <= begin <= end <= data_size or end - begin != numel(shape) * ITEMSIZE[dtype]:
                raise CheckpointError(
                    f"{path}: {name} has data offsets [{begin}, {end}) that do not fit its shape or the file")
            infos[name] = TensorInfo(shape, dtype, end - begin)
            offsets[name] = data_start + begin
        return infos, offsets, metadata if isinstance(metadata, dict) else {}

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


class TorchReader(CheckpointReader):
    """A torch state_dict file; zip-format files are memory-mapped, so loading is lazy."""

    format = "torch"

    def __init__(self, path: str | os.PathLike) -> None:
        import torch

        path = Path(path)
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
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
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),   # how Python 2 pickles carried bytes; harmless
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays/dtypes/scalars and plain containers."""

    def __init__(self, file: Any, *, max_bytes: int, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._max_bytes = max_bytes

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and (module, name) in _SAFE_GLOBALS:
            return self._reconstruct
        if (module, name) in _SAFE_GLOBALS or (module.startswith("numpy.dtypes") and name.endswith("DType")):
            return super().find_class(module, name)
        raise CheckpointError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed in a weights .npy")

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError("refusing a pickle with persistent references in a weights .npy")

    def _reconstruct(self, cls: Any, shape: Any, dtype: Any) -> np.ndarray:
        # numpy pickles call this with shape (0,) and fill the data in later; a bigger shape
        # would only make us allocate memory the file cannot back.
        if cls is not np.ndarray:
            raise CheckpointError("refusing to rebuild an ndarray subclass from a weights .npy")
        count = numel(tuple(int(d) for d in shape))
        if count > self._max_bytes:
            raise CheckpointError(f"pickled array claims {count} elements, more than the file could hold")
        return np.ndarray(tuple(shape), dtype=dtype)


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


def _read_npy_header(handle: BinaryIO) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    return tuple(shape), dtype


def _flatten(prefix: str, value: Any, out: dict[str, np.ndarray], path: Path) -> None:
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
            except (ValueError, SyntaxError, OSError) as exc:
                raise CheckpointError(f"{path}: not a valid .npy file ({exc})") from None
            if dtype.kind != "O" or shape != ():
                raise CheckpointError(
                    f"{path} holds a single {dtype} array of shape {shape}; a weights .npy must hold a dict "
                    f"of named arrays (np.save(path, {{name: array}}))"
                )
            try:
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
        if isinstance(obj, np.ndarray) and obj.shape == ():
            obj = obj.item()
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of named arrays")
        _flatten("", obj, self._arrays, path)
        return {name: _info_for(array) for name, array in self._arrays.items()}

    def _open_npz(self, path: Path) -> dict[str, TensorInfo]:
        infos = {}
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.infolist()
                headers = []
                for member in members:
                    if not member.filename.endswith(".npy"):
                        raise CheckpointError(f"{path}: zip member {member.filename} is not a .npy array")
                    with archive.open(member) as stream:
                        headers.append((member.filename[: -len(".npy")], *_read_npy_header(stream)))
            for (name, shape, dtype), member in zip(headers, members):
                # numpy allocates the whole array before reading a member, so the declared shape
                # must be backed by the member's size, itself bounded by deflate's ~1032x ratio.
                ratio_bound = member.compress_size if member.compress_type == zipfile.ZIP_STORED \
                    else 1032 * member.compress_size + 4096
                if numel(shape) * dtype.itemsize > min(member.file_size, ratio_bound):
                    raise CheckpointError(f"{path}: {name} declares more data than its archive member holds")
                if dtype.kind == "O":
                    raise CheckpointError(
                        f"{path}: {name} is a pickled object array; .npz weights must be plain arrays")
                if _numpy_dtype_name(dtype) is None:
                    raise CheckpointError(f"{path}: {name} has numpy dtype {dtype}, which is not supported")
                dtype_name = _numpy_dtype_name(dtype)
                size = numel(shape) * dtype.itemsize
                infos[name] = TensorInfo(tuple(shape), dtype_name, size)
            self._npz = np.load(path, allow_pickle=False)
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise CheckpointError(f"{path}: not a valid .npz archive ({exc})") from None
        return infos

    def _read_raw(self, name: str) -> np.ndarray:
        if self._npz is None:
            # The dict was unpickled whole; hand out the array itself rather than hold it twice.
            return self._arrays[name]
        try:
            array = self._npz[name]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{self.path}: cannot read {name} ({exc})") from None
        return _as_plain_array(array, name, self.path)

    def close(self) -> None:
        """Close the archive / drop the arrays."""
        if self._npz is not None:
            self._npz.close()
            self._npz = None
        self._arrays = {}
        super().close()


__all__ = [
    "NumpyReader",
    "SafetensorsReader",
    "TorchReader",
    "widen_bfloat16",
    "write_safetensors",
]
