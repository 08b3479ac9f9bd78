"""Decode image payloads into uint8 pixels the way users expect (EXIF, CMYK, alpha, grayscale).

Two entry points:
- ``decode_image``: a payload to a HWC numpy array, through Pillow.
- ``open_image``: reads only the header, so that a training pipeline can draw its random crop
  from the image size first and then decode just the resolution that crop needs
  (``LazyImage.decode(min_size=...)``, a CHW torch tensor): JPEGs much larger than the crop are
  decoded at 1/2, 1/4 or 1/8 size by libjpeg-turbo's DCT scaling, which skips most of the work.
  Plain JPEGs decoded at full size go through torchvision's libjpeg-turbo binding instead of
  Pillow: the same library and settings (accurate integer IDCT, fancy upsampling), so the same
  pixels (a test checks it), in about two thirds of the time Pillow takes to decode and hand over
  a 500x375 photo. Their headers are parsed here rather than by Pillow, which is several times
  cheaper. Anything else (other formats, CMYK, EXIF rotation, a JPEG torchvision refuses, or a
  torchvision without image support) goes through Pillow, which also names the problem of a
  broken file.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DataError
from .base import Payload

_EXIF_ORIENTATION = 0x0112
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)   # EXIF orientations whose upright view swaps width and height
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class BadImageError(DataError):
    """An image could not be decoded (corrupt, truncated, missing or not an image)."""

    def __init__(self, message: object = "") -> None:
        # A DataLoader worker's error is re-raised in the main process as this class built from
        # "Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback ...": keep
        # only the original one-line message (the file and the reason), not the worker's traceback.
        text = str(message)
        if text.startswith("Caught BadImageError") and "Traceback" in text:
            last = [line for line in text.strip().splitlines() if line.strip()][-1]
            text = last.split("BadImageError: ", 1)[-1]
        super().__init__(text)


# Images with more pixels are refused from their header, before any decode allocates for them
# (a 12000x12000 PNG is 430 MB of RGB, per decode, per worker). Pillow warns at ~89 M pixels and
# refuses at twice that; 50 M still admits a 48-megapixel phone photo. Set by --max_image_pixels,
# through the environment so that spawned loader workers see it too.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_PIXELS_ENV = "SLIMTUNE_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int:
    """The pixel limit in force (the environment's, else DEFAULT_MAX_IMAGE_PIXELS)."""
    value = os.environ.get(MAX_IMAGE_PIXELS_ENV, "")
    return int(value) if value.isascii() and value.isdigit() and int(value) > 0 else DEFAULT_MAX_IMAGE_PIXELS


def set_max_image_pixels(limit: int) -> None:
    """Set the pixel limit for this process and the loader workers it starts."""
    if type(limit) is not int or limit < 1:
        raise DataError(f"--max_image_pixels must be a positive integer, got {limit!r}")
    os.environ[MAX_IMAGE_PIXELS_ENV] = str(limit)


def _check_pixels(width: int, height: int, name: str) -> None:
    limit = max_image_pixels()
    if width * height > limit:
        raise BadImageError(f"{name}: {width}x{height} image ({width * height} pixels) is over the limit of "
                            f"{limit} pixels (--max_image_pixels)")


class UnreadablePayload:
    """Stands in for the image of a record that could not be read (a TFRecord feature of the
    wrong kind, a malformed Example): decoding it raises BadImageError with the reason, so a
    training loader skips and counts it like any corrupt image."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"UnreadablePayload({self.reason!r})"


def _bad_image(payload: Any, description: str, error: BaseException) -> BadImageError:
    """The BadImageError for a failed read, open or decode, naming the image."""
    if isinstance(error, FileNotFoundError):
        return BadImageError(f"{description or payload}: file not found")
    name = description or _payload_name(payload)
    if _is_empty(payload):
        return BadImageError(f"{name}: empty file (0 bytes)")
    # PIL's message names an internal BytesIO object, which tells the user nothing.
    reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))
    return BadImageError(f"{name}: cannot decode image ({reason})")


def _is_empty(payload: Any) -> bool:
    """True for an empty payload or a 0-byte file (worth saying plainly: a failed copy)."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return len(payload) == 0
    try:
        return isinstance(payload, (str, Path)) and os.path.getsize(payload) == 0
    except OSError:
        return False


def _payload_name(payload: Any) -> str:
    return "image bytes" if isinstance(payload, (bytes, bytearray, memoryview)) else str(payload)


def _open(payload: bytes | str | Path) -> Image.Image:
    # Our own pixel limit (below Pillow's) refuses big images right after this; Pillow's warning
    # about them would only be noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
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
    if isinstance(payload, UnreadablePayload):
        raise BadImageError(payload.reason)
    try:
        with _open(payload) as image:
            _check_pixels(*image.size, description or _payload_name(payload))
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB" if channels == 3 else "L", draft_size)
            return _pillow_pixels(image, channels)
    except BadImageError:
        raise
    except _DECODE_ERRORS as error:
        raise _bad_image(payload, description, error) from error


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright) of an opened image.

    Formats other than JPEG are decoded first: reading their EXIF may decode the image (PNG), and
    a decode failure swallowed there would leave a blank image behind for the real decode
    (Pillow does not retry a failed load). JPEGs stay undecoded so draft() can still scale them.
    """
    if image.format != "JPEG":
        image.load()
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: show the pixels as stored, as viewers do
        return 1


def _pillow_pixels(image: Image.Image, channels: int, orientation: Optional[int] = None) -> np.ndarray:
    """Decode an opened Pillow image to uint8 HWC: upright, in RGB or L."""
    if orientation is None:
        orientation = _orientation(image)
    if orientation != 1:
        image = ImageOps.exif_transpose(image)      # (a copy; skipped for upright images)
    image = _to_mode(image, "RGB" if channels == 3 else "L")
    array = np.array(image, dtype=np.uint8)  # writable: torch.from_numpy needs it
    return array[:, :, None] if array.ndim == 2 else array


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


# --------------------------------------------------------------------------------------------
# Header first, pixels later
# --------------------------------------------------------------------------------------------

_torchvision_decoder: Any = None     # (op, RGB mode, GRAY mode) once looked up; False if unusable


def _torchvision_jpeg() -> Any:
    """torchvision's JPEG decoding op and its RGB / GRAY mode numbers; False where it cannot decode.

    The op behind torchvision.io.decode_jpeg is called directly: the public function (deprecated
    in torchvision 0.29 in favour of torchcodec) warns on every call. A probe decode checks the op
    works here; if anything about it fails, Pillow decodes everything.
    """
    global _torchvision_decoder
    if _torchvision_decoder is None:
        try:
            from torchvision.io import ImageReadMode
            op = torch.ops.image.decode_jpeg
            probe = io.BytesIO()
            Image.new("RGB", (8, 8), (200, 100, 50)).save(probe, format="JPEG")
            pixels = op(torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8), ImageReadMode.RGB.value)
            if tuple(pixels.shape) != (3, 8, 8) or pixels.dtype != torch.uint8:
                raise RuntimeError(f"unexpected probe decode {tuple(pixels.shape)} {pixels.dtype}")
            _torchvision_decoder = (op, ImageReadMode.RGB.value, ImageReadMode.GRAY.value)
        except Exception:  # noqa: BLE001 - any failure just means: decode with Pillow
            _torchvision_decoder = False
    return _torchvision_decoder


class JpegHeader(NamedTuple):
    """What the start of a JPEG file says: stored size, colour components, EXIF orientation."""

    height: int
    width: int
    components: int
    orientation: int


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic).
_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def read_jpeg_header(data: bytes) -> Optional[JpegHeader]:
    """Parse a JPEG's markers up to its frame header, in a fraction of what opening it with Pillow costs.

    None when `data` is not a JPEG or its header is malformed (Pillow then decides what it is).
    """
    if data[:2] != b"\xff\xd8":
        return None
    position, orientation, size, exif_seen = 2, 1, len(data), False
    while position + 4 <= size:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:                       # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:   # markers without a length
            position += 2
            continue
        length = int.from_bytes(data[position + 2:position + 4], "big")
        if length < 2 or position + 2 + length > size:
            return None
        segment = data[position + 4:position + 2 + length]
        if marker == 0xE1 and segment[:6] == b"Exif\x00\x00" and not exif_seen:   # the first one counts
            orientation, exif_seen = _exif_orientation(segment[6:]), True
        elif marker in _SOF_MARKERS:
            if len(segment) < 6:
                return None
            height, width = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
            return JpegHeader(height, width, segment[5], orientation) if height and width else None
        elif marker in (0xDA, 0xD9):             # scan data or end of image before any frame header
            return None
        position += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag (0x0112) of a TIFF-structured EXIF block's first IFD; 1 when absent or unreadable."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for entry in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        offset = ifd + 2 + 12 * entry
        if offset + 12 > len(tiff):
            return 1
        if int.from_bytes(tiff[offset:offset + 2], order) == _EXIF_ORIENTATION:
            value = int.from_bytes(tiff[offset + 8:offset + 10], order)   # a SHORT, left-aligned
            return value if 1 <= value <= 8 else 1
    return 1


class LazyImage:
    """An image whose header is read and whose pixels are not: its size comes for free.

    ``height`` and ``width`` are those of the upright image (after EXIF orientation), which is
    what ``decode`` returns. JPEG headers are parsed directly; other formats (and JPEGs that need
    more than a plain decode) are opened with Pillow. Use as a context manager or call ``close``.
    """

    def __init__(self, payload: Payload, description: str = "") -> None:
        self.payload = payload
        self.description = description
        self.data: Optional[bytes] = None
        self.array: Optional[np.ndarray] = None
        self.jpeg: Optional[JpegHeader] = None
        self._image: Optional[Image.Image] = None
        self.orientation = 1
        if isinstance(payload, UnreadablePayload):
            raise BadImageError(payload.reason)
        if isinstance(payload, np.ndarray):
            self.array = payload
            self.height, self.width = int(payload.shape[0]), int(payload.shape[1])
            return
        try:
            if isinstance(payload, (bytes, bytearray, memoryview)):
                self.data = bytes(payload)
            else:
                self.data = Path(payload).read_bytes()
        except _DECODE_ERRORS as error:
            raise _bad_image(payload, description, error) from error
        header = read_jpeg_header(self.data)
        name = description or _payload_name(payload)
        if header is not None:
            _check_pixels(header.width, header.height, name)
            self.jpeg, self.orientation = header, header.orientation
            height, width = header.height, header.width
        else:  # not a JPEG (or a header we do not parse): Pillow reads the size
            image = self.image
            width, height = image.size
            _check_pixels(width, height, name)
            try:
                self.orientation = _orientation(image)
            except _DECODE_ERRORS as error:
                raise _bad_image(payload, description, error) from error
        if self.orientation in _SWAPPED_ORIENTATIONS:
            width, height = height, width
        self.height, self.width = height, width

    @property
    def image(self) -> Image.Image:
        """The payload opened with Pillow (header only until decoded); BadImageError if it cannot be."""
        if self._image is None:
            try:
                self._image = _open(self.data)
            except _DECODE_ERRORS as error:
                raise _bad_image(self.payload, self.description, error) from error
        return self._image

    def __enter__(self) -> "LazyImage":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the decoder."""
        if self._image is not None:
            self._image.close()

    def _is_jpeg(self) -> bool:
        return self.jpeg is not None or (self.data is not None and self.image.format == "JPEG")

    def dct_scale(self, min_size: Optional[tuple[int, int]]) -> int:
        """The DCT scaling (1, 2, 4 or 8) decode(min_size=...) uses: the largest keeping both sides >= min_size."""
        if min_size is None or self.array is not None or not self._is_jpeg():
            return 1
        min_height, min_width = min_size
        for scale in (8, 4, 2):
            if self.height >= scale * min_height and self.width >= scale * min_width:
                return scale
        return 1

    def decode(self, channels: int = 3, min_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Decode to a uint8 (channels, H, W) tensor, upright, in RGB (3) or L (1).

        `min_size=(h, w)`: a JPEG may be decoded at 1/2, 1/4 or 1/8 size as long as both sides
        stay >= (h, w) (slightly different pixels from a full decode followed by a resize; meant
        for training augmentation). Raises BadImageError naming the image.
        """
        if self.array is not None:
            return torch.from_numpy(_array_to_channels(self.array, channels, self.description)).permute(2, 0, 1)
        scale = self.dct_scale(min_size)
        if scale == 1:
            pixels = self._decode_with_torchvision(channels)
            if pixels is not None:
                return pixels
        image = self.image
        try:
            if scale > 1:
                # Pillow picks the same scale from the requested size (in stored orientation).
                height, width = min_size
                if self.orientation in _SWAPPED_ORIENTATIONS:
                    height, width = width, height
                image.draft("RGB" if channels == 3 else "L", (width, height))
            array = _pillow_pixels(image, channels, self.orientation)
        except BadImageError:
            raise
        except _DECODE_ERRORS as error:
            raise _bad_image(self.payload, self.description, error) from error
        return torch.from_numpy(array).permute(2, 0, 1)

    def _decode_with_torchvision(self, channels: int) -> Optional[torch.Tensor]:
        """A full-size decode of a plain upright JPEG by torchvision; None where Pillow must do it."""
        header = self.jpeg
        if header is None or header.orientation != 1:
            return None
        if not ((channels == 3 and header.components in (1, 3)) or (channels == 1 and header.components == 1)):
            return None  # CMYK, and RGB -> L, whose conversion rule is Pillow's
        decoder = _torchvision_jpeg()
        if not decoder:
            return None
        decode_jpeg, rgb, gray = decoder
        try:
            data = torch.frombuffer(bytearray(self.data), dtype=torch.uint8)
            return decode_jpeg(data, rgb if channels == 3 else gray)
        except RuntimeError:
            return None   # truncated or otherwise refused: Pillow decodes it or says what is wrong


def open_image(payload: Payload, description: str = "") -> LazyImage:
    """Read an image's header (size, format, EXIF orientation) without decoding its pixels.

    Raises BadImageError naming the image when it is missing or not an image at all.
    """
    return LazyImage(payload, description)


def decode_tensor(payload: Payload, channels: int = 3, min_size: Optional[tuple[int, int]] = None,
                  description: str = "") -> torch.Tensor:
    """open_image(...).decode(...): a uint8 (channels, H, W) tensor; see LazyImage.decode."""
    with open_image(payload, description) as image:
        return image.decode(channels, min_size)
