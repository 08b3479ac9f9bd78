"""TensorFlow's copy of the LevelDB table ("SSTable") format: the container of V1 checkpoints
and of V2 `.index` files. A reader (mmap-based, bounds- and CRC-checked) and a writer.

Layout: data blocks, an (empty) metaindex block, an index block, and a 48-byte footer holding the
two handles and a magic number. Every block is followed by a 5-byte trailer: compression type
(0 none, 1 snappy) and the masked CRC32C of the stored bytes plus that type byte. Entries inside a
block share key prefixes with their predecessor; a restart array at the block's end is only
needed for binary search, which a full scan does not do.

Large blocks (one V1 tensor can be a 400 MB block) are never copied: values are memoryviews over
the mmap, their CRC is checked lazily in chunks, and pages we are done with are handed back to
the kernel so a full read never holds the file twice in RSS.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from slimtune.checkpoint import snappy
from slimtune.errors import CheckpointError
from slimtune.utils.crc import crc32c, mask, unmask
from slimtune.utils.protowire import WireError, encode_varint, read_varint

TABLE_MAGIC = 0xDB4775248B80FB57
MAGIC_BYTES = struct.pack("<Q", TABLE_MAGIC)
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
NO_COMPRESSION = 0
SNAPPY_COMPRESSION = 1

# Blocks up to this size are CRC-checked when first parsed; bigger ones when a value is read.
EAGER_VERIFY_LIMIT = 1 << 20
# Work on huge blocks in pieces of this size, releasing each piece's pages afterwards.
CHUNK_BYTES = 16 << 20
# Prefix compression lets a hostile block expand tiny entries into huge keys: cap one key (TF
# names are short) and the bytes of all keys together, relative to the file.
MAX_KEY_BYTES = 1 << 16
KEY_BYTES_PER_FILE_BYTE = 16
# Decompressed snappy blocks kept in memory for repeated access (they are small in practice).
_SNAPPY_CACHE_BYTES = 64 << 20
_PAGE = mmap.PAGESIZE


class TableFormatError(ValueError):
    """The table bytes are malformed (wrapped into CheckpointError by the readers)."""


@dataclass(frozen=True)
class BlockHandle:
    """Where a block lives: `size` excludes the 5-byte trailer."""

    offset: int
    size: int


@dataclass(frozen=True)
class TableEntry:
    """One key/value pair: the value is block_contents(block)[start:start + length]."""

    key: bytes
    block: int
    start: int
    length: int


def decode_block_handle(buf: bytes | memoryview, pos: int, end: int) -> tuple[BlockHandle, int]:
    """Decode two varint64s (offset, size) at `pos`."""
    offset, pos = read_varint(buf, pos, end)
    size, pos = read_varint(buf, pos, end)
    return BlockHandle(offset, size), pos


def encode_block_handle(handle: BlockHandle) -> bytes:
    """Encode a BlockHandle as two varints."""
    return encode_varint(handle.offset) + encode_varint(handle.size)


def iter_block_entries(contents: memoryview) -> Iterator[tuple[bytes, int, int]]:
    """Yield (key, value_start, value_length) for every entry of a decompressed block."""
    size = len(contents)
    if size < 4:
        raise TableFormatError("block shorter than its restart count")
    num_restarts = struct.unpack_from("<I", contents, size - 4)[0]
    if num_restarts > (size - 4) // 4:
        raise TableFormatError(f"block claims {num_restarts} restart points, more than fit in {size} bytes")
    limit = size - 4 - 4 * num_restarts
    pos = 0
    previous = b""
    while pos < limit:
        shared, pos = read_varint(contents, pos, limit)
        non_shared, pos = read_varint(contents, pos, limit)
        value_length, pos = read_varint(contents, pos, limit)
        if shared > len(previous):
            raise TableFormatError(f"entry shares {shared} key bytes with a {len(previous)}-byte key")
        if non_shared > limit - pos:
            raise TableFormatError("entry key runs past the end of the block")
        if shared + non_shared > MAX_KEY_BYTES:
            raise TableFormatError(f"entry key of {shared + non_shared} bytes")
        key = previous[:shared] + bytes(contents[pos:pos + non_shared])
        pos += non_shared
        if value_length > limit - pos:
            raise TableFormatError("entry value runs past the end of the block")
        yield key, pos, value_length
        pos += value_length
        previous = key


class TableReader:
    """Read-only view of one table file: its data blocks, entries and values."""

    def __init__(self, path: str | os.PathLike, *, verify_checksums: bool = True) -> None:
        self.path = Path(path)
        self.verify_checksums = verify_checksums
        self._file = open(self.path, "rb")
        try:
            self.file_size = os.fstat(self._file.fileno()).st_size
            if self.file_size < FOOTER_SIZE:
                raise CheckpointError(f"{self.path} is {self.file_size} bytes, too short to be a TF checkpoint table")
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._view = memoryview(self._mmap)
            if self._view[-8:] != MAGIC_BYTES:
                raise CheckpointError(f"{self.path} is not a TF checkpoint table (wrong magic number at its end)")
            self._snappy_cache: dict[int, bytes] = {}
            self._verified: set[int] = set()
            self._read_footer_and_index()
        except CheckpointError:
            self.close()
            raise
        except (TableFormatError, WireError, snappy.SnappyError) as exc:
            self.close()
            raise CheckpointError(f"{self.path}: corrupt table ({exc})") from None

    # -- structure --------------------------------------------------------------------------
    def _read_footer_and_index(self) -> None:
        footer_start = self.file_size - FOOTER_SIZE
        footer = self._view[footer_start:self.file_size - 8]
        metaindex, pos = decode_block_handle(footer, 0, len(footer))
        index, _ = decode_block_handle(footer, pos, len(footer))
        for name, handle in (("metaindex", metaindex), ("index", index)):
            if handle.offset + handle.size + BLOCK_TRAILER_SIZE > footer_start:
                raise TableFormatError(f"{name} block handle points past the footer")
        contents = self._block_contents_at(index)
        self.blocks: list[BlockHandle] = []
        data_end = min(index.offset, metaindex.offset)
        previous_end = 0
        for _, start, length in iter_block_entries(contents):
            handle, _ = decode_block_handle(contents, start, start + length)
            # Data blocks come first, in order and without overlap; anything else (including an
            # index pointing at itself or twice at one block) is corruption, not a valid table.
            if handle.offset < previous_end:
                raise TableFormatError("index block handles overlap or are out of order")
            previous_end = handle.offset + handle.size + BLOCK_TRAILER_SIZE
            if previous_end > data_end:
                raise TableFormatError("data block handle points past the start of the index")
            self.blocks.append(handle)

    def _block_contents_at(self, handle: BlockHandle) -> memoryview:
        """Return verified, decompressed contents of a block that is not cached (the index)."""
        compression = self._mmap[handle.offset + handle.size]
        self._check_crc(handle)
        return self._decode(handle, compression)

    def _decode(self, handle: BlockHandle, compression: int) -> memoryview:
        raw = self._view[handle.offset:handle.offset + handle.size]
        if compression == NO_COMPRESSION:
            return raw
        if compression == SNAPPY_COMPRESSION:
            return memoryview(snappy.decompress(raw))
        raise TableFormatError(f"bad block compression type {compression}")

    def _check_crc(self, handle: BlockHandle) -> None:
        if not self.verify_checksums:
            return
        end = handle.offset + handle.size
        crc = 0
        release = handle.size > CHUNK_BYTES
        for start in range(handle.offset, end, CHUNK_BYTES):
            stop = min(start + CHUNK_BYTES, end)
            crc = crc32c(self._view[start:stop], crc)
            if release:
                self.release(start, stop - start)
        crc = crc32c(self._view[end:end + 1], crc)
        stored = struct.unpack_from("<I", self._mmap, end + 1)[0]
        if unmask(stored) != crc:
            raise CheckpointError(
                f"{self.path}: checksum mismatch in the block at byte {handle.offset} (file corrupt or truncated)"
            )

    # -- access -----------------------------------------------------------------------------
    def compression(self, block: int) -> int:
        """Return the compression type byte of a data block."""
        handle = self.blocks[block]
        return self._mmap[handle.offset + handle.size]

    def block_contents(self, block: int, *, verify: bool = True) -> memoryview:
        """Return a data block's contents (decompressed); CRC-check it first unless told not to."""
        handle = self.blocks[block]
        compression = self._mmap[handle.offset + handle.size]
        try:
            if compression == SNAPPY_COMPRESSION:
                cached = self._snappy_cache.get(block)
                if cached is not None:
                    return memoryview(cached)
                self._check_crc(handle)  # never decompress unchecked bytes
                self._verified.add(block)
                data = snappy.decompress(self._view[handle.offset:handle.offset + handle.size])
                if len(data) <= EAGER_VERIFY_LIMIT:
                    if sum(map(len, self._snappy_cache.values())) + len(data) > _SNAPPY_CACHE_BYTES:
                        self._snappy_cache.clear()
                    self._snappy_cache[block] = data
                return memoryview(data)
            if verify and block not in self._verified:
                self._check_crc(handle)
                self._verified.add(block)
            return self._decode(handle, compression)
        except (TableFormatError, snappy.SnappyError) as exc:
            raise CheckpointError(f"{self.path}: corrupt block at byte {handle.offset} ({exc})") from None

    def entries(self) -> Iterator[TableEntry]:
        """Yield every entry in key order; keys must be strictly increasing across the table."""
        previous: bytes | None = None
        key_budget = KEY_BYTES_PER_FILE_BYTE * self.file_size + MAX_KEY_BYTES
        for block, handle in enumerate(self.blocks):
            contents = self.block_contents(block, verify=handle.size <= EAGER_VERIFY_LIMIT)
            try:
                for key, start, length in iter_block_entries(contents):
                    if previous is not None and key <= previous:
                        raise TableFormatError("keys are not strictly increasing")
                    key_budget -= len(key)
                    if key_budget < 0:
                        raise TableFormatError("keys expand to far more bytes than the file holds")
                    previous = key
                    yield TableEntry(key, block, start, length)
            except (TableFormatError, WireError) as exc:
                raise CheckpointError(f"{self.path}: corrupt block at byte {handle.offset} ({exc})") from None
            finally:
                del contents

    def value(self, entry: TableEntry, *, verify: bool = True) -> memoryview:
        """Return an entry's value bytes (a view; over the mmap for uncompressed blocks)."""
        contents = self.block_contents(entry.block, verify=verify)
        return contents[entry.start:entry.start + entry.length]

    def value_file_offset(self, entry: TableEntry) -> int | None:
        """Return the file offset of an entry's value, or None when its block is compressed."""
        if self.compression(entry.block) != NO_COMPRESSION:
            return None
        return self.blocks[entry.block].offset + entry.start

    def is_verified(self, block: int) -> bool:
        """Whether a block's CRC has been checked (always true when checks are off)."""
        return not self.verify_checksums or block in self._verified

    def verify_block_with(self, block: int, inner_start: int, inner: np.ndarray) -> None:
        """CRC-check an uncompressed block whose bytes [inner_start, inner_start + len) the caller
        has already read into `inner` (so a huge payload is checksummed from its destination
        array instead of being paged in through the mmap a second time)."""
        if self.is_verified(block):
            return
        handle = self.blocks[block]
        inner_bytes = inner.reshape(-1).view(np.uint8)
        inner_end = inner_start + len(inner_bytes)
        if inner_end > handle.size:
            raise CheckpointError(f"{self.path}: value runs past its block at byte {handle.offset}")
        start, end = handle.offset, handle.offset + handle.size
        crc = crc32c(self._view[start:start + inner_start])
        crc = crc32c(inner_bytes, crc)
        crc = crc32c(self._view[start + inner_end:end + 1], crc)
        if unmask(struct.unpack_from("<I", self._mmap, end + 1)[0]) != crc:
            raise CheckpointError(
                f"{self.path}: checksum mismatch in the block at byte {handle.offset} (file corrupt or truncated)"
            )
        self._verified.add(block)

    def fileno(self) -> int:
        """The open file's descriptor (for pread)."""
        return self._file.fileno()

    def release(self, offset: int, length: int) -> None:
        """Tell the kernel we are done with these file bytes, so they leave our RSS."""
        if length < _PAGE or not hasattr(self._mmap, "madvise"):
            return
        start = (offset // _PAGE) * _PAGE
        stop = min(offset + length, self.file_size)
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)
        except (OSError, ValueError):
            pass  # only an optimisation

    def close(self) -> None:
        """Unmap and close the file (safe to call twice)."""
        self._snappy_cache = {}
        view = getattr(self, "_view", None)
        if view is not None:
            try:
                view.release()
            except BufferError:
                pass  # a caller still holds a value view; the mapping dies with it
            self._view = None
        mapping = getattr(self, "_mmap", None)
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass
            self._mmap = None
        if not self._file.closed:
            self._file.close()


# -------------------------------------------------------------------------------------------
# Writer
# -------------------------------------------------------------------------------------------
class _BlockBuilder:
    def __init__(self, restart_interval: int) -> None:
        self.restart_interval = restart_interval
        self.buffer = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""
        self.entries = 0

    def add(self, key: bytes, value: bytes | memoryview) -> None:
        shared = 0
        if self.counter < self.restart_interval:
            limit = min(len(key), len(self.last_key))
            while shared < limit and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buffer))
            self.counter = 0
        self.buffer += encode_varint(shared) + encode_varint(len(key) - shared) + encode_varint(len(value))
        self.buffer += key[shared:]
        self.buffer += value
        self.last_key = key
        self.counter += 1
        self.entries += 1

    def size_estimate(self) -> int:
        return len(self.buffer) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        restarts = struct.pack(f"<{len(self.restarts)}I", *self.restarts)
        return bytes(self.buffer) + restarts + struct.pack("<I", len(self.restarts))


class TableWriter:
    """Write a table TF can read: add() keys in strictly increasing order, then finish()."""

    def __init__(
        self,
        out: BinaryIO,
        *,
        block_size: int = 256 * 1024,
        restart_interval: int = 16,
        compression: int = NO_COMPRESSION,
    ) -> None:
        if compression not in (NO_COMPRESSION, SNAPPY_COMPRESSION):
            raise ValueError(f"unknown compression type {compression}")
        self._out = out
        self._offset = 0
        self.block_size = block_size
        self.restart_interval = restart_interval
        self.compression = compression
        self._block = _BlockBuilder(restart_interval)
        self._index: list[tuple[bytes, BlockHandle]] = []
        self._last_key: bytes | None = None

    def add(self, key: bytes, value: bytes | memoryview) -> None:
        """Append one entry; keys must be strictly increasing (bytewise)."""
        if self._last_key is not None and key <= self._last_key:
            raise ValueError(f"table keys must be strictly increasing: {key!r} after {self._last_key!r}")
        # TF closes the current block before an entry that would make it grossly oversized.
        if self._block.entries and len(key) + len(value) >= 2 * self.block_size:
            self._flush()
        self._block.add(key, value)
        self._last_key = key
        if self._block.size_estimate() >= self.block_size:
            self._flush()

    def _flush(self) -> None:
        if not self._block.entries:
            return
        handle = self._write_block(self._block.finish(), self.compression)
        self._index.append((self._block.last_key, handle))
        self._block = _BlockBuilder(self.restart_interval)

    def _write_block(self, contents: bytes, compression: int) -> BlockHandle:
        stored, kind = contents, NO_COMPRESSION
        if compression == SNAPPY_COMPRESSION:
            packed = snappy.compress(contents)
            if len(packed) < len(contents) - len(contents) // 8:  # same 12.5% rule as LevelDB
                stored, kind = packed, SNAPPY_COMPRESSION
        trailer_type = bytes((kind,))
        crc = mask(crc32c(trailer_type, crc32c(stored)))
        self._out.write(stored)
        self._out.write(trailer_type + struct.pack("<I", crc))
        handle = BlockHandle(self._offset, len(stored))
        self._offset += len(stored) + BLOCK_TRAILER_SIZE
        return handle

    def finish(self) -> None:
        """Write the pending block, the metaindex and index blocks and the footer."""
        self._flush()
        metaindex = self._write_block(_BlockBuilder(self.restart_interval).finish(), NO_COMPRESSION)
        index_builder = _BlockBuilder(1)
        for key, handle in self._index:
            index_builder.add(key, encode_block_handle(handle))
        index = self._write_block(index_builder.finish(), NO_COMPRESSION)
        handles = encode_block_handle(metaindex) + encode_block_handle(index)
        self._out.write(handles + b"\0" * (40 - len(handles)) + MAGIC_BYTES)
        self._offset += FOOTER_SIZE
