"""TF V1 checkpoints ("tensor slice" files): one table per file, read and written without TF.

The record under the empty key is a SavedTensorSlices whose `meta` lists every tensor's name,
shape, dtype and saved slices. Every other record is a SavedTensorSlices whose `data` is a
SavedSlice: name, slice extents and a TensorProto carrying the values in its *typed* repeated
field (float_val, int_val, ...), never in tensor_content. Fixed-width payloads are copied
straight from the mmap into the output array; varint payloads are decoded vectorised.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from slimtune.checkpoint.base import CheckpointReader, TensorInfo, empty_array, numel, pread_into
from slimtune.checkpoint.tf_proto import (
    TFDtype,
    Extent,
    check_coverage,
    check_tensor_name,
    decode_tensor_name,
    decode_varint_array,
    dtype_from_enum,
    dtype_name,
    encode_full_slice,
    encode_shape,
    encode_varint_array,
    parse_shape,
    parse_slice,
    region_shape,
    require_readable,
    slice_region,
    tensor_slice_key,
    to_tf_array,
)
from slimtune.checkpoint.tf_table import CHUNK_BYTES, NO_COMPRESSION, TableEntry, TableReader, TableWriter
from slimtune.errors import CheckpointError
from slimtune.utils.protowire import (
    FIXED32,
    FIXED64,
    LENGTH_DELIMITED,
    VARINT,
    WireError,
    encode_bytes_field,
    encode_key,
    encode_varint,
    encode_varint_field,
    iter_field_spans,
    iter_fields,
)

# The version this reader understands (TF_CHECKPOINT_VERSION); newer min_consumer means "too new".
CHECKPOINT_VERSION = 1
# TF refuses to serialise a slice above this (kMaxMessageBytes); so do we.
MAX_RECORD_BYTES = 1 << 31
# TF's V1 saver refuses these (checked with TF 2.21), so a V1 file holding them helps nobody.
V1_UNSAVABLE = ("bfloat16", "uint32", "uint64")
SHARD_PATTERN = re.compile(r"^(?P<base>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})$")

_FIXED_WIRE = {5: ("<f4", FIXED32), 6: ("<f8", FIXED64), 9: ("<f4", FIXED32), 12: ("<f8", FIXED64)}


@dataclass(frozen=True)
class _TensorMeta:
    dtype_enum: int
    shape: tuple[int, ...]
    slices: tuple[tuple[Extent, ...], ...]


@dataclass(frozen=True)
class _Record:
    table: int
    entry: TableEntry
    proto_start: int      # TensorProto position inside the record value
    proto_length: int


def shard_files(path: Path) -> list[Path]:
    """All files of a sharded V1 checkpoint given one of them (or just [path])."""
    match = SHARD_PATTERN.match(path.name)
    if not match or int(match["count"]) <= 1:
        return [path]
    count = int(match["count"])
    files = [path.with_name(f"{match['base']}-{i:05d}-of-{count:05d}") for i in range(count)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"V1 checkpoint {path} is sharded but {', '.join(missing[:5])} is missing")
    return files


class TFV1Reader(CheckpointReader):
    """Lazy reader for a V1 checkpoint file (or the shard set it belongs to)."""

    format = "tf_v1"

    def __init__(self, path: str | os.PathLike, *, verify_checksums: bool = True) -> None:
        path = Path(path)
        self._tables: list[TableReader] = []
        self._tensors: dict[str, _TensorMeta] = {}
        self._records: dict[tuple[str, tuple[Extent, ...]], _Record] = {}
        try:
            for file in shard_files(path):
                self._tables.append(TableReader(file, verify_checksums=verify_checksums))
                self._scan(len(self._tables) - 1)
        except CheckpointError:
            self._close_tables()
            raise
        except WireError as exc:
            self._close_tables()
            raise CheckpointError(f"{path}: corrupt V1 checkpoint ({exc})") from None
        stored_bytes: dict[str, int] = {}
        for (name, _), record in self._records.items():
            stored_bytes[name] = stored_bytes.get(name, 0) + record.proto_length
        infos = {name: TensorInfo(meta.shape, dtype_name(meta.dtype_enum), _nbytes(meta, stored_bytes.get(name, 0)))
                 for name, meta in self._tensors.items()}
        super().__init__(path, infos)

    # -- opening ----------------------------------------------------------------------------
    def _scan(self, table_index: int) -> None:
        table = self._tables[table_index]
        entries = table.entries()
        first = next(entries, None)
        if first is None or first.key != b"":
            raise CheckpointError(f"{table.path} is a TF table without V1 checkpoint metadata")
        self._parse_meta(table, table.value(first))
        for entry in entries:
            # Only the record header is parsed here; big blocks are CRC-checked when read.
            value = table.value(entry, verify=False)
            data = None
            for field, wire_type, length, start in iter_field_spans(value):
                if field == 2 and wire_type == LENGTH_DELIMITED:
                    data = (start, length)
            if data is None:
                raise CheckpointError(f"{table.path}: record {entry.key!r} holds no tensor data")
            name = extents = proto = None
            for field, wire_type, length, start in iter_field_spans(value, data[0], data[0] + data[1]):
                if wire_type != LENGTH_DELIMITED:
                    continue
                if field == 1:
                    name = decode_tensor_name(bytes(value[start:start + length]))
                elif field == 2:
                    extents = parse_slice(value[start:start + length])
                elif field == 3:
                    proto = (start, length)
            if name is None:
                raise CheckpointError(f"{table.path}: record {entry.key!r} has no tensor name")
            extents = extents if extents is not None else ()
            proto = proto if proto is not None else (data[0], 0)
            key = (name, extents)
            if key in self._records:
                raise CheckpointError(f"{table.path}: slice {extents} of {name} is stored twice")
            self._records[key] = _Record(table_index, entry, proto[0], proto[1])
            del value

    def _parse_meta(self, table: TableReader, value: memoryview) -> None:
        meta = None
        for field, wire_type, payload in iter_fields(value):
            if field == 1 and wire_type == LENGTH_DELIMITED:
                meta = payload
        if meta is None:
            raise CheckpointError(
                f"{table.path} is a TF table but not a V1 checkpoint (a V2 .index file? pass the checkpoint prefix)"
            )
        for field, wire_type, payload in iter_fields(meta):
            if wire_type != LENGTH_DELIMITED:
                continue
            if field == 2:
                require_readable(table.path, payload, CHECKPOINT_VERSION, "checkpoint reader")
            elif field == 1:
                name, dtype_enum, shape, slices = None, 0, (), []
                for sub_field, sub_type, sub in iter_fields(payload):
                    if sub_field == 1 and sub_type == LENGTH_DELIMITED:
                        name = decode_tensor_name(bytes(sub))
                    elif sub_field == 2 and sub_type == LENGTH_DELIMITED:
                        shape = parse_shape(sub)
                    elif sub_field == 3 and sub_type == VARINT:
                        dtype_enum = sub
                    elif sub_field == 4 and sub_type == LENGTH_DELIMITED:
                        slices.append(parse_slice(sub))
                if name is None:
                    raise CheckpointError(f"{table.path}: a metadata entry has no tensor name")
                if name in self._tensors:
                    raise CheckpointError(f"{table.path}: tensor {name} is listed twice")
                self._tensors[name] = _TensorMeta(dtype_enum, shape, tuple(slices))

    # -- reading ----------------------------------------------------------------------------
    def _read_raw(self, name: str) -> np.ndarray:
        meta = self._tensors[name]
        dtype = dtype_from_enum(meta.dtype_enum)
        if dtype is None:
            raise CheckpointError(
                f"{name} in {self.path} has dtype {dtype_name(meta.dtype_enum)}, which cannot be read")
        if not meta.slices:
            raise CheckpointError(f"{name} in {self.path} lists no saved slices")
        regions = [slice_region(extents, meta.shape) for extents in meta.slices]
        for extents, region in zip(meta.slices, regions):
            record = self._records.get((name, extents))
            if record is None:
                raise CheckpointError(f"{name} in {self.path}: the data of slice {extents} is missing")
            if numel(region_shape(region)) > record.proto_length:   # every value costs >= 1 byte
                raise CheckpointError(f"{name} in {self.path}: slice {extents} has too little data for its shape")
        check_coverage(meta.shape, regions)
        if len(regions) == 1:
            return self._read_slice(name, meta.slices[0], dtype, meta.shape)
        out = np.empty(meta.shape, dtype=object) if dtype.storage is None else empty_array(meta.shape, dtype.storage)
        for extents, region in zip(meta.slices, regions):
            out[region] = self._read_slice(name, extents, dtype, region_shape(region))
        return out

    def _read_slice(self, name: str, extents: tuple[Extent, ...], dtype: TFDtype, shape: tuple[int, ...]) -> np.ndarray:
        record = self._records.get((name, extents))
        if record is None:
            raise CheckpointError(f"{name} in {self.path}: the data of slice {extents} is missing")
        table = self._tables[record.table]
        count = numel(shape)
        try:
            fast = self._read_fixed_direct(table, record, dtype, count)
            if fast is not None:
                return fast.reshape(shape)
            value = table.value(record.entry)            # CRC-checks the block (chunked if huge)
            base = table.value_file_offset(record.entry)
            release = (lambda start, length: table.release(base + start, length)) if base is not None else None
            try:
                flat = decode_tensor_values(value, record.proto_start, record.proto_length, dtype, count, release)
            finally:
                del value
        except WireError as exc:
            raise CheckpointError(f"{name} in {self.path}: corrupt tensor data ({exc})") from None
        return flat.reshape(shape)

    def _read_fixed_direct(self, table: TableReader, record: _Record, dtype: TFDtype, count: int) -> np.ndarray | None:
        """The common case, a float tensor in an uncompressed block: pread its packed payload
        straight into the output array and checksum the block around it. None if not applicable."""
        base = table.value_file_offset(record.entry)
        if base is None or dtype.storage is None or dtype.v1_field not in _FIXED_WIRE:
            return None
        storage = np.dtype(dtype.storage)
        if count * storage.itemsize < CHUNK_BYTES // 16:
            return None   # small: the generic path is just as fast
        value = table.value(record.entry, verify=False)
        try:
            spans = list(iter_field_spans(value, record.proto_start, record.proto_start + record.proto_length))
        finally:
            del value
        typed = [(s, n) for field, wire, n, s in spans if field == dtype.v1_field]
        if len(typed) != 1 or len(spans) != 1 or spans[0][1] != LENGTH_DELIMITED:
            return None
        start, length = typed[0]
        if length != count * storage.itemsize:
            raise WireError(f"tensor holds {length} value bytes, its shape needs {count * storage.itemsize}")
        out = empty_array((count,), storage)
        pread_into(table.fileno(), out, base + start)
        table.verify_block_with(record.entry.block, record.entry.start + start, out)
        return out

    def _close_tables(self) -> None:
        for table in self._tables:
            table.close()
        self._tables = []

    def close(self) -> None:
        """Unmap the checkpoint file(s)."""
        self._close_tables()
        super().close()


def _nbytes(meta: _TensorMeta, stored: int) -> int:
    """Value bytes of a tensor; for strings, the bytes of its stored TensorProtos."""
    dtype = dtype_from_enum(meta.dtype_enum)
    if dtype is not None and dtype.storage is not None:
        return numel(meta.shape) * np.dtype(dtype.storage).itemsize
    return stored


def decode_tensor_values(
    buf: memoryview,
    start: int,
    length: int,
    dtype: TFDtype,
    count: int,
    release: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Decode the typed values of a TensorProto at buf[start:start+length] into a flat array.

    Accepts packed and unpacked encodings (and tensor_content as a fallback); the number of values
    must be exactly `count`. `release(start, length)` is told which bytes of `buf` were consumed.
    """
    pieces: list[tuple[bool, int, int]] = []   # (packed, start-or-value, length)
    content: tuple[int, int] | None = None
    if dtype.storage is None:
        field_wire = LENGTH_DELIMITED
    elif dtype.v1_field in _FIXED_WIRE:
        field_wire = _FIXED_WIRE[dtype.v1_field][1]
    else:
        field_wire = VARINT
    for field, wire_type, value, value_start in iter_field_spans(buf, start, start + length):
        if field == dtype.v1_field:
            if wire_type == LENGTH_DELIMITED:
                pieces.append((True, value_start, value))
            elif wire_type == field_wire:
                pieces.append((False, value, 0))
            else:
                raise WireError(f"field {field} has wire type {wire_type}")
        elif field == 4 and wire_type == LENGTH_DELIMITED:
            content = (value_start, value)
    if dtype.storage is None:
        return _decode_strings(buf, pieces, count)
    storage = np.dtype(dtype.storage)
    if not pieces and content is not None:
        return _copy_fixed(buf, [(True, content[0], content[1])], storage, count, storage.itemsize, release)
    if dtype.v1_field in _FIXED_WIRE:
        wire_dtype = np.dtype(_FIXED_WIRE[dtype.v1_field][0])
        return _copy_fixed(buf, pieces, storage, count, wire_dtype.itemsize, release)
    return _convert_varints(_gather_varints(buf, pieces, count), dtype, storage)


def _copy_fixed(buf: memoryview, pieces: list[tuple[bool, int, int]], storage: np.dtype, count: int,
                wire_size: int, release: Callable[[int, int], None] | None) -> np.ndarray:
    total = count * storage.itemsize
    present = sum(n if packed else wire_size for packed, _, n in pieces)
    if present != total:
        raise WireError(f"tensor holds {present} value bytes, its shape needs {total}")
    out = empty_array((count,), storage)
    target = out.view(np.uint8)
    pos = 0
    for packed, where, n in pieces:
        if not packed:   # one unpacked fixed32/fixed64 value
            target[pos:pos + wire_size] = np.frombuffer(where.to_bytes(wire_size, "little"), np.uint8)
            pos += wire_size
            continue
        for offset in range(0, n, CHUNK_BYTES):
            stop = min(offset + CHUNK_BYTES, n)
            target[pos + offset:pos + stop] = np.frombuffer(buf[where + offset:where + stop], np.uint8)
            if release is not None:
                release(where + offset, stop - offset)
        pos += n
    return out


def _gather_varints(buf: memoryview, pieces: list[tuple[bool, int, int]], count: int) -> np.ndarray:
    if len(pieces) == 1 and pieces[0][0]:
        _, where, n = pieces[0]
        return decode_varint_array(buf[where:where + n], count)
    parts = []
    for packed, where, n in pieces:
        if packed:
            parts.append(decode_varint_array(buf[where:where + n]))
        else:
            parts.append(np.array([where & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    if values.size != count:
        raise WireError(f"tensor holds {values.size} values, its shape needs {count}")
    return values


def _convert_varints(values: np.ndarray, dtype: TFDtype, storage: np.dtype) -> np.ndarray:
    if storage.kind == "b":
        return values != 0
    if storage.kind == "f":   # half_val: float16 bit patterns in the low 16 bits
        return (values & np.uint64(0xFFFF)).astype(np.uint16).view(storage)
    unsigned = np.dtype(f"<u{storage.itemsize}")
    narrowed = values.astype(unsigned)          # keep the low bits, as TF's int32 parse does
    return narrowed.view(storage) if storage != unsigned else narrowed


def _decode_strings(buf: memoryview, pieces: list[tuple[bool, int, int]], count: int) -> np.ndarray:
    if len(pieces) != count:
        raise WireError(f"string tensor holds {len(pieces)} values, its shape needs {count}")
    out = np.empty(count, dtype=object)
    for i, (packed, where, n) in enumerate(pieces):
        if not packed:
            raise WireError("string value is not length-delimited")
        out[i] = bytes(buf[where:where + n])
    return out


# -------------------------------------------------------------------------------------------
# Writer
# -------------------------------------------------------------------------------------------
def encode_tensor_values(dtype: TFDtype, array: np.ndarray) -> bytes:
    """Encode an array as a TensorProto with only the typed field set (TF's V1 layout)."""
    if array.size == 0:
        return b""
    if dtype.storage is None:
        return b"".join(encode_bytes_field(8, item) for item in array.reshape(-1))
    if dtype.v1_field in _FIXED_WIRE:
        payload = np.ascontiguousarray(array).reshape(-1).view(np.uint8).tobytes()
    elif dtype.name == "bool":
        payload = encode_varint_array(array.reshape(-1).astype(np.uint8))
    elif dtype.name in ("float16", "bfloat16"):
        payload = encode_varint_array(array.reshape(-1).view(np.uint16))
    else:
        payload = encode_varint_array(array.reshape(-1))
    return encode_key(dtype.v1_field, LENGTH_DELIMITED) + encode_varint(len(payload)) + payload


def write_v1(
    path: str | os.PathLike,
    tensors: Mapping[str, object],
    *,
    compression: int = NO_COMPRESSION,
    block_size: int = 256 * 1024,
) -> Path:
    """Write a single-file V1 checkpoint TF can read (every tensor saved as one full slice)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prepared = []
    for name in sorted(tensors, key=check_tensor_name):
        dtype, array = to_tf_array(name, tensors[name])
        if dtype.name in V1_UNSAVABLE:
            raise CheckpointError(f"{name}: TF cannot save or restore {dtype.name} in a V1 checkpoint; write version=2")
        prepared.append((name, check_tensor_name(name), dtype, array))
    meta = b""
    records = []
    for name, key, dtype, array in prepared:
        full_slice = encode_full_slice(array.ndim)
        meta += encode_bytes_field(1, (
            encode_bytes_field(1, key)
            + encode_bytes_field(2, encode_shape(array.shape))
            + encode_varint_field(3, dtype.enum)
            + encode_bytes_field(4, full_slice)
        ))
        saved_slice = encode_bytes_field(1, key) + encode_bytes_field(2, full_slice) \
            + encode_bytes_field(3, encode_tensor_values(dtype, array))
        if len(saved_slice) >= MAX_RECORD_BYTES:
            raise CheckpointError(f"{name} is too large for a V1 checkpoint (2 GiB per tensor); write V2")
        records.append((tensor_slice_key(key, ((0, -1),) * array.ndim), encode_bytes_field(2, saved_slice)))
    meta += encode_bytes_field(2, encode_varint_field(1, CHECKPOINT_VERSION))
    with open(path, "wb") as out:
        writer = TableWriter(out, compression=compression, block_size=block_size)
        writer.add(b"", encode_bytes_field(1, meta))
        for key, value in sorted(records):
            writer.add(key, value)
        writer.finish()
    return path

