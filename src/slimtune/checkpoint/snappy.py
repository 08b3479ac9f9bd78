"""Raw (block-format) snappy, as used inside TF/LevelDB table blocks, in pure Python.

Only old V1 checkpoints (and some TF 1.1-era merged V2 indexes) carry snappy blocks, and those
blocks hold metadata or small tensors: a float weight block rarely shrinks by the 12.5% TF's
table builder demands before keeping the compressed form. So a small pure-Python decoder is
enough and saves a compiled dependency. `compress` exists so tests and fixture scripts can build
snappy-compressed tables without TensorFlow or a snappy library.

Format: a varint with the uncompressed length, then elements. The low two bits of each tag byte
select a literal (0), or a back-reference copy with a 1-, 2- or 4-byte offset (1, 2, 3).
"""

from __future__ import annotations

from slimtune.utils.protowire import WireError, encode_varint, read_varint

# The densest snappy element is a 2-byte-offset copy: 3 input bytes -> 64 output bytes. A stream
# that claims more output than 22x its own size is lying, so we refuse before allocating.
MAX_EXPANSION = 22


class SnappyError(ValueError):
    """The bytes are not a valid raw snappy stream."""


def uncompressed_length(data: bytes | memoryview) -> int:
    """Return the uncompressed length a snappy stream declares."""
    try:
        length, _ = read_varint(data, 0, min(len(data), 5))
    except WireError as exc:
        raise SnappyError(f"bad length preamble ({exc})") from None
    return length


def decompress(data: bytes | memoryview, max_length: int | None = None) -> bytes:
    """Decompress a raw snappy stream; raise SnappyError on any malformation."""
    src = bytes(data)
    end = len(src)
    try:
        expected, pos = read_varint(src, 0, min(end, 5))
    except WireError as exc:
        raise SnappyError(f"bad length preamble ({exc})") from None
    if expected > 0xFFFFFFFF:
        raise SnappyError("declared length does not fit in 32 bits")
    if expected > MAX_EXPANSION * end:
        raise SnappyError(f"declared length {expected} is impossible for {end} compressed bytes")
    if max_length is not None and expected > max_length:
        raise SnappyError(f"declared length {expected} exceeds the limit {max_length}")
    out = bytearray(expected)
    written = 0
    while pos < end:
        tag = src[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal
            length = tag >> 2
            if length >= 60:
                extra = length - 59
                if pos + extra > end:
                    raise SnappyError("truncated literal length")
                length = int.from_bytes(src[pos:pos + extra], "little")
                pos += extra
            length += 1
            if pos + length > end:
                raise SnappyError("literal runs past the end of the input")
            if written + length > expected:
                raise SnappyError("output longer than declared")
            out[written:written + length] = src[pos:pos + length]
            pos += length
            written += length
            continue
        if kind == 1:
            if pos + 1 > end:
                raise SnappyError("truncated copy element")
            length = 4 + ((tag >> 2) & 7)
            offset = ((tag >> 5) << 8) | src[pos]
            pos += 1
        else:
            width = 2 if kind == 2 else 4
            if pos + width > end:
                raise SnappyError("truncated copy element")
            length = 1 + (tag >> 2)
            offset = int.from_bytes(src[pos:pos + width], "little")
            pos += width
        if offset == 0 or offset > written:
            raise SnappyError(f"copy offset {offset} outside the {written} bytes written so far")
        if written + length > expected:
            raise SnappyError("output longer than declared")
        start = written - offset
        if offset >= length:
            out[written:written + length] = out[start:start + length]
        else:  # overlapping copy: the last `offset` bytes repeat (run-length encoding)
            pattern = bytes(out[start:written])
            out[written:written + length] = (pattern * (length // offset + 1))[:length]
        written += length
    if written != expected:
        raise SnappyError(f"stream ended after {written} of {expected} declared bytes")
    return bytes(out)


def _emit_literal(out: bytearray, data: bytes, start: int, stop: int) -> None:
    while start < stop:
        length = min(stop - start, 1 << 16)
        n = length - 1
        if n < 60:
            out.append(n << 2)
        elif n < 1 << 8:
            out += bytes((60 << 2, n))
        else:
            out.append(61 << 2)
            out += n.to_bytes(2, "little")
        out += data[start:start + length]
        start += length


def _emit_copy(out: bytearray, offset: int, length: int) -> None:
    while length > 0:
        # Keep the remainder >= 4 so a final short piece never needs a special case.
        piece = min(length, 64) if length - 64 >= 4 or length <= 64 else 60
        out.append(((piece - 1) << 2) | 2)
        out += offset.to_bytes(2, "little")
        length -= piece


def compress(data: bytes | memoryview) -> bytes:
    """Compress to a raw snappy stream (greedy 4-byte matching; for tests and fixtures)."""
    src = bytes(data)
    out = bytearray(encode_varint(len(src)))
    table: dict[bytes, int] = {}
    literal_start = 0
    pos = 0
    end = len(src)
    while pos + 4 <= end:
        key = src[pos:pos + 4]
        candidate = table.get(key)
        table[key] = pos
        if candidate is None or pos - candidate > 0xFFFF:
            pos += 1
            continue
        length = 4
        while pos + length < end and src[candidate + length] == src[pos + length]:
            length += 1
        _emit_literal(out, src, literal_start, pos)
        _emit_copy(out, pos - candidate, length)
        pos += length
        literal_start = pos
    _emit_literal(out, src, literal_start, end)
    return bytes(out)
