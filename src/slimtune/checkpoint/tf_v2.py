"""TF V2 checkpoints (tensor bundles): `<prefix>.index` (a table) + `<prefix>.data-NNNNN-of-NNNNN`.

The index maps each name to a BundleEntryProto: dtype, shape, shard, offset, size and the masked
CRC32C of the stored bytes. Numeric tensors are raw row-major bytes in the writer's byte order,
read with one pread straight into the output array. Partitioned variables have a full-shape entry
listing slices, each stored under an OrderedCode key starting with NUL.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from slimtune.checkpoint.base import CheckpointReader, TensorInfo, empty_array, numel, pread_into
from slimtune.checkpoint.tf_proto import (
    TFDtype,
    Extent,
    check_coverage,
    check_tensor_name,
    decode_tensor_name,
    dtype_from_enum,
    dtype_name,
    encode_shape,
    parse_shape,
    parse_slice,
    region_shape,
    require_readable,
    slice_region,
    tensor_slice_key,
    to_tf_array,
)
from slimtune.checkpoint.tf_table import TableReader, TableWriter
from slimtune.errors import CheckpointError
from slimtune.utils.crc import crc32c, mask, unmask
from slimtune.utils.protowire import (
    FIXED32,
    LENGTH_DELIMITED,
    VARINT,
    WireError,
    encode_bytes_field,
    encode_fixed32_field,
    encode_varint,
    encode_varint_field,
    iter_fields,
    read_varint,
    to_signed64,
)

BUNDLE_VERSION = 1                    # kTensorBundleVersion
LITTLE_ENDIAN, BIG_ENDIAN = 0, 1
MAX_SHARDS = 99999                    # shard names have five digits
DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")


def strip_v2_suffix(path: str) -> str:
    """Turn `x.index` or `x.data-00000-of-00001` into the prefix `x`; leave others alone."""
    if path.endswith(".index"):
        return path[: -len(".index")]
    return DATA_SUFFIX.sub("", path)


def data_file(prefix: str, shard: int, num_shards: int) -> Path:
    """Path of one data shard."""
    return Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")


@dataclass(frozen=True)
class _Entry:
    dtype_enum: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int
    slices: tuple[tuple[Extent, ...], ...]


def _parse_entry(value: memoryview) -> _Entry:
    dtype_enum, shape, shard, offset, size, crc, slices = 0, (), 0, 0, 0, 0, []
    for field, wire_type, payload in iter_fields(value):
        if field == 1 and wire_type == VARINT:
            dtype_enum = payload
        elif field == 2 and wire_type == LENGTH_DELIMITED:
            shape = parse_shape(payload)
        elif field == 3 and wire_type == VARINT:
            shard = to_signed64(payload)
        elif field == 4 and wire_type == VARINT:
            offset = to_signed64(payload)
        elif field == 5 and wire_type == VARINT:
            size = to_signed64(payload)
        elif field == 6 and wire_type == FIXED32:
            crc = payload
        elif field == 7 and wire_type == LENGTH_DELIMITED:
            slices.append(parse_slice(payload))
    return _Entry(dtype_enum, shape, shard, offset, size, crc, tuple(slices))


class TFV2Reader(CheckpointReader):
    """Lazy reader for a V2 bundle given its prefix."""

    format = "tf_v2"

    def __init__(self, prefix: str | os.PathLike, *, verify_checksums: bool = True) -> None:
        self.prefix = str(prefix)
        self.verify_checksums = verify_checksums
        self._fds: dict[int, tuple[int, int]] = {}
        index_path = Path(self.prefix + ".index")
        table = TableReader(index_path, verify_checksums=verify_checksums)
        try:
            self._parse_index(table)
        except WireError as exc:
            raise CheckpointError(f"{index_path}: corrupt V2 index ({exc})") from None
        finally:
            table.close()   # the index is small and fully parsed: nothing to keep open
        infos = {name: TensorInfo(e.shape, dtype_name(e.dtype_enum), self._nbytes(e))
                 for name, e in self._entries.items()}
        super().__init__(self.prefix, infos)

    def _parse_index(self, table: TableReader) -> None:
        entries = table.entries()
        first = next(entries, None)
        if first is None or first.key != b"":
            raise CheckpointError(f"{table.path} has no bundle header: not a V2 checkpoint index")
        header = table.value(first)
        if header[:1] == b"\n":   # field 1 as a message: a V1 SavedTensorSlices, not a bundle header
            raise CheckpointError(f"{table.path} is a V1 checkpoint table, not a V2 index")
        self.num_shards, self.endianness = 1, LITTLE_ENDIAN
        for field, wire_type, payload in iter_fields(header):
            if field == 1 and wire_type == VARINT:
                self.num_shards = to_signed64(payload)
            elif field == 2 and wire_type == VARINT:
                self.endianness = payload
            elif field == 3 and wire_type == LENGTH_DELIMITED:
                require_readable(table.path, payload, BUNDLE_VERSION, "tensor-bundle reader")
            elif field in (1, 2, 3):
                raise WireError(f"bundle header field {field} has wire type {wire_type}")
        if not 0 <= self.num_shards <= MAX_SHARDS:
            raise CheckpointError(f"{table.path}: bundle header claims {self.num_shards} data shards")
        if self.endianness not in (LITTLE_ENDIAN, BIG_ENDIAN):
            raise CheckpointError(f"{table.path}: unknown endianness {self.endianness}")
        self._entries: dict[str, _Entry] = {}
        self._slice_entries: dict[bytes, _Entry] = {}
        self._keys: dict[str, bytes] = {}
        for entry in entries:
            parsed = _parse_entry(table.value(entry))
            if entry.key.startswith(b"\x00"):
                self._slice_entries[entry.key] = parsed
            else:
                name = decode_tensor_name(entry.key)
                self._entries[name] = parsed
                self._keys[name] = entry.key

    def _nbytes(self, entry: _Entry) -> int:
        dtype = dtype_from_enum(entry.dtype_enum)
        if dtype is not None and dtype.storage is not None:
            return numel(entry.shape) * np.dtype(dtype.storage).itemsize
        return entry.size

    # -- data shards ------------------------------------------------------------------------
    def _shard(self, shard: int) -> tuple[int, int]:
        if not 0 <= shard < self.num_shards:
            raise CheckpointError(f"{self.prefix}: an entry names shard {shard} of {self.num_shards}")
        opened = self._fds.get(shard)
        if opened is None:
            path = data_file(self.prefix, shard, self.num_shards)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise CheckpointError(f"V2 checkpoint {self.prefix} is missing its data file {path.name}") from None
            opened = (fd, os.fstat(fd).st_size)
            self._fds[shard] = opened
        return opened

    def _located(self, label: str, entry: _Entry) -> int:
        fd, file_size = self._shard(entry.shard)
        if entry.offset < 0 or entry.size < 0 or entry.offset + entry.size > file_size:
            raise CheckpointError(
                f"{label} in {self.prefix}: bytes [{entry.offset}, {entry.offset + entry.size}) lie outside "
                f"its {file_size}-byte data file"
            )
        return fd

    # -- reading ----------------------------------------------------------------------------
    def _read_raw(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        dtype = _known_dtype(name, self.prefix, entry)
        if entry.slices:
            return self._read_partitioned(name, entry, dtype)
        return self._read_entry(name, entry, dtype, None)

    def _read_entry(self, label: str, entry: _Entry, dtype: TFDtype, out: np.ndarray | None) -> np.ndarray:
        fd = self._located(label, entry)
        if dtype.storage is None:
            return self._read_strings(label, fd, entry)
        storage = np.dtype(dtype.storage)
        expected = numel(entry.shape) * storage.itemsize
        if entry.size != expected:
            raise CheckpointError(
                f"{label} in {self.prefix}: {entry.size} stored bytes for a {entry.shape} {dtype.name} tensor")
        array = empty_array(entry.shape, storage) if out is None else out
        pread_into(fd, array, entry.offset)
        if self.verify_checksums and unmask(entry.crc) != crc32c(array.reshape(-1).view(np.uint8)):
            raise CheckpointError(f"{label} in {self.prefix}: checksum mismatch (data file corrupt)")
        if self.endianness == BIG_ENDIAN:
            array.byteswap(inplace=True)
        return array

    def _read_strings(self, label: str, fd: int, entry: _Entry) -> np.ndarray:
        count = numel(entry.shape)
        if count == 0 and entry.size == 0:
            return np.empty(entry.shape, dtype=object)
        if count > entry.size:   # every element costs at least its one-byte length
            raise CheckpointError(f"{label} in {self.prefix}: {count} strings cannot fit in {entry.size} bytes")
        raw = os.pread(fd, entry.size, entry.offset)
        if len(raw) != entry.size:
            raise CheckpointError(f"{label} in {self.prefix}: data file ended early")
        lengths, pos, checksum_input = [], 0, bytearray()
        try:
            for _ in range(count):
                length, pos = read_varint(raw, pos)
                lengths.append(length)
                checksum_input += length.to_bytes(4 if length <= 0xFFFFFFFF else 8, "little")
        except WireError as exc:
            raise CheckpointError(f"{label} in {self.prefix}: corrupt string lengths ({exc})") from None
        if pos + 4 + sum(lengths) != entry.size:
            raise CheckpointError(f"{label} in {self.prefix}: string lengths do not add up to the stored size")
        stored_lengths_crc = int.from_bytes(raw[pos:pos + 4], "little")
        if self.verify_checksums:
            lengths_crc = crc32c(checksum_input)
            whole = crc32c(raw[pos + 4:], crc32c(raw[pos:pos + 4], lengths_crc))
            if unmask(stored_lengths_crc) != lengths_crc or unmask(entry.crc) != whole:
                raise CheckpointError(f"{label} in {self.prefix}: checksum mismatch (data file corrupt)")
        out = np.empty(count, dtype=object)
        cursor = pos + 4
        for i, length in enumerate(lengths):
            out[i] = raw[cursor:cursor + length]
            cursor += length
        return out.reshape(entry.shape)

    def _read_partitioned(self, name: str, entry: _Entry, dtype: TFDtype) -> np.ndarray:
        key = self._keys[name]
        regions = [slice_region(extents, entry.shape) for extents in entry.slices]
        parts = []
        for extents, region in zip(entry.slices, regions):
            part = self._slice_entries.get(tensor_slice_key(key, extents))
            label = f"{name} slice {extents}"
            if part is None:
                raise CheckpointError(f"{label} in {self.prefix}: the slice entry is missing")
            if part.slices:
                raise CheckpointError(f"{label} in {self.prefix}: a slice entry is itself partitioned")
            if part.dtype_enum != entry.dtype_enum or part.shape != region_shape(region):
                raise CheckpointError(f"{label} in {self.prefix}: slice entry dtype/shape disagrees with its variable")
            self._located(label, part)   # bounds-check every slice before allocating the whole
            needed = numel(part.shape) * (1 if dtype.storage is None else np.dtype(dtype.storage).itemsize)
            if (dtype.storage is not None and part.size != needed) or part.size < needed:
                raise CheckpointError(f"{label} in {self.prefix}: wrong stored size")
            parts.append((label, part, region))
        check_coverage(entry.shape, regions)
        out = np.empty(entry.shape, dtype=object) if dtype.storage is None else empty_array(entry.shape, dtype.storage)
        for label, part, region in parts:
            target = out[region]
            if dtype.storage is not None and target.flags.c_contiguous:
                self._read_entry(label, part, dtype, target)   # straight into place
            else:
                target[...] = self._read_entry(label, part, dtype, None)
        return out

    def close(self) -> None:
        """Close the data files."""
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds = {}
        super().close()


def _known_dtype(name: str, prefix: str, entry: _Entry) -> TFDtype:
    dtype = dtype_from_enum(entry.dtype_enum)
    if dtype is None:
        raise CheckpointError(f"{name} in {prefix} has dtype {dtype_name(entry.dtype_enum)}, which cannot be read")
    return dtype


# -------------------------------------------------------------------------------------------
# Writer
# -------------------------------------------------------------------------------------------
def _string_payload(array: np.ndarray) -> tuple[list[bytes], int]:
    items = list(array.reshape(-1))
    lengths = b"".join(encode_varint(len(s)) for s in items)
    checksum_input = b"".join(len(s).to_bytes(4 if len(s) <= 0xFFFFFFFF else 8, "little") for s in items)
    lengths_crc = crc32c(checksum_input)
    stored_crc = mask(lengths_crc).to_bytes(4, "little")
    whole = crc32c(stored_crc, lengths_crc)
    for item in items:
        whole = crc32c(item, whole)
    return [lengths, stored_crc, *items], whole


def write_v2(prefix: str | os.PathLike, tensors: Mapping[str, object], *, block_size: int = 256 * 1024) -> Path:
    """Write a one-shard V2 bundle TF can read; return the prefix."""
    prefix = strip_v2_suffix(str(prefix))
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors, key=check_tensor_name)
    entries = []
    offset = 0
    with open(data_file(prefix, 0, 1), "wb") as data:
        for name in names:
            dtype, array = to_tf_array(name, tensors[name])
            if dtype.storage is None:
                pieces, crc = _string_payload(array)
            else:
                flat = array.reshape(-1).view(np.uint8)
                pieces, crc = [flat], crc32c(flat)
            size = 0
            for piece in pieces:
                data.write(piece)
                size += len(piece)
            proto = encode_varint_field(1, dtype.enum) + encode_bytes_field(2, encode_shape(array.shape))
            if offset:
                proto += encode_varint_field(4, offset)
            if size:
                proto += encode_varint_field(5, size)
            if mask(crc):
                proto += encode_fixed32_field(6, mask(crc))
            entries.append((check_tensor_name(name), proto))
            offset += size
    header = encode_varint_field(1, 1) + encode_bytes_field(3, encode_varint_field(1, BUNDLE_VERSION))
    with open(prefix + ".index", "wb") as index:
        writer = TableWriter(index, block_size=block_size)
        writer.add(b"", header)
        for key, proto in entries:
            writer.add(key, proto)
        writer.finish()
    return Path(prefix)
