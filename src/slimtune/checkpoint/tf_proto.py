"""Pieces shared by the V1 and V2 TF checkpoint codecs: the DataType enum, TensorShapeProto and
TensorSliceProto, OrderedCode slice keys, vectorised varint arrays and slice assembly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from slimtune.errors import CheckpointError
from slimtune.utils.protowire import (
    LENGTH_DELIMITED,
    VARINT,
    WireError,
    encode_bytes_field,
    encode_varint_field,
    iter_fields,
    to_signed64,
)

# numpy supports 64 dimensions; real checkpoints never pass 8. Anything higher is hostile.
MAX_RANK = 32
# A single dimension beyond this cannot be backed by any file we could be reading.
MAX_DIM = 1 << 48
# Nor can more elements than this in total (numpy's own limit is near 2**63 bytes).
MAX_ELEMENTS = 1 << 56


@dataclass(frozen=True)
class TFDtype:
    """One TF DataType: its enum, the name we report, and how its values are stored."""

    enum: int
    name: str
    storage: str | None    # numpy dtype (little-endian) of the raw stored values; None for strings
    v1_field: int          # TensorProto field that holds V1 values


# TensorProto fields: 5 float_val, 6 double_val, 7 int_val, 8 string_val, 9 scomplex_val,
# 10 int64_val, 11 bool_val, 12 dcomplex_val, 13 half_val, 16 uint32_val, 17 uint64_val.
_DTYPES = [
    TFDtype(1, "float32", "<f4", 5),
    TFDtype(2, "float64", "<f8", 6),
    TFDtype(3, "int32", "<i4", 7),
    TFDtype(4, "uint8", "u1", 7),
    TFDtype(5, "int16", "<i2", 7),
    TFDtype(6, "int8", "i1", 7),
    TFDtype(7, "string", None, 8),
    TFDtype(8, "complex64", "<c8", 9),
    TFDtype(9, "int64", "<i8", 10),
    TFDtype(10, "bool", "?", 11),
    TFDtype(11, "qint8", "i1", 7),
    TFDtype(12, "quint8", "u1", 7),
    TFDtype(13, "qint32", "<i4", 7),
    TFDtype(14, "bfloat16", "<u2", 13),   # raw bit patterns; widened to float32 on request
    TFDtype(15, "qint16", "<i2", 7),
    TFDtype(16, "quint16", "<u2", 7),
    TFDtype(17, "uint16", "<u2", 7),
    TFDtype(18, "complex128", "<c16", 12),
    TFDtype(19, "float16", "<f2", 13),
    TFDtype(22, "uint32", "<u4", 16),
    TFDtype(23, "uint64", "<u8", 17),
]
DTYPES_BY_ENUM = {d.enum: d for d in _DTYPES}
DTYPES_BY_NAME = {d.name: d for d in _DTYPES}
_UNSUPPORTED = {20: "resource", 21: "variant"}


def require_readable(path: object, version_def: memoryview, reader_version: int, reader: str) -> None:
    """Raise unless a VersionDef (min_consumer = 2, bad_consumers = 3) lets this reader version read it."""
    min_consumer, bad = 0, []
    for field, wire_type, value in iter_fields(version_def):
        if field == 2 and wire_type == VARINT:
            min_consumer = value
        elif field == 3 and wire_type == VARINT:
            bad.append(value)
    if min_consumer > reader_version or reader_version in bad:
        raise CheckpointError(f"{path} needs a newer {reader} (min_consumer {min_consumer})")


def dtype_from_enum(enum: int) -> TFDtype | None:
    """Look up a DataType enum; reference types (enum + 100) map to their base type."""
    if enum > 100:
        enum -= 100
    return DTYPES_BY_ENUM.get(enum)


def dtype_name(enum: int) -> str:
    """Name for any enum, including ones we cannot read (for listings)."""
    found = dtype_from_enum(enum)
    if found is not None:
        return found.name
    return _UNSUPPORTED.get(enum % 100, f"unknown_dtype_{enum}")


def parse_shape(buf: memoryview) -> tuple[int, ...]:
    """Parse a TensorShapeProto into a tuple of non-negative dims."""
    dims: list[int] = []
    for field, wire_type, value in iter_fields(buf):
        if field == 2 and wire_type == LENGTH_DELIMITED:
            size = 0
            for sub_field, sub_type, sub_value in iter_fields(value):
                if sub_field == 1 and sub_type == VARINT:
                    size = to_signed64(sub_value)
            if size < 0:
                raise WireError(f"stored tensor has an unknown ({size}) dimension")
            if size > MAX_DIM:
                raise WireError(f"dimension {size} is absurdly large")
            dims.append(size)
            if len(dims) > MAX_RANK:
                raise WireError(f"tensor rank above {MAX_RANK}")
        elif field == 3 and wire_type == VARINT and value:
            raise WireError("stored tensor has unknown rank")
    product = 1
    for dim in dims:
        product *= max(dim, 1)   # zero dims still count: numpy checks the product of the rest
    if product > MAX_ELEMENTS:
        raise WireError(f"shape {tuple(dims)} has absurdly many elements")
    return tuple(dims)


def encode_shape(shape: Sequence[int]) -> bytes:
    """Encode a TensorShapeProto."""
    return b"".join(encode_bytes_field(2, encode_varint_field(1, d) if d else b"") for d in shape)


Extent = tuple[int, int]   # (start, length); length -1 means "the whole dimension"


def parse_slice(buf: memoryview) -> tuple[Extent, ...]:
    """Parse a TensorSliceProto into (start, length) pairs; an empty Extent is (0, -1)."""
    extents: list[Extent] = []
    for field, wire_type, value in iter_fields(buf):
        if field == 1 and wire_type == LENGTH_DELIMITED:
            start, length = 0, -1
            for sub_field, sub_type, sub_value in iter_fields(value):
                if sub_field == 1 and sub_type == VARINT:
                    start = to_signed64(sub_value)
                elif sub_field == 2 and sub_type == VARINT:
                    length = to_signed64(sub_value)
            extents.append((start, length))
            if len(extents) > MAX_RANK:
                raise WireError(f"slice rank above {MAX_RANK}")
    return tuple(extents)


def encode_full_slice(rank: int) -> bytes:
    """Encode the TensorSliceProto of a whole tensor: one empty Extent per dimension."""
    return encode_bytes_field(1, b"") * rank


def slice_region(extents: tuple[Extent, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Turn slice extents into numpy index slices, checking they lie inside `shape`."""
    if not extents:
        return tuple(slice(0, d) for d in shape)   # no extents: the whole tensor
    if len(extents) != len(shape):
        raise CheckpointError(f"slice of rank {len(extents)} for a tensor of rank {len(shape)}")
    region = []
    for (start, length), dim in zip(extents, shape):
        if length == -1:
            if start != 0:
                raise CheckpointError(f"slice starts at {start} but claims the whole dimension")
            length = dim
        if start < 0 or length < 0 or start + length > dim:
            raise CheckpointError(f"slice [{start}, {start + length}) lies outside a dimension of {dim}")
        region.append(slice(start, start + length))
    return tuple(region)


def region_shape(region: tuple[slice, ...]) -> tuple[int, ...]:
    """Shape of the block a region selects."""
    return tuple(s.stop - s.start for s in region)


def check_coverage(shape: tuple[int, ...], regions: list[tuple[slice, ...]]) -> None:
    """Raise unless the regions tile `shape` exactly (no gap, no overlap)."""
    total = int(np.prod(shape, dtype=object))
    if len(regions) == 1:
        if region_shape(regions[0]) != shape:
            raise CheckpointError(f"the only slice covers {region_shape(regions[0])} of a {shape} tensor")
        return
    # Cheap arithmetic first: the callers have bounded every region by the bytes backing it, so
    # once the sizes add up the coverage mask below is bounded by the file size too.
    listed = sum(int(np.prod(region_shape(r), dtype=object)) for r in regions)
    if listed != total:
        raise CheckpointError(f"tensor slices hold {listed} elements, the tensor has {total}")
    covered = np.zeros(shape, dtype=bool)
    filled = 0
    for region in regions:
        block = covered[region]
        if block.any():
            raise CheckpointError("tensor slices overlap")
        block[...] = True
        filled += block.size
    if filled != total:
        raise CheckpointError(f"tensor slices cover {filled} of {total} elements")


# -- OrderedCode, used for V1 record keys and V2 slice-entry keys ----------------------------
_SIGNED_HEADER = [(0, 0), (0x80, 0), (0xC0, 0), (0xE0, 0), (0xF0, 0), (0xF8, 0), (0xFC, 0), (0xFE, 0),
                  (0xFF, 0), (0xFF, 0x80), (0xFF, 0xC0)]


def _num_increasing(value: int) -> bytes:
    length = (value.bit_length() + 7) // 8
    return bytes((length,)) + value.to_bytes(length, "big")


def _signed_num_increasing(value: int) -> bytes:
    magnitude = ~value if value < 0 else value
    if magnitude < 64:
        return bytes(((0x80 ^ value) & 0xFF,))
    length = (magnitude.bit_length() + 7) // 7   # header takes length+1 bits, payload 7*length-1
    encoded = bytearray((value & ((1 << 80) - 1)).to_bytes(10, "big")[10 - length:])
    encoded[0] ^= _SIGNED_HEADER[length][0]
    encoded[1] ^= _SIGNED_HEADER[length][1]
    return bytes(encoded)


def _ordered_string(data: bytes) -> bytes:
    return _escape(data) + b"\x00\x01"


def _escape(data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
        if byte == 0:
            out += b"\x00\xff"
        elif byte == 0xFF:
            out += b"\xff\x00"
        else:
            out.append(byte)
    return bytes(out)


def tensor_slice_key(name: bytes, extents: tuple[Extent, ...]) -> bytes:
    """EncodeTensorNameSlice: the key TF stores a (name, slice) under."""
    out = _num_increasing(0) + _ordered_string(name) + _num_increasing(len(extents))
    for start, length in extents:
        out += _signed_num_increasing(start) + _signed_num_increasing(length)
    return out


# -- Vectorised varints ----------------------------------------------------------------------
def decode_varint_array(payload: memoryview | bytes, count: int | None = None) -> np.ndarray:
    """Decode a packed run of varints into uint64 (values wrap like protobuf's int64 parsing)."""
    data = np.frombuffer(payload, dtype=np.uint8)
    if data.size == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(data < 0x80)
    if ends.size == 0 or ends[-1] != data.size - 1:
        raise WireError("truncated varint in packed field")
    if count is not None and ends.size != count:
        raise WireError(f"packed field holds {ends.size} values, expected {count}")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    longest = int(lengths.max())
    if longest > 10:
        raise WireError("varint longer than 10 bytes")
    result = (data[starts] & 0x7F).astype(np.uint64)
    for k in range(1, longest):
        rows = np.flatnonzero(lengths > k)
        result[rows] |= (data[starts[rows] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return result


def encode_varint_array(values: np.ndarray) -> bytes:
    """Encode integers as packed varints; negative values as 10-byte two's complement."""
    values = np.asarray(values)
    if values.dtype.kind == "i":   # sign-extend to 64 bits first, as protobuf does for int32
        v = values.astype(np.int64).view(np.uint64).ravel()
    else:
        v = values.astype(np.uint64).ravel()
    if v.size == 0:
        return b""
    lengths = np.ones(v.size, dtype=np.int64)
    for k in range(1, 10):
        lengths += (v >> np.uint64(7 * k)) > 0
    table = np.empty((v.size, 10), dtype=np.uint8)
    for k in range(10):
        group = ((v >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        table[:, k] = group | np.where(k < lengths - 1, 0x80, 0).astype(np.uint8)
    keep = np.arange(10)[None, :] < lengths[:, None]
    return table[keep].tobytes()


# -- Writer input ----------------------------------------------------------------------------
_NUMPY_TO_TF = {
    ("f", 2): 19, ("f", 4): 1, ("f", 8): 2,
    ("i", 1): 6, ("i", 2): 5, ("i", 4): 3, ("i", 8): 9,
    ("u", 1): 4, ("u", 2): 17, ("u", 4): 22, ("u", 8): 23,
    ("b", 1): 10, ("c", 8): 8, ("c", 16): 18,
}


def to_tf_array(name: str, value: object) -> tuple[TFDtype, np.ndarray]:
    """Normalise a numpy array, torch tensor, scalar or list into (TF dtype, little-endian array).

    bfloat16 (a torch tensor, or an `ml_dtypes` numpy array) comes back as uint16 bit patterns;
    strings come back as an object array of bytes (str is encoded as UTF-8).
    """
    if type(value).__module__.startswith("torch"):
        import torch

        tensor = value.detach().cpu().contiguous()  # type: ignore[attr-defined]
        if tensor.dtype == torch.bfloat16:
            return DTYPES_BY_NAME["bfloat16"], tensor.view(torch.int16).numpy().view("<u2")
        value = tensor.numpy()
    array = np.asarray(value)
    if array.dtype.name == "bfloat16":
        return DTYPES_BY_NAME["bfloat16"], np.asarray(array, order="C").view("<u2")
    if array.dtype.kind in "SUO":
        flat = [_as_bytes(name, item) for item in array.reshape(-1)]
        strings = np.empty(len(flat), dtype=object)
        strings[:] = flat
        return DTYPES_BY_NAME["string"], strings.reshape(array.shape)
    enum = _NUMPY_TO_TF.get((array.dtype.kind, array.dtype.itemsize))
    if enum is None:
        raise CheckpointError(f"cannot store {name!r}: TF checkpoints have no dtype for numpy {array.dtype}")
    dtype = DTYPES_BY_ENUM[enum]
    return dtype, np.asarray(array, dtype=np.dtype(dtype.storage), order="C")


def _as_bytes(name: str, item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, np.bytes_):
        return bytes(item)
    raise CheckpointError(f"cannot store {name!r}: a string tensor holds a {type(item).__name__}")


def check_tensor_name(name: str) -> bytes:
    """Encode a tensor name for a key; the empty name and a leading NUL are reserved by TF."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"tensor names must be non-empty strings, got {name!r}")
    key = name.encode("utf-8")
    if key[0] == 0:
        raise CheckpointError(f"tensor name {name!r} starts with NUL, which TF reserves for slice keys")
    return key


def decode_tensor_name(key: bytes) -> str:
    """Turn a stored name into a str (invalid UTF-8 is escaped, never dropped)."""
    return key.decode("utf-8", errors="backslashreplace")
