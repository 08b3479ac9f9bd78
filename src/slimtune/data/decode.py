"""Decode image payloads into uint8 arrays the way users expect (EXIF, CMYK, alpha, grayscale)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DataError
from .base import Payload


class BadImageError(DataError):
    """An image could not be decoded (corrupt, truncated, missing or not an image)."""


def _open(payload: bytes | str | Path) -> Image.Image:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(payload)))
    return Image.open(payload)


def decode_image(payload: Payload, channels: int = 3, draft_size: tuple[int, int] | None = None,
                 description: str = "") -> np.ndarray:
    """Decode a payload to a uint8 HWC array with `channels` (1 or 3) channels.

    EXIF orientation is applied, CMYK / palette / 16-bit images are converted, and transparent
    pixels are composited on white (what a viewer shows). `draft_size=(w, h)` lets JPEG decoding
    use reduced-size DCT scaling while keeping both sides at least that large: a cheap speed-up
    for training, where the image is resized anyway. Raises BadImageError naming the image.
    """
    if isinstance(payload, np.ndarray):
        return _array_to_channels(payload, channels, description)
    try:
        with _open(payload) as image:
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB" if channels == 3 else "L", draft_size)
            image = ImageOps.exif_transpose(image)
            image = _to_mode(image, "RGB" if channels == 3 else "L")
            array = np.array(image, dtype=np.uint8)  # writable: torch.from_numpy needs it
    except BadImageError:
        raise
    except FileNotFoundError as error:
        raise BadImageError(f"{description or payload}: file not found") from error
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        name = description or (str(payload) if not isinstance(payload, (bytes, bytearray)) else "image bytes")
        raise BadImageError(f"{name}: cannot decode image ({error})") from error
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert to RGB or L, compositing any transparency onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L"):
        # As TF's decode_png(dtype=uint8): keep the high byte of 16-bit samples.
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    elif image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode != mode:
        image = image.convert(mode)
    return image


def _array_to_channels(array: np.ndarray, channels: int, description: str) -> np.ndarray:
    """Bring an in-memory array to uint8 HWC with the requested channel count."""
    if array.dtype != np.uint8:
        raise BadImageError(f"{description or 'array'}: expected uint8 pixels, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise BadImageError(f"{description or 'array'}: expected HxW, HxWx1, HxWx3 or HxWx4, got {array.shape}")
    if array.shape[2] == 4:
        alpha = array[:, :, 3:4].astype(np.float32) / 255.0
        array = (array[:, :, :3] * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    if channels == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 1 and array.shape[2] == 3:
        # ITU-R 601 luma weights, as tf.image.rgb_to_grayscale.
        gray = array.astype(np.float32) @ np.array([0.2989, 0.587, 0.114], dtype=np.float32)
        array = np.clip(gray + 0.5, 0, 255).astype(np.uint8)[:, :, None]
    return np.ascontiguousarray(array)
