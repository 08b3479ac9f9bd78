"""TFRecord files and tf.train.Example messages, read and written without TensorFlow.

Record framing (TF's record_writer.cc): each record is a little-endian uint64 length, the masked
CRC32C of those 8 bytes, the payload, and the masked CRC32C of the payload. A whole file may be
wrapped in GZIP or ZLIB. Files are streamed record by record: a shard is never loaded whole, and
a corrupt length can never make us allocate more than the file holds.

tf.train.Example is decoded by hand (see `slimtune.utils.protowire`), keeping every value of every
feature: bytes lists become ``list[bytes]``, float lists ``np.float32`` arrays, int64 lists
``np.int64`` arrays.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, Sequence, Union

import numpy as np

from ..errors import DataError
from ..utils import protowire as pw
from ..utils.crc import crc32c, mask, masked_crc32c

# Compression names as TF spells them in TFRecordOptions / TFRecordDataset(compression_type=...).
NONE, GZIP, ZLIB = "", "GZIP", "ZLIB"
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
# Read huge payloads in pieces, so a corrupt length in a compressed stream (where the file size
# says nothing about the decompressed size) fails as "truncated" instead of as MemoryError.
_READ_CHUNK = 16 << 20
# No image record comes near this; a compressed stream can claim any length (its file size bounds
# nothing), so a record longer than this is refused before it is read into memory.
MAX_RECORD_BYTES = 256 << 20

FeatureValue = Union[list, np.ndarray]


class TFRecordError(DataError):
    """A TFRecord file or a tf.train.Example inside it is corrupt, truncated or malformed."""


# --------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------

def _normalise_compression(compression: str | None) -> str:
    name = (compression or "").upper()
    if name not in (NONE, GZIP, ZLIB):
        raise DataError(f"unknown TFRecord compression {compression!r}: use None, 'GZIP' or 'ZLIB'")
    return name


def _looks_like_framed_record(head: bytes) -> bool:
    """True when the first 12 bytes are a record header whose length CRC checks out."""
    if len(head) < 12:
        return False
    length_bytes = head[:8]
    (stored,) = struct.unpack("<I", head[8:12])
    return masked_crc32c(length_bytes) == stored


def sniff_compression(path: str | os.PathLike) -> str:
    """Tell whether a TFRecord file is plain, GZIP or ZLIB from its first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(12)
    if not head or _looks_like_framed_record(head):
        # A false positive for compressed data needs a 32-bit CRC collision.
        return NONE
    if head[:2] == b"\x1f\x8b":
        return GZIP
    if len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] * 256 + head[1]) % 31 == 0:
        return ZLIB
    raise TFRecordError(f"{path}: not a TFRecord file (the first record header fails its CRC and "
                        "the file is neither GZIP nor ZLIB compressed)")


class _ZlibReader(io.RawIOBase):
    """Streaming zlib decompression as a readable raw stream (gzip has this built in, zlib not)."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._inflater = zlib.decompressobj()
        self._input = b""
        self._output = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._output:
            if self._inflater.eof:
                return 0
            if not self._input:
                self._input = self._raw.read(1 << 16)
                if not self._input:
                    raise EOFError("compressed stream ended before the end-of-stream marker")
            # Bounded output per call: a zlib bomb cannot balloon memory.
            self._output = self._inflater.decompress(self._input, 1 << 20)
            self._input = self._inflater.unconsumed_tail
        size = min(len(buffer), len(self._output))
        buffer[:size] = self._output[:size]
        self._output = self._output[size:]
        return size

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_for_reading(path: Path, compression: str) -> BinaryIO:
    raw = open(path, "rb")
    if compression == GZIP:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == ZLIB:
        return io.BufferedReader(_ZlibReader(raw), buffer_size=1 << 16)  # type: ignore[return-value]
    return raw


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    """Read exactly `size` bytes (fewer only at end of stream), never allocating ahead of the data."""
    if size <= _READ_CHUNK:
        return stream.read(size)
    pieces = []
    remaining = size
    while remaining:
        piece = stream.read(min(remaining, _READ_CHUNK))
        if not piece:
            break
        pieces.append(piece)
        remaining -= len(piece)
    return b"".join(pieces)


def _skip(stream: BinaryIO, size: int, seekable: bool) -> int:
    """Move past `size` bytes; return how many were actually available."""
    if seekable:
        here = stream.tell()
        end = stream.seek(0, io.SEEK_END)
        moved = min(size, end - here)
        stream.seek(here + moved)
        return moved
    skipped = 0
    while skipped < size:
        piece = stream.read(min(size - skipped, _READ_CHUNK))
        if not piece:
            break
        skipped += len(piece)
    return skipped


def _frames(path: Path, verify: bool, codec: str, wanted) -> Iterator[tuple[int, bytes | None]]:
    """Walk the records of a file: yield (index, payload) for wanted indices, (index, None) else."""
    try:
        stream = _open_for_reading(path, codec)
    except FileNotFoundError as error:
        raise DataError(f"TFRecord file not found: {path}") from error
    seekable = codec == NONE
    where = "byte" if seekable else "decompressed byte"
    with stream:
        index = 0
        offset = 0
        while True:
            try:
                header = _read_exact(stream, 12)
                if not header:
                    return
                if len(header) < 12:
                    raise TFRecordError(f"{path}: truncated record header at {where} {offset} "
                                        f"(record {index}; the file was cut short)")
                length, length_crc = _HEADER.unpack(header)
                if (verify or not seekable) and masked_crc32c(header[:8]) != length_crc:
                    # Without a trusted length the next record cannot be found. A compressed
                    # stream has no file size to bound a bogus length, so it is checked there
                    # even when verification is off.
                    raise TFRecordError(f"{path}: corrupt record {index} at {where} {offset}: "
                                        "length CRC mismatch")
                if not seekable and length > MAX_RECORD_BYTES:   # plain files: bounded by their size
                    raise TFRecordError(f"{path}: record {index} at {where} {offset} claims {length} bytes, "
                                        f"over the limit of {MAX_RECORD_BYTES} bytes per record")
                want = wanted(index)
                if want:
                    payload: bytes | None = _read_exact(stream, length)
                    got = len(payload)
                else:
                    payload = None
                    got = _skip(stream, length, seekable)
                footer = stream.read(4) if got == length else b""
            except (OSError, EOFError, zlib.error) as error:
                raise TFRecordError(f"{path}: cannot decompress {codec} data near record {index} "
                                    f"({error})") from error
            if got < length or len(footer) < 4:
                raise TFRecordError(f"{path}: truncated record {index} at {where} {offset}: "
                                    f"header says {length} bytes, the file ends first")
            if want and verify and masked_crc32c(payload) != _FOOTER.unpack(footer)[0]:
                raise TFRecordError(f"{path}: corrupt record {index} at {where} {offset}: "
                                    "data CRC mismatch")
            yield index, payload
            offset += 16 + length
            index += 1


def _codec_for(path: Path, compression: str | None) -> str:
    return sniff_compression(path) if compression == "auto" else _normalise_compression(compression)


def iter_tfrecord(path: str | os.PathLike, verify: bool = True, compression: str | None = "auto",
                  start: int = 0, step: int = 1) -> Iterator[bytes]:
    """Yield the payload of every record of a TFRecord file, streaming.

    verify: check both masked CRC32Cs of each record (a corrupt record raises TFRecordError
    naming the file, record number and byte offset). compression: None/'' (plain), 'GZIP',
    'ZLIB' or 'auto' (sniffed from the first bytes). start/step: yield only records
    start, start+step, ... (how DataLoader workers split one shard); in plain files the payloads
    of the other records are seeked over, not read.
    """
    if step < 1 or start < 0:
        raise ValueError(f"iter_tfrecord needs start >= 0 and step >= 1, got start={start}, step={step}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"TFRecord file not found: {path}")
    wanted = lambda index: index >= start and (index - start) % step == 0  # noqa: E731
    for _, payload in _frames(path, verify, _codec_for(path, compression), wanted):
        if payload is not None:
            yield payload


def count_records(path: str | os.PathLike, compression: str | None = "auto") -> int:
    """Count the records of a TFRecord file (plain files are walked with seeks, not read)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"TFRecord file not found: {path}")
    return sum(1 for _ in _frames(path, False, _codec_for(path, compression), lambda index: False))


class TFRecordWriter:
    """Write records to a TFRecord file, optionally GZIP or ZLIB compressed.

    The file appears under its final name only when the writer is closed without an exception,
    so an interrupted conversion never leaves a truncated shard that a reader would trust.
    Use as a context manager, or call `close()`.
    """

    def __init__(self, path: str | os.PathLike, compression: str | None = None, level: int = 6):
        self.path = Path(path)
        self.compression = _normalise_compression(compression)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._raw = open(self._tmp, "wb")
        self._zlib = None
        self._gzip = None
        if self.compression == GZIP:
            # mtime=0 and no file name: identical input gives byte-identical output.
            self._gzip = gzip.GzipFile(filename="", fileobj=self._raw, mode="wb", compresslevel=level,
                                       mtime=0)
        elif self.compression == ZLIB:
            self._zlib = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS)
        self.num_records = 0
        self._closed = False

    def _emit(self, data: bytes) -> None:
        if self._gzip is not None:
            self._gzip.write(data)
        elif self._zlib is not None:
            self._raw.write(self._zlib.compress(data))
        else:
            self._raw.write(data)

    def write(self, record: bytes) -> None:
        """Append one record."""
        if self._closed:
            raise ValueError(f"TFRecordWriter for {self.path} is closed")
        length = struct.pack("<Q", len(record))
        self._emit(length + struct.pack("<I", mask(crc32c(length))))
        self._emit(record)
        self._emit(struct.pack("<I", masked_crc32c(record)))
        self.num_records += 1

    def write_example(self, features: Mapping[str, object]) -> None:
        """Encode a feature dict as a tf.train.Example (see `encode_example`) and append it."""
        self.write(encode_example(features))

    def close(self) -> None:
        """Finish the stream and move the file to its final name."""
        if self._closed:
            return
        if self._gzip is not None:
            self._gzip.close()
        elif self._zlib is not None:
            self._raw.write(self._zlib.flush())
        self._raw.close()
        os.replace(self._tmp, self.path)
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far; the final file is not created."""
        if self._closed:
            return
        self._raw.close()
        self._tmp.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> "TFRecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------
# tf.train.Example
# --------------------------------------------------------------------------------------------
# Field numbers: Example.features=1; Features.feature=1 (map entry: key=1, value=2);
# Feature: bytes_list=1, float_list=2, int64_list=3; each list's values are field 1.

def _decode_feature(view: memoryview) -> FeatureValue:
    kind = None
    for field, wire_type, value in pw.iter_fields(view):
        if wire_type != pw.LENGTH_DELIMITED or field not in (1, 2, 3):
            continue
        kind = field
        body = value
    if kind is None:
        return []  # a Feature with no list set: TF parses it as an empty VarLen feature
    if kind == 1:
        items = []
        for field, wire_type, value in pw.iter_fields(body):
            if field == 1 and wire_type == pw.LENGTH_DELIMITED:
                items.append(bytes(value))
        return items
    if kind == 2:
        chunks = []
        for field, wire_type, value in pw.iter_fields(body):
            if field != 1:
                continue
            if wire_type == pw.LENGTH_DELIMITED:  # packed (what TF writes)
                if len(value) % 4:
                    raise pw.WireError("packed float list length is not a multiple of 4")
                chunks.append(np.frombuffer(value, dtype="<f4"))
            elif wire_type == pw.FIXED32:
                chunks.append(np.array([value], dtype="<u4").view("<f4"))
        return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    values: list[int] = []
    for field, wire_type, value in pw.iter_fields(body):
        if field != 1:
            continue
        if wire_type == pw.LENGTH_DELIMITED:
            values.extend(pw.unpack_varints(value))
        elif wire_type == pw.VARINT:
            values.append(value)  # type: ignore[arg-type]
    return np.array([pw.to_signed64(v & ((1 << 64) - 1)) for v in values], dtype=np.int64)


def parse_example(data: bytes | memoryview) -> dict[str, FeatureValue]:
    """Decode a serialized tf.train.Example into {key: values}, keeping every value.

    bytes_list -> list[bytes]; float_list -> float32 array; int64_list -> int64 array; a feature
    with no list -> []. Arrays are copies, so they do not pin the record (and its image) in memory.
    Raises TFRecordError when the bytes are not a well-formed Example.
    """
    features: dict[str, FeatureValue] = {}
    try:
        for field, wire_type, value in pw.iter_fields(data):
            if field != 1 or wire_type != pw.LENGTH_DELIMITED:
                continue
            for entry_field, entry_type, entry in pw.iter_fields(value):
                if entry_field != 1 or entry_type != pw.LENGTH_DELIMITED:
                    continue
                key = None
                feature: FeatureValue = []
                for part, part_type, part_value in pw.iter_fields(entry):
                    if part == 1 and part_type == pw.LENGTH_DELIMITED:
                        key = bytes(part_value).decode("utf-8")
                    elif part == 2 and part_type == pw.LENGTH_DELIMITED:
                        feature = _decode_feature(part_value)
                if key is None:
                    raise pw.WireError("feature map entry without a key")
                features[key] = feature  # protobuf map semantics: the last entry for a key wins
    except (pw.WireError, UnicodeDecodeError) as error:
        raise TFRecordError(f"malformed tf.train.Example: {error}") from error
    return features


def _feature_kind(key: str, values: object) -> tuple[int, object]:
    """Pick bytes_list (1), float_list (2) or int64_list (3) for a Python/numpy value."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "SOU" or values.dtype == object:
            return 1, [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values.ravel()]
        if values.dtype.kind in "iub":
            return 3, values.ravel().astype(np.int64)
        if values.dtype.kind == "f":
            return 2, values.ravel().astype("<f4")
        raise TypeError(f"feature {key!r}: unsupported array dtype {values.dtype}")
    if isinstance(values, (bytes, bytearray, memoryview, str)):
        values = [values]
    elif isinstance(values, (int, float, np.integer, np.floating, bool, np.bool_)):
        values = [values]
    items = list(values)  # type: ignore[call-overload]
    if not items:
        raise TypeError(f"feature {key!r}: cannot tell the type of an empty list; pass an empty "
                        "numpy array with the dtype (np.int64, np.float32) or [b''][:0] as bytes")
    if all(isinstance(v, (bytes, bytearray, memoryview, str)) for v in items):
        return 1, [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in items]
    if all(isinstance(v, (int, np.integer, bool, np.bool_)) for v in items):
        return 3, np.array([int(v) for v in items], dtype=np.int64)
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in items):
        return 2, np.array(items, dtype="<f4")
    raise TypeError(f"feature {key!r}: values must be all bytes/str, all ints or all floats")


def _encode_feature(key: str, values: object) -> bytes:
    kind, items = _feature_kind(key, values)
    if kind == 1:
        body = b"".join(pw.encode_bytes_field(1, item) for item in items)  # type: ignore[union-attr]
    elif kind == 2:
        packed = np.asarray(items, dtype="<f4").tobytes()
        body = pw.encode_bytes_field(1, packed) if packed else b""
    else:
        packed = b"".join(pw.encode_varint(int(v)) for v in items)  # type: ignore[union-attr]
        body = pw.encode_bytes_field(1, packed) if packed else b""
    return pw.encode_bytes_field(kind, body)


def encode_example(features: Mapping[str, object]) -> bytes:
    """Serialize {key: values} as a tf.train.Example, in the dict's order.

    bytes/str (or lists of them) -> bytes_list; ints, bools and integer arrays -> int64_list
    (packed); floats and float arrays -> float_list (packed). A single value becomes a list of one.
    """
    entries = []
    for key, values in features.items():
        entry = pw.encode_bytes_field(1, key.encode("utf-8")) + pw.encode_bytes_field(2, _encode_feature(key, values))
        entries.append(pw.encode_bytes_field(1, entry))
    return pw.encode_bytes_field(1, b"".join(entries))


def iter_examples(path: str | os.PathLike, verify: bool = True, compression: str | None = "auto",
                  start: int = 0, step: int = 1) -> Iterator[dict[str, FeatureValue]]:
    """Yield every tf.train.Example of a TFRecord file, parsed (see `parse_example`)."""
    for index, record in enumerate(iter_tfrecord(path, verify, compression, start, step)):
        try:
            yield parse_example(record)
        except TFRecordError as error:
            raise TFRecordError(f"{path}: record {start + index * step}: {error}") from error


def write_tfrecord(path: str | os.PathLike, records: Sequence[bytes], compression: str | None = None) -> None:
    """Write a list of records to one file (convenience for small files and tests)."""
    with TFRecordWriter(path, compression) as writer:
        for record in records:
            writer.write(record)
