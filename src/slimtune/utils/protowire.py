"""Minimal protobuf wire-format codec: enough for TF checkpoints and tf.train.Example.

We parse by hand instead of depending on generated protobuf classes: the messages involved are
tiny, and hand parsing lets fixed-width packed payloads become zero-copy numpy views.
Every length is checked against the buffer, so hostile input raises `WireError` instead of
allocating or reading past the end.
"""

from __future__ import annotations

import struct
from typing import Iterator

VARINT, FIXED64, LENGTH_DELIMITED, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def read_varint(buf: bytes | memoryview, pos: int, end: int | None = None) -> tuple[int, int]:
    """Decode a base-128 varint at `pos`; return (value, position after it)."""
    if end is None:
        end = len(buf)
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer (or a negative int64, two's complement) as a varint."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def to_signed64(value: int) -> int:
    """Interpret a decoded varint as a signed 64-bit integer."""
    return value - (1 << 64) if value >= 1 << 63 else value


def iter_fields(buf: bytes | memoryview, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, object]]:
    """Yield (field_number, wire_type, value) for each field of a message.

    value is an int for VARINT / FIXED32 / FIXED64 (raw unsigned) and a memoryview slice for
    LENGTH_DELIMITED. Groups are rejected: no TF message we read uses them. A thin view over
    `iter_field_spans`, the one place where field bounds are checked.
    """
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    for field, wire_type, value, value_start in iter_field_spans(view, start, end):
        if wire_type == LENGTH_DELIMITED:
            yield field, wire_type, view[value_start:value_start + value]
        else:
            yield field, wire_type, value


def unpack_varints(payload: bytes | memoryview) -> list[int]:
    """Decode a packed repeated varint field."""
    values = []
    pos, end = 0, len(payload)
    while pos < end:
        value, pos = read_varint(payload, pos, end)
        values.append(value)
    return values


def encode_key(field: int, wire_type: int) -> bytes:
    """Encode a field key."""
    return encode_varint((field << 3) | wire_type)


def encode_bytes_field(field: int, data: bytes) -> bytes:
    """Encode a length-delimited field."""
    return encode_key(field, LENGTH_DELIMITED) + encode_varint(len(data)) + data


def encode_varint_field(field: int, value: int) -> bytes:
    """Encode a varint field."""
    return encode_key(field, VARINT) + encode_varint(value)


def encode_fixed32_field(field: int, value: int) -> bytes:
    """Encode a fixed32 field."""
    return encode_key(field, FIXED32) + struct.pack("<I", value)


def iter_field_spans(
    buf: bytes | memoryview, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field_number, wire_type, value, value_start) for each field, positions instead of views.

    For LENGTH_DELIMITED fields `value` is the payload length and the payload is
    buf[value_start:value_start + value]; otherwise `value` is the decoded integer. Knowing
    positions lets a caller map a payload back to a file offset (e.g. to copy it with pread).
    """
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    end = len(view) if end is None else min(end, len(view))   # never read past the buffer
    pos = start
    while pos < end:
        key, pos = read_varint(view, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        value_start = pos
        if wire_type == VARINT:
            value, pos = read_varint(view, pos, end)
        elif wire_type == FIXED64:
            if pos + 8 > end:
                raise WireError("truncated fixed64")
            value = int.from_bytes(view[pos:pos + 8], "little")
            pos += 8
        elif wire_type == FIXED32:
            if pos + 4 > end:
                raise WireError("truncated fixed32")
            value = int.from_bytes(view[pos:pos + 4], "little")
            pos += 4
        elif wire_type == LENGTH_DELIMITED:
            value, pos = read_varint(view, pos, end)
            if value > end - pos:
                raise WireError("length-delimited field runs past the end of the message")
            value_start = pos
            pos += value
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        yield field, wire_type, value, value_start
