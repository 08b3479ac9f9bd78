"""CRC32C (Castagnoli) and TensorFlow's masked form, used by TF tables, bundles and TFRecords."""

from __future__ import annotations

import crc32c as _crc32c

_MASK_DELTA = 0xA282EAD8


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """Return the CRC32C of `data`, continuing from a previous `value`."""
    return _crc32c.crc32c(data, value)


def mask(crc: int) -> int:
    """Mask a CRC as TensorFlow stores it (rotate right 15, add a constant)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    """Invert `mask`."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """Return the masked CRC32C of `data`, as found in TF files."""
    return mask(crc32c(data))
