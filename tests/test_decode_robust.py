"""decode_image on the inputs real datasets contain: corrupt, truncated, CMYK, grayscale, alpha,
EXIF-rotated and 16-bit images, and manifests pointing at files that are gone."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from slimtune.data.decode import BadImageError, decode_image, decode_tensor, open_image, read_jpeg_header
from slimtune.data.manifest import ManifestSource
from slimtune.errors import DataError

PHOTO = skimage.data.chelsea()[40:104, 100:196]  # 64 x 96 RGB, a real photo crop


def _encode(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **save)
    return buffer.getvalue()


def _jpeg(array: np.ndarray = PHOTO, **save) -> bytes:
    # 4:4:4 chroma, so a fine-textured photo survives the round trip within ~1 grey level.
    return _encode(Image.fromarray(array), format="JPEG", quality=95, subsampling=0, **save)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A hand-made PNG (PIL cannot write 16-bit RGB), filter type 0 on every row."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) +
            _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))


def test_reference_decode():
    pixels = decode_image(_jpeg())
    assert pixels.shape == (64, 96, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - PHOTO).mean() < 2.0


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_jpeg_is_a_bad_image(fraction):
    data = _jpeg()
    with pytest.raises(BadImageError, match="photo.jpg: cannot decode image"):
        decode_image(data[: int(len(data) * fraction)], description="photo.jpg")


@pytest.mark.parametrize("payload", [b"GIF89a but not really", bytes(range(256)) * 4])
def test_garbage_bytes_are_a_bad_image(payload):
    with pytest.raises(BadImageError, match="cannot decode image"):
        decode_image(payload)


def test_empty_payload_says_empty_file():
    with pytest.raises(BadImageError, match=r"^image bytes: empty file \(0 bytes\)$"):
        decode_image(b"")


def test_corrupt_jpeg_scan_data_decodes_the_same_on_both_paths():
    # Random bytes inside the entropy-coded scan keep every marker intact: libjpeg resynchronises
    # and decodes (damaged blocks), as TF's decode_jpeg does. One outcome, the same on the Pillow
    # path and the torchvision path: this exact array, not an error on one and pixels on the other.
    data = bytearray(_jpeg())
    rng = np.random.default_rng(0)
    start = len(data) // 3
    data[start:start + 200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    pixels = decode_image(bytes(data))
    assert pixels.shape == (64, 96, 3)
    assert np.array_equal(decode_tensor(bytes(data)).permute(1, 2, 0).numpy(), pixels)
    assert np.abs(pixels.astype(int) - PHOTO).mean() > 10        # the damage shows; nothing hides it


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(BadImageError, match="file not found"):
        decode_image(tmp_path / "gone.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("not a jpeg")
    with pytest.raises(BadImageError, match="notes.jpg: cannot decode image"):
        decode_image(text)


def test_decompression_bomb_header_is_refused():
    # A tiny file claiming 100000 x 100000 pixels: refused before any allocation.
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")
    with pytest.raises(BadImageError):
        decode_image(bomb)


def test_cmyk_jpeg_comes_out_rgb():
    cmyk = _encode(Image.fromarray(PHOTO).convert("CMYK"), format="JPEG", quality=95)
    with Image.open(io.BytesIO(cmyk)) as image:
        assert image.mode == "CMYK"
    pixels = decode_image(cmyk)
    assert pixels.shape == (64, 96, 3)
    assert np.abs(pixels.astype(int) - PHOTO).mean() < 3.0


def test_grayscale_jpeg_to_three_or_one_channel():
    gray = skimage.data.camera()[::8, ::8]
    data = _encode(Image.fromarray(gray), format="JPEG", quality=95)
    rgb = decode_image(data)
    assert rgb.shape == gray.shape + (3,)
    assert (rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all()
    one = decode_image(data, channels=1)
    assert one.shape == gray.shape + (1,)
    assert np.abs(one[:, :, 0].astype(int) - gray).mean() < 2.0
    # An RGB photo asked for as one channel uses luma weights.
    luma = decode_image(_jpeg(), channels=1)[:, :, 0].astype(float)
    expected = PHOTO @ np.array([0.299, 0.587, 0.114])
    assert np.abs(luma - expected).mean() < 2.5


def test_png_alpha_is_composited_on_white():
    rgba = np.dstack([PHOTO, np.zeros(PHOTO.shape[:2], np.uint8)])
    rgba[:, 48:, 3] = 255           # right half opaque
    rgba[:10, :10, 3] = 128         # a half-transparent corner
    pixels = decode_image(_encode(Image.fromarray(rgba), format="PNG"))
    assert (pixels[:, 10:48] == 255).all()
    np.testing.assert_array_equal(pixels[:, 48:], PHOTO[:, 48:])
    blended = PHOTO[:10, :10] * (128 / 255) + 255 * (1 - 128 / 255)
    assert np.abs(pixels[:10, :10] - blended).max() <= 1.0


def test_palette_png_with_transparency_is_composited_on_white():
    palette_image = Image.fromarray(PHOTO).convert("P", palette=Image.ADAPTIVE, colors=16)
    index = np.asarray(palette_image)[0, 0]
    data = _encode(palette_image, format="PNG", transparency=int(index))
    pixels = decode_image(data)
    transparent = np.asarray(palette_image) == index
    assert transparent.any() and (pixels[transparent] == 255).all()


def test_exif_orientation_6_decodes_rotated():
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to view
    data = _jpeg(exif=exif.tobytes())
    pixels = decode_image(data)
    assert pixels.shape == (96, 64, 3)
    upright = np.rot90(PHOTO, k=-1)
    assert np.abs(pixels.astype(int) - upright).mean() < 2.0
    assert np.abs(pixels.astype(int) - np.rot90(PHOTO, k=1)).mean() > 20  # not the other way round
    # The same orientation through a file path and with JPEG draft decoding.
    drafted = decode_image(data, draft_size=(32, 48))
    assert drafted.shape[0] > drafted.shape[1] and drafted.shape[0] >= 48 and drafted.shape[1] >= 32


def test_draft_size_keeps_both_sides_at_least_the_request():
    big = np.asarray(Image.fromarray(skimage.data.astronaut()))
    data = _jpeg(big)
    pixels = decode_image(data, draft_size=(100, 100))
    assert min(pixels.shape[:2]) >= 100 and max(pixels.shape[:2]) < 512


def test_16_bit_grayscale_png_is_scaled_to_8_bit():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    data = _encode(Image.fromarray(ramp), format="PNG")
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode.startswith("I")
    pixels = decode_image(data, channels=1)[:, :, 0].astype(int)
    assert np.abs(pixels - ramp.astype(int) / 257).max() <= 1.0


def test_dark_16_bit_png_stays_dark():
    # Regression: the bit depth used to be guessed from the pixel values, so a dark 16-bit image
    # (max <= 255) was read as 8-bit and came out 256x too bright.
    dark = np.full((8, 8), 200, np.uint16)  # 200/65535: black
    pixels = decode_image(_encode(Image.fromarray(dark), format="PNG"), channels=1)
    assert pixels.max() <= 1


def test_16_bit_rgb_png_keeps_the_high_byte():
    rgb16 = (PHOTO[:8, :8].astype(np.uint16) * 257 + 100).astype(">u2")  # big-endian, as PNG stores it
    rows = b"".join(b"\x00" + row.tobytes() for row in rgb16)
    pixels = decode_image(_png(8, 8, 16, 2, rows))
    assert pixels.shape == (8, 8, 3)
    assert np.abs(pixels.astype(int) - PHOTO[:8, :8]).max() <= 1


def test_manifest_line_pointing_at_a_missing_file_is_reported(tmp_path):
    Image.fromarray(PHOTO).save(tmp_path / "cat.jpg")
    manifest = tmp_path / "list.csv"
    manifest.write_text("cat.jpg,cat\nmissing.jpg,cat\n")
    source = ManifestSource(manifest)
    assert len(source) == 1 and [(n, p.name) for n, p in source.missing] == [(2, "missing.jpg")]
    assert decode_image(source.read(0)[0]).shape == PHOTO.shape
    with pytest.raises(DataError, match="list.csv: 1 of 2 lines point at missing images"):
        ManifestSource(manifest, skip_missing=False)


# ---- open_image / LazyImage: header first, the training loader's decode path ----------------

def _lazy_pixels(payload, channels=3, min_size=None) -> np.ndarray:
    with open_image(payload) as image:
        return image.decode(channels, min_size).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("save", [dict(quality=90), dict(quality=95, subsampling=0),
                                  dict(quality=85, progressive=True), dict(quality=75, optimize=True)],
                         ids=["420", "444", "progressive", "optimized"])
def test_lazy_decode_gives_the_pixels_pillow_gives(save):
    photo = skimage.data.astronaut()[::2, ::2]
    data = _encode(Image.fromarray(photo), format="JPEG", **save)
    with open_image(data) as image:
        assert image.jpeg is not None and (image.height, image.width) == (256, 256)  # parsed, no Pillow
        assert image._decode_with_torchvision(3) is not None     # ... and decoded by torchvision
    np.testing.assert_array_equal(_lazy_pixels(data), decode_image(data))


def test_lazy_decode_of_grayscale_cmyk_and_png_matches_decode_image():
    gray = _encode(Image.fromarray(skimage.data.camera()[::8, ::8]), format="JPEG", quality=90)
    cmyk = _encode(Image.fromarray(PHOTO).convert("CMYK"), format="JPEG", quality=95)
    png = _encode(Image.fromarray(PHOTO), format="PNG")
    for data in (gray, cmyk, png, _jpeg()):
        for channels in (3, 1):
            np.testing.assert_array_equal(_lazy_pixels(data, channels), decode_image(data, channels))


def test_jpeg_header_parser_agrees_with_pillow():
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "camera maker"       # another tag before the orientation one
    rotated = _jpeg(exif=exif.tobytes())
    plain_exif = Image.Exif()
    plain_exif[0x010F] = "no orientation"
    cases = {"plain": _jpeg(), "rotated": rotated, "exif without orientation": _jpeg(exif=plain_exif.tobytes()),
             "gray": _encode(Image.fromarray(PHOTO[:, :, 0]), format="JPEG"),
             "progressive": _jpeg(progressive=True)}
    for name, data in cases.items():
        header = read_jpeg_header(data)
        with Image.open(io.BytesIO(data)) as image:
            assert (header.width, header.height) == image.size, name
            assert header.components == len(image.getbands()), name
            assert header.orientation == image.getexif().get(0x0112, 1), name
    assert read_jpeg_header(_encode(Image.fromarray(PHOTO), format="PNG")) is None
    assert read_jpeg_header(b"\xff\xd8\xff\xe0\x00") is None           # cut inside the first segment
    for cut in range(0, 400, 7):                                       # any prefix: a header or None
        header = read_jpeg_header(rotated[:cut])
        assert header is None or (header.height, header.width) == (64, 96)


def test_lazy_image_reports_the_upright_size_and_decodes_upright():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(exif=exif.tobytes())
    with open_image(data) as image:
        assert (image.height, image.width) == (96, 64)
        pixels = image.decode().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(pixels, decode_image(data))
    drafted = _lazy_pixels(data, min_size=(40, 30))          # 1/2 scale still covers 40 x 30
    assert drafted.shape == (48, 32, 3)
    assert np.abs(drafted.astype(int) - np.rot90(PHOTO, k=-1)[::2, ::2]).mean() < 8


def test_lazy_decode_picks_the_coarsest_dct_scale_that_covers_min_size():
    big = _encode(Image.fromarray(skimage.data.astronaut()), format="JPEG", quality=90)   # 512 x 512
    for min_size, side in (((300, 300), 512), ((256, 200), 256), ((100, 120), 128), ((60, 20), 64),
                           (None, 512)):
        with open_image(big) as image:
            assert image.dct_scale(min_size) == 512 // side
            assert tuple(image.decode(3, min_size).shape) == (3, side, side)
    png = _encode(Image.fromarray(skimage.data.astronaut()), format="PNG")
    with open_image(png) as image:
        assert image.dct_scale((60, 60)) == 1          # DCT scaling is a JPEG thing


@pytest.mark.parametrize("payload", [b"", b"not an image at all", b"\xff\xd8\xff\xdb garbage"])
def test_lazy_open_or_decode_of_garbage_is_a_bad_image(payload):
    with pytest.raises(BadImageError):
        with open_image(payload) as image:
            image.decode()


def test_lazy_decode_of_truncated_jpeg_and_missing_file(tmp_path):
    data = _jpeg()
    with pytest.raises(BadImageError, match="cannot decode"):
        with open_image(data[: len(data) // 2], "half.jpg") as image:
            assert (image.height, image.width) == (64, 96)     # the header survived the cut
            image.decode()
    with pytest.raises(BadImageError, match="file not found"):
        open_image(tmp_path / "gone.jpg")
    (tmp_path / "ok.jpg").write_bytes(data)
    assert decode_tensor(tmp_path / "ok.jpg").shape == (3, 64, 96)


def test_lazy_image_of_an_array():
    with open_image(PHOTO) as image:
        assert (image.height, image.width) == (64, 96)
        assert torch.equal(image.decode(), torch.from_numpy(PHOTO).permute(2, 0, 1))
        assert image.decode(1).shape == (1, 64, 96)
