"""TensorFlow-compatible image ops on CHW torch tensors: the pieces slim's preprocessing uses.

Every function here reproduces the arithmetic of the TF op slim called (TF1 semantics, which is
what the published checkpoints were trained and evaluated with), not just its intent:

- ``resize_bilinear_tf1`` is ``tf.image.resize_bilinear(align_corners=False)`` from TF1: output
  pixel ``d`` samples input coordinate ``d * in / out`` (float32), with no half-pixel shift and no
  antialiasing, interpolating along x first and then y exactly as TF's CPU kernel does. PIL,
  ``F.interpolate`` and torchvision all differ from it by many intensity levels on real photos.
- The resize is separable, so ``resize_bilinear_tf1_window`` computes just a window of the resized
  image (and can mirror it) by gathering the rows and columns that window needs. Training
  pipelines that keep only a crop never pay for the rest of the resized image.
- Colour ops (brightness, contrast, saturation, hue), ``per_image_standardization``,
  ``rgb_to_grayscale``, ``central_crop``, ``crop_or_pad`` and ``sample_distorted_bounding_box``
  follow the formulas of the matching TF kernels, including their rounding and tie rules.

Images are ``(C, H, W)`` tensors. Geometric ops accept uint8 or float32; colour ops work on float32
(values in whatever range the caller uses, as in TF). Random draws come from torch's global RNG or
an explicit ``generator``, so DataLoader worker seeding and ``torch.manual_seed`` reproduce a run.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError

Tensor = torch.Tensor

# tf.image.rgb_to_grayscale's weights (ITU-R BT.601 luma, as TF rounds them).
GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)

# tf.image.resize_images' method numbering (ResizeMethodV1), used by inception's non-fast mode.
RESIZE_BILINEAR, RESIZE_NEAREST, RESIZE_BICUBIC, RESIZE_AREA = 0, 1, 2, 3
RESIZE_METHODS = {"bilinear": RESIZE_BILINEAR, "nearest": RESIZE_NEAREST,
                  "bicubic": RESIZE_BICUBIC, "area": RESIZE_AREA}


class CropBox(NamedTuple):
    """A crop window in pixels: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int


# --------------------------------------------------------------------------------------------
# Input checks and random draws
# --------------------------------------------------------------------------------------------

def check_image(image: Tensor, what: str = "image") -> None:
    """Raise DataError unless `image` is a uint8 (C, H, W) tensor with 1 or 3 channels."""
    if not isinstance(image, torch.Tensor):
        raise DataError(f"{what} must be a torch.Tensor (uint8, CHW), got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise DataError(f"{what} must be uint8 with values 0..255, got {image.dtype}; "
                        "decode images to uint8 before preprocessing")
    if image.dim() != 3 or image.shape[0] not in (1, 3) or image.shape[1] < 1 or image.shape[2] < 1:
        raise DataError(f"{what} must be CHW with 1 or 3 channels, got shape {tuple(image.shape)} "
                        "(an HWC array needs .permute(2, 0, 1))")


def to_rgb(image: Tensor) -> Tensor:
    """Repeat a 1-channel image to 3 channels (what decode_jpeg(channels=3) gives slim)."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def random_draws(count: int, generator: Optional[torch.Generator] = None) -> list[float]:
    """`count` independent floats from [0, 1) in one RNG call (float64, so int draws stay uniform)."""
    return torch.rand(count, generator=generator, dtype=torch.float64).tolist()


def uniform_between(draw: float, low: float, high: float) -> float:
    """Map a [0, 1) draw to [low, high) (tf.random_uniform with a float range)."""
    return low + (high - low) * draw


def int_below(draw: float, high: int) -> int:
    """Map a [0, 1) draw to an int in [0, high) (tf.random_uniform with an int32 maxval)."""
    return min(int(draw * high), high - 1)


# --------------------------------------------------------------------------------------------
# Bilinear resize (TF1 legacy ResizeBilinear)
# --------------------------------------------------------------------------------------------

def _bilinear_taps(in_size: int, out_size: int, start: int, count: int):
    """Lower/upper source indices and float32 lerp weights for outputs start..start+count-1.

    TF's legacy scaler: in = d * (in_size / out_size) in float32, lower = floor(in),
    lerp = in - lower. TF takes upper = min(ceil(in), in_size - 1); lower + 1 (clamped) differs
    only where lerp == 0, where both give exactly the lower value.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.arange(start, start + count, dtype=np.float32) * scale
    floor = np.floor(source)
    lower = floor.astype(np.int64)
    return lower, np.minimum(lower + 1, in_size - 1), source - floor


def resize_bilinear_tf1_window(image: Tensor, resized_height: int, resized_width: int,
                               window: Optional[Sequence[int]] = None, flip: bool = False,
                               value_scale: Optional[float] = None, exact: bool = True) -> Tensor:
    """Pixels ``window`` (top, left, height, width) of resize_bilinear_tf1(image, rh, rw).

    Only the source block the window needs is read, so cropping a large resized image costs what
    the crop costs. ``flip=True`` returns the window mirrored left-right (slim flips after
    resizing; mirroring the column taps gives identical values for free). ``value_scale``
    multiplies the input before interpolating, e.g. 1/255 for TF's convert_image_dtype.

    ``exact=True`` evaluates TF's expressions in TF's order (x first, then y; a + (b - a) * t),
    so the result is bit-identical to TF. ``exact=False`` (training) samples the same positions
    with the same weights but picks the cheaper pass order and fused lerps: float32 rounding
    differences only (about 1e-7 relative). Returns a new float32 (C, height, width) tensor.
    """
    channels, in_h, in_w = image.shape
    top, left, height, width = window if window is not None else (0, 0, resized_height, resized_width)
    if min(resized_height, resized_width, height, width) < 1 or top < 0 or left < 0 \
            or top + height > resized_height or left + width > resized_width:
        raise ConfigError(f"window {(top, left, height, width)} does not fit in the "
                          f"{resized_height}x{resized_width} resized image")
    y_lo, y_hi, y_lerp = _bilinear_taps(in_h, resized_height, top, height)
    x_lo, x_hi, x_lerp = _bilinear_taps(in_w, resized_width, left, width)
    first_row, last_row = int(y_lo[0]), int(y_hi[-1])
    first_col, last_col = int(x_lo[0]), int(x_hi[-1])
    if flip:
        x_lo, x_hi, x_lerp = x_lo[::-1], x_hi[::-1], x_lerp[::-1].copy()

    # Read only the source block the window touches: a row range when the taps cover it densely
    # (a view), else just the tapped rows (gathered, top taps then bottom taps).
    if last_row - first_row + 1 <= 2 * height:
        source = image[:, first_row:last_row + 1, first_col:last_col + 1]
        row_taps = torch.from_numpy(np.concatenate([y_lo, y_hi]) - first_row)
    else:
        taps = torch.from_numpy(np.concatenate([y_lo, y_hi]))
        block = image[:, :, first_col:last_col + 1]
        if channels > 1 and image.stride(0) == 1:
            # HWC memory (what JPEG decoders produce): gathering whole pixel rows is a row copy,
            # some 30x faster than gathering along dim 1 of the CHW view.
            source = block.permute(1, 2, 0).index_select(0, taps).permute(2, 0, 1)
        else:
            source = block.index_select(1, taps)
        row_taps = torch.arange(2 * height)
    column_taps = torch.from_numpy(np.concatenate([x_lo, x_hi]) - first_col)
    column_lerp, row_lerp = torch.from_numpy(x_lerp), torch.from_numpy(y_lerp)[:, None]
    if exact or source.shape[1] <= height:
        # x first (TF's order); the source block is converted to float32 once.
        across = _lerp_columns(_float_copy(source, value_scale), column_taps, column_lerp, exact)
        return _lerp_rows(across, row_taps, row_lerp, exact)
    # y first, cheaper when the window shrinks the image vertically: the column gather then runs
    # over `height` rows instead of the block's.
    down = _lerp_rows(_float_copy(source, value_scale), row_taps, row_lerp, exact)
    return _lerp_columns(down, column_taps, column_lerp, exact)


def _float_copy(values: Tensor, value_scale: Optional[float]) -> Tensor:
    """A new contiguous float32 copy, times `value_scale` if given (TF's convert_image_dtype)."""
    block = values.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return block.mul_(float(np.float32(value_scale))) if value_scale is not None else block


def _lerp_columns(values: Tensor, taps: Tensor, lerp: Tensor, exact: bool) -> Tensor:
    """(C, R, W) -> (C, R, w): left + (right - left) * lerp, taps = [left indices, right indices].

    Both taps come from one gather along the last axis of a contiguous 2-D float32 view, which is
    torch's fast index_select path (a 3-D or uint8 gather along the last axis is several times
    slower). `exact` keeps TF's expression; otherwise torch.lerp (same value up to rounding).
    """
    width = lerp.shape[0]
    gathered = values.view(-1, values.shape[-1]).index_select(1, taps)
    left, right = gathered[:, :width], gathered[:, width:]
    if exact:
        result = torch.sub(right, left).mul_(lerp).add_(left)
    else:
        result = torch.lerp(left, right, lerp)
    return result.view(values.shape[0], -1, width)


def _lerp_rows(values: Tensor, taps: Tensor, lerp: Tensor, exact: bool) -> Tensor:
    """(C, R, W) -> (C, h, W): top + (bottom - top) * lerp, taps = [top rows, bottom rows]."""
    height = lerp.shape[0]
    gathered = values.index_select(1, taps)
    upper, lower = gathered[:, :height], gathered[:, height:]
    if exact:
        return torch.sub(lower, upper).mul_(lerp).add_(upper)
    return torch.lerp(upper, lower, lerp)


def resize_bilinear_tf1(image: Tensor, height: int, width: int) -> Tensor:
    """TF1 ``tf.image.resize_bilinear(image, [height, width], align_corners=False)`` on CHW.

    Legacy sampling (half_pixel_centers=False): output pixel d reads input coordinate
    d * in_size / out_size, no antialiasing when shrinking; the result is float32 and is not
    rounded (uint8 input gives float output, as in TF).
    """
    return resize_bilinear_tf1_window(image, height, width)


# --------------------------------------------------------------------------------------------
# Other TF1 resize methods (inception's non-fast mode picks one of four at random)
# --------------------------------------------------------------------------------------------

def _nearest_taps(in_size: int, out_size: int):
    """Legacy ResizeNearestNeighbor: source = min(floor(d * in/out), in - 1)."""
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(source, in_size - 1)[:, None], np.ones((out_size, 1), np.float32)


def _bicubic_coefficient_table(a: float = -0.75, table_size: int = 1024) -> np.ndarray:
    """TF's quantised cubic-convolution table (legacy bicubic uses a = -0.75)."""
    table = np.empty((table_size + 1, 2), np.float32)
    for i in range(table_size + 1):
        x = i * 1.0 / table_size
        table[i, 0] = ((a + 2) * x - (a + 3)) * x * x + 1
        x += 1.0
        table[i, 1] = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return table


_BICUBIC_TABLE = _bicubic_coefficient_table()


def _bicubic_taps(in_size: int, out_size: int):
    """Legacy ResizeBicubic: 4 taps around floor(d * in/out), weights from TF's 1024-step table."""
    table_size = _BICUBIC_TABLE.shape[0] - 1
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.arange(out_size, dtype=np.float32) * scale
    base = np.floor(source)
    delta = source - base
    offset = np.rint(delta * np.float32(table_size)).astype(np.int64)
    weights = np.stack([_BICUBIC_TABLE[offset, 1], _BICUBIC_TABLE[offset, 0],
                        _BICUBIC_TABLE[table_size - offset, 0],
                        _BICUBIC_TABLE[table_size - offset, 1]], axis=1)
    base = base.astype(np.int64)
    index = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    return index, weights


def _area_taps(in_size: int, out_size: int):
    """Legacy ResizeArea taps: the input cells box [d, d+1) * scale covers, with TF's coverage rule.

    Weights are the covered fractions (1 for whole cells); the 1 / (scale_y * scale_x)
    normalisation is applied once at the end, as TF's kernel does.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    starts = np.arange(out_size, dtype=np.float32) * scale
    ends = (np.arange(out_size, dtype=np.float32) + 1) * scale
    first = np.floor(starts).astype(np.int64)
    stop = np.ceil(ends).astype(np.int64)
    cells = first[:, None] + np.arange(int((stop - first).max()))[None, :]
    cells_f = cells.astype(np.float32)
    s, e = starts[:, None], ends[:, None]
    partial_start = np.where(cells_f + 1 > e, scale, cells_f + 1 - s)
    whole_or_end = np.where(cells_f + 1 > e, e - cells_f, np.float32(1))
    cover = np.where(cells_f < s, partial_start, whole_or_end).astype(np.float32)
    cover = np.where(cells < stop[:, None], cover, np.float32(0))
    return np.clip(cells, 0, in_size - 1), cover


def _apply_taps(values: Tensor, dim: int, index: np.ndarray, weights: np.ndarray) -> Tensor:
    """Sum_k weights[:, k] * values.index_select(dim, index[:, k]), accumulated in tap order."""
    shape = [1] * values.dim()
    shape[dim] = -1
    result = None
    for k in range(index.shape[1]):
        term = values.index_select(dim, torch.from_numpy(np.ascontiguousarray(index[:, k])))
        term = term * torch.from_numpy(np.ascontiguousarray(weights[:, k])).view(shape)
        result = term if result is None else result.add_(term)
    return result


def resize_tf1(image: Tensor, height: int, width: int, method: int | str = RESIZE_BILINEAR) -> Tensor:
    """TF1 ``tf.image.resize_images(image, [height, width], method)`` on CHW, float32 out.

    Methods follow TF's legacy kernels (align_corners=False, no half-pixel centres): 0 bilinear,
    1 nearest neighbour, 2 bicubic (Keys a=-0.75, TF's quantised weight table), 3 area.
    """
    method = RESIZE_METHODS.get(method, method) if isinstance(method, str) else method
    if method == RESIZE_BILINEAR:
        return resize_bilinear_tf1(image, height, width)
    values = image.to(torch.float32)
    _, in_h, in_w = values.shape
    if method == RESIZE_NEAREST:
        (rows, _), (cols, _) = _nearest_taps(in_h, height), _nearest_taps(in_w, width)
        return values.index_select(1, torch.from_numpy(rows[:, 0])).index_select(
            2, torch.from_numpy(cols[:, 0]))
    if method == RESIZE_BICUBIC:
        # TF's bicubic kernel interpolates along y first, then along x.
        return _apply_taps(_apply_taps(values, 1, *_bicubic_taps(in_h, height)),
                           2, *_bicubic_taps(in_w, width))
    if method == RESIZE_AREA:
        # TF sums along x first, then y, then divides by the box area once.
        box_area = (np.float32(in_h) / np.float32(height)) * (np.float32(in_w) / np.float32(width))
        norm = float(np.float32(1.0 / float(box_area)))
        return _apply_taps(_apply_taps(values, 2, *_area_taps(in_w, width)),
                           1, *_area_taps(in_h, height)).mul_(norm)
    raise ConfigError(f"unknown resize method {method!r}: use one of {sorted(RESIZE_METHODS)} or 0..3")


# --------------------------------------------------------------------------------------------
# Aspect-preserving resize, crops and padding
# --------------------------------------------------------------------------------------------

def aspect_preserving_size(height: int, width: int, smallest_side: int) -> tuple[int, int]:
    """slim's _smallest_size_at_least: scale so the smaller side is `smallest_side`.

    All in float32 like the TF graph: scale = side / smaller, new = rint(old * scale), with
    rint rounding halves to even.
    """
    h, w, side = np.float32(height), np.float32(width), np.float32(smallest_side)
    scale = side / w if h > w else side / h
    return int(np.rint(h * scale)), int(np.rint(w * scale))


def aspect_preserving_resize(image: Tensor, smallest_side: int) -> Tensor:
    """slim's _aspect_preserving_resize: TF1 bilinear resize to the aspect_preserving_size."""
    new_h, new_w = aspect_preserving_size(image.shape[1], image.shape[2], smallest_side)
    return resize_bilinear_tf1(image, new_h, new_w)


def central_crop_box(height: int, width: int, central_fraction: float) -> CropBox:
    """tf.image.central_crop's box: start = int((n - n * fraction) / 2) in float64, size = n - 2 * start.

    So a 300x451 image at 0.875 keeps 264x395, not round(0.875 * n).
    """
    if not 0.0 < central_fraction <= 1.0:
        raise ConfigError(f"central_fraction must be in (0, 1], got {central_fraction}")
    if central_fraction == 1.0:
        return CropBox(0, 0, height, width)
    top = int((height - height * central_fraction) / 2)
    left = int((width - width * central_fraction) / 2)
    return CropBox(top, left, height - 2 * top, width - 2 * left)


def central_crop(image: Tensor, central_fraction: float) -> Tensor:
    """tf.image.central_crop on CHW (inception's fraction rule); returns a view."""
    top, left, h, w = central_crop_box(image.shape[1], image.shape[2], central_fraction)
    return image[:, top:top + h, left:left + w]


def crop_or_pad(image: Tensor, target_height: int, target_width: int) -> Tensor:
    """tf.image.resize_image_with_crop_or_pad on CHW: centre-crop or zero-pad each axis.

    Crop offsets are (n - target) // 2 and pad offsets (target - n) // 2, as TF computes them.
    """
    channels, height, width = image.shape
    crop_top, crop_left = max((height - target_height) // 2, 0), max((width - target_width) // 2, 0)
    pad_top, pad_left = max((target_height - height) // 2, 0), max((target_width - width) // 2, 0)
    kept_h, kept_w = min(target_height, height), min(target_width, width)
    kept = image[:, crop_top:crop_top + kept_h, crop_left:crop_left + kept_w]
    if kept_h == target_height and kept_w == target_width:
        return kept
    result = image.new_zeros((channels, target_height, target_width))
    result[:, pad_top:pad_top + kept_h, pad_left:pad_left + kept_w] = kept
    return result


def flip_left_right(image: Tensor) -> Tensor:
    """tf.image.flip_left_right on CHW."""
    return image.flip(-1)


# --------------------------------------------------------------------------------------------
# Colour ops (float32 in, float32 out)
# --------------------------------------------------------------------------------------------

def rgb_to_grayscale(image: Tensor) -> Tensor:
    """tf.image.rgb_to_grayscale on a float CHW image: 0.2989 R + 0.5870 G + 0.1140 B -> (1, H, W)."""
    r, g, b = image.to(torch.float32).unbind(0)
    wr, wg, wb = (float(np.float32(w)) for w in GRAYSCALE_WEIGHTS)
    return (r * wr + g * wg + b * wb).unsqueeze(0)


def adjust_brightness(image: Tensor, delta: float) -> Tensor:
    """tf.image.adjust_brightness on a float image: image + delta (no clipping)."""
    return image + float(np.float32(delta))


def adjust_contrast(image: Tensor, contrast_factor: float) -> Tensor:
    """tf.image.adjust_contrast: (x - mean) * factor + mean, mean per channel over H and W."""
    mean = image.mean(dim=(-2, -1), keepdim=True)
    return (image - mean).mul_(float(np.float32(contrast_factor))).add_(mean)


def saturation_affine(image: Tensor, saturation_factor: float, brightness_delta: float = 0.0
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel (ratio, top, v) with adjust_saturation(image + delta, f) == top - ratio * (v - image).

    TF's adjust_saturation kernel goes RGB -> HSV -> RGB per pixel. Hue and value are preserved,
    so the result follows from each pixel's max v and min m alone: the chroma v - m becomes
    min(f * (v - m), v) (saturation clamped at 1, and 0 where v <= 0, as TF sets s = 0 there)
    and every channel's distance below the max scales by ratio = new_chroma / chroma. A
    brightness shift applied just before (inception's ordering 0) only moves the max:
    top = v + delta. Returns three (H, W) float32 tensors.
    """
    v = image.amax(dim=0)
    chroma = v - image.amin(dim=0)
    top = v + float(np.float32(brightness_delta)) if brightness_delta else v.clone()
    # min(f * chroma, top) / chroma, clamped at 0; chroma == 0 pixels keep their value for any
    # finite ratio, so a tiny floor instead of 0 is enough to avoid 0/0.
    ratio = torch.div(top, chroma.clamp_(min=1e-30)).clamp_(0.0, float(np.float32(saturation_factor)))
    return ratio, top, v


def adjust_saturation(image: Tensor, saturation_factor: float) -> Tensor:
    """tf.image.adjust_saturation on float RGB: scale HSV saturation, clamp it to [0, 1].

    Computed in closed form (see saturation_affine); matches TF's HSV round trip to float32
    rounding, including pixels with v <= 0 or channels outside [0, 1].
    """
    ratio, top, v = saturation_affine(image, saturation_factor)
    # top - ratio * (v - x) == x * ratio + (top - ratio * v)
    return torch.addcmul(torch.addcmul(top, ratio, v, value=-1.0), image, ratio)


# TF's adjust_hue kernel: per hue sextant, which of (max, mid, min) lands in R, G and B.
_SEXTANT_TO_RGB = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 0, 1], [2, 1, 0], [1, 2, 0], [0, 2, 1]])
# ...and which input channel holds the middle value in each sextant.
_SEXTANT_MID_CHANNEL = torch.tensor([1, 0, 2, 1, 0, 2])


def adjust_hue(image: Tensor, delta: float) -> Tensor:
    """tf.image.adjust_hue on float RGB: rotate hue by `delta` (in turns, [-1, 1]).

    Follows TF's kernel, which works in (hue sextant, v_min, v_max) space rather than HSV:
    hue = sextant + position of the middle channel between min and max, shifted by 6 * delta and
    wrapped to [0, 6), then the three values are redistributed over R, G and B.
    """
    r, g, b = image.unbind(0)
    # Sextant per TF's comparisons (ties may go either way; the result is the same).
    r_lt_g = r < g
    sextant = torch.where(
        r_lt_g,
        torch.where(b < r, 1, torch.where(b > g, 3, 2)),
        torch.where(b < g, 0, torch.where(b > r, 4, 5)))
    v_max = image.amax(dim=0)
    v_min = image.amin(dim=0)
    v_mid = torch.gather(image, 0, _SEXTANT_MID_CHANNEL[sextant].unsqueeze(0))[0]
    spread = v_max - v_min
    ratio = torch.where(spread > 0, (v_mid - v_min) / spread, torch.zeros_like(spread))
    odd = (sextant & 1).bool()
    hue = sextant.to(torch.float32) + torch.where(odd, 1 - ratio, ratio)
    hue = torch.where(spread > 0, hue, torch.zeros_like(hue))
    hue = hue + float(np.float32(delta)) * 6
    for _ in range(2):  # TF's while loops; |delta| <= 1 needs at most two passes
        hue = torch.where(hue < 0, hue + 6, hue)
        hue = torch.where(hue >= 6, hue - 6, hue)
    new_sextant = hue.to(torch.int64).clamp_(0, 5)
    position = hue - new_sextant.to(torch.float32)
    position = torch.where((new_sextant & 1).bool(), 1 - position, position)
    new_mid = v_min + position * spread
    stacked = torch.stack([v_max, new_mid, v_min])
    return torch.gather(stacked, 0, _SEXTANT_TO_RGB[new_sextant].permute(2, 0, 1))


def per_image_standardization(image: Tensor) -> Tensor:
    """tf.image.per_image_standardization: (x - mean) / max(std, 1/sqrt(N)) over all C*H*W values.

    The statistics pool every channel (and any zero padding a crop_or_pad added), as TF does.
    uint8 input is cast to float without scaling (TF1 semantics).
    """
    values = image.to(torch.float32)
    std, mean = torch.std_mean(values, unbiased=False)
    floor = 1.0 / math.sqrt(values.numel())
    return (values - mean) / torch.clamp(std, min=floor)


# --------------------------------------------------------------------------------------------
# tf.image.sample_distorted_bounding_box
# --------------------------------------------------------------------------------------------

def _lrintf(values: np.ndarray) -> np.ndarray:
    """C lrintf under the default rounding mode (halves to even), elementwise."""
    return np.rint(values).astype(np.int64)


def _below(draws: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Map [0, 1) draws to ints in [0, limit) elementwise (0 where limit <= 0)."""
    limits = np.maximum(limits, 1)
    return np.minimum((draws * limits).astype(np.int64), limits - 1)


def _generate_random_crops(width: int, height: int, min_area_fraction: float, max_area_fraction: float,
                           aspect: np.ndarray, draws: np.ndarray):
    """TF's GenerateRandomCrop for a batch of attempts -> (ok, top, left, crop_h, crop_w) arrays.

    float32 arithmetic and lrintf rounding as in the kernel; `draws` (n, 3) picks the height
    within its range and the offsets. Offsets come from [0, n - size): TF never lets a crop
    smaller than the image touch its bottom or right edge.
    """
    f32 = np.float32
    min_area = f32(min_area_fraction) * f32(width) * f32(height)
    max_area = f32(max_area_fraction) * f32(width) * f32(height)
    crop_h = _lrintf(np.sqrt(min_area / aspect))
    max_h = _lrintf(np.sqrt(max_area / aspect))
    too_wide = _lrintf(max_h.astype(f32) * aspect) > width
    # the largest height whose rounded width still fits (computed in double, as the kernel does)
    fitted = ((width + 0.5 - float(f32(1e-7))) / aspect.astype(np.float64)).astype(np.int64)
    fitted -= _lrintf(fitted.astype(f32) * aspect) > width
    max_h = np.minimum(np.where(too_wide, fitted, max_h), height)
    crop_h = np.minimum(crop_h, max_h)
    crop_h = crop_h + np.where(crop_h < max_h, _below(draws[:, 0], max_h - crop_h + 1), 0)
    crop_w = _lrintf(crop_h.astype(f32) * aspect)
    area = (crop_w * crop_h).astype(f32)
    grow = area < min_area                      # rounding left it too small: one row taller
    crop_h = crop_h + grow
    crop_w = np.where(grow, _lrintf(crop_h.astype(f32) * aspect), crop_w)
    area = (crop_w * crop_h).astype(f32)
    shrink = area > max_area                    # ... or too large: one row shorter
    crop_h = crop_h - shrink
    crop_w = np.where(shrink, _lrintf(crop_h.astype(f32) * aspect), crop_w)
    area = (crop_w * crop_h).astype(f32)
    ok = (area >= min_area) & (area <= max_area) & (crop_w <= width) & (crop_h <= height) \
        & (crop_w > 0) & (crop_h > 0)
    top = np.where(crop_h < height, _below(draws[:, 1], height - crop_h), 0)
    left = np.where(crop_w < width, _below(draws[:, 2], width - crop_w), 0)
    return ok, top, left, crop_h, crop_w


def _generate_random_crop(width: int, height: int, min_area_fraction: float, max_area_fraction: float,
                          aspect: np.float32, draws: Sequence[float]) -> Optional[CropBox]:
    """One attempt of TF's GenerateRandomCrop in scalar code (same rules as the batched version).

    Most calls succeed on the first attempt, where plain Python beats numpy's per-call overhead.
    """
    f32 = np.float32
    min_area = f32(min_area_fraction) * f32(width) * f32(height)
    max_area = f32(max_area_fraction) * f32(width) * f32(height)
    crop_h = int(np.rint(np.sqrt(min_area / aspect)))
    max_h = int(np.rint(np.sqrt(max_area / aspect)))
    if int(np.rint(f32(max_h) * aspect)) > width:
        max_h = int((width + 0.5 - float(f32(1e-7))) / float(aspect))
        if int(np.rint(f32(max_h) * aspect)) > width:
            max_h -= 1
    max_h = min(max_h, height)
    crop_h = min(crop_h, max_h)
    if crop_h < max_h:
        crop_h += int_below(draws[0], max_h - crop_h + 1)
    crop_w = int(np.rint(f32(crop_h) * aspect))
    area = f32(crop_w * crop_h)
    if area < min_area:
        crop_h += 1
        crop_w = int(np.rint(f32(crop_h) * aspect))
        area = f32(crop_w * crop_h)
    if area > max_area:
        crop_h -= 1
        crop_w = int(np.rint(f32(crop_h) * aspect))
        area = f32(crop_w * crop_h)
    if area < min_area or area > max_area or not (0 < crop_w <= width and 0 < crop_h <= height):
        return None
    top = int_below(draws[1], height - crop_h) if crop_h < height else 0
    left = int_below(draws[2], width - crop_w) if crop_w < width else 0
    return CropBox(top, left, crop_h, crop_w)


def _covers_enough(top: np.ndarray, left: np.ndarray, crop_h: np.ndarray, crop_w: np.ndarray,
                   min_object_covered: float, boxes: np.ndarray) -> np.ndarray:
    """TF's SatisfiesOverlapConstraints per attempt: covers >= the fraction of some box (pixel areas)."""
    y0, x0, y1, x1 = (boxes[:, i][None, :] for i in range(4))
    object_area = ((x1 - x0) * (y1 - y0)).astype(np.float32)
    iy0, ix0 = np.maximum(top[:, None], y0), np.maximum(left[:, None], x0)
    iy1 = np.minimum((top + crop_h)[:, None], y1)
    ix1 = np.minimum((left + crop_w)[:, None], x1)
    overlap = np.where((iy0 <= iy1) & (ix0 <= ix1), (ix1 - ix0) * (iy1 - iy0), 0).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        covered = (overlap / object_area >= np.float32(min_object_covered)) & (object_area >= 1)
    return covered.any(axis=1) & (crop_h * crop_w >= 1)


def _crop_covers_enough(crop: CropBox, min_object_covered: float, boxes: list[list[int]]) -> bool:
    """_covers_enough for a single crop, in scalar code."""
    if crop.height * crop.width < 1:
        return False
    threshold = np.float32(min_object_covered)
    for y0, x0, y1, x1 in boxes:
        object_area = np.float32((x1 - x0) * (y1 - y0))
        iy0, ix0 = max(crop.top, y0), max(crop.left, x0)
        iy1, ix1 = min(crop.top + crop.height, y1), min(crop.left + crop.width, x1)
        overlap = np.float32((ix1 - ix0) * (iy1 - iy0) if iy0 <= iy1 and ix0 <= ix1 else 0)
        if object_area >= 1 and overlap / object_area >= threshold:
            return True
    return False


def sample_distorted_bounding_box(image_height: int, image_width: int, bbox=None,
                                  min_object_covered: float = 0.1,
                                  aspect_ratio_range: Sequence[float] = (0.75, 1.33),
                                  area_range: Sequence[float] = (0.05, 1.0),
                                  max_attempts: int = 100,
                                  generator: Optional[torch.Generator] = None) -> CropBox:
    """tf.image.sample_distorted_bounding_box (use_image_if_no_bounding_boxes=True) -> CropBox.

    Up to `max_attempts` times: draw an aspect ratio (width / height) from `aspect_ratio_range`,
    a height so the area fraction lies in `area_range` (height, not area, is uniform), and an
    offset; accept the first crop that covers at least `min_object_covered` of one of the boxes
    `bbox` ((..., 4) normalised [ymin, xmin, ymax, xmax]; the whole image when None or empty).
    If every attempt fails, the whole image is returned. The draws come from torch's RNG, so the
    distribution (not TF's random stream) is reproduced. The first attempt runs alone (it usually
    succeeds); the remaining ones are drawn and evaluated together.
    """
    if not (0 < area_range[0] <= area_range[1] <= 1):
        raise ConfigError(f"area_range must satisfy 0 < low <= high <= 1, got {tuple(area_range)}")
    if not (0 < aspect_ratio_range[0] <= aspect_ratio_range[1]):
        raise ConfigError(f"aspect_ratio_range must satisfy 0 < low <= high, got {tuple(aspect_ratio_range)}")
    if min_object_covered < 0:
        raise ConfigError(f"min_object_covered must be non-negative, got {min_object_covered}")
    if max_attempts < 1:
        raise ConfigError(f"max_attempts must be at least 1, got {max_attempts}")
    boxes = _pixel_boxes(bbox, image_height, image_width)
    low, high = np.float32(aspect_ratio_range[0]), np.float32(aspect_ratio_range[1])
    draws = random_draws(4, generator)
    crop = _generate_random_crop(image_width, image_height, area_range[0], area_range[1],
                                 np.float32(draws[3]) * (high - low) + low, draws)
    if crop is not None and _crop_covers_enough(crop, min_object_covered, boxes.tolist()):
        return crop
    if max_attempts > 1:
        draws = torch.rand((max_attempts - 1, 4), generator=generator, dtype=torch.float64).numpy()
        aspect = draws[:, 3].astype(np.float32) * (high - low) + low
        ok, top, left, crop_h, crop_w = _generate_random_crops(image_width, image_height, area_range[0],
                                                               area_range[1], aspect, draws)
        ok &= _covers_enough(top, left, crop_h, crop_w, min_object_covered, boxes)
        if ok.any():
            i = int(ok.argmax())
            return CropBox(int(top[i]), int(left[i]), int(crop_h[i]), int(crop_w[i]))
    return CropBox(0, 0, image_height, image_width)


def _pixel_boxes(bbox, height: int, width: int) -> np.ndarray:
    """Normalised (..., 4) [ymin, xmin, ymax, xmax] boxes -> TF's truncated pixel boxes (n, 4)."""
    whole = np.array([[0, 0, height, width]], np.int64)
    if bbox is None:
        return whole
    array = np.asarray(bbox.detach().cpu() if isinstance(bbox, torch.Tensor) else bbox,
                       dtype=np.float32).reshape(-1, 4)
    if array.size == 0:
        return whole
    if np.any(~np.isfinite(array)) or np.any(array < 0) or np.any(array > 1):
        raise DataError("bounding box coordinates must be in [0, 1] ([ymin, xmin, ymax, xmax]), "
                        f"got {array.tolist()}")
    scale = np.array([height, width, height, width], np.float32)
    return (array * scale).astype(np.int64)
