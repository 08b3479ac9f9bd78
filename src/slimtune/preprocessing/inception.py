"""slim's inception_preprocessing (Inception, MobileNet, NASNet/PNASNet checkpoints): output in [-1, 1].

Train: a distorted bounding-box crop (sample_distorted_bounding_box), a resize of the crop to the
output size, a random mirror, colour distortion, clip to [0, 1], then (x - 0.5) * 2.
Eval: uint8 -> float as x * (1/255), central crop of 87.5% (TF's int rule), TF1 bilinear resize,
then (x - 0.5) * 2.

Training is split into drawing the random parameters (``sample_train_params``) and applying
them (``apply_train``), so a run can be replayed or checked against TF with fixed parameters.
The draws need only the image size, so a loader can draw them from a JPEG header and decode at
the coarsest DCT scale that still covers the crop at full detail (``plan_train``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..errors import ConfigError
from . import ops

BRIGHTNESS_MAX_DELTA = 32.0 / 255.0
SATURATION_RANGE = (0.5, 1.5)
HUE_MAX_DELTA = 0.2
CONTRAST_RANGE = (0.5, 1.5)
CENTRAL_FRACTION = 0.875

# distort_color's four orderings; fast mode uses ordering 0 without hue and contrast.
COLOR_ORDERINGS = (
    ("brightness", "saturation", "hue", "contrast"),
    ("saturation", "brightness", "contrast", "hue"),
    ("contrast", "hue", "brightness", "saturation"),
    ("hue", "saturation", "contrast", "brightness"),
)
FAST_COLOR_OPS = ("brightness", "saturation")
_COLOR_RANGES = {
    "brightness": (-BRIGHTNESS_MAX_DELTA, BRIGHTNESS_MAX_DELTA),
    "saturation": SATURATION_RANGE,
    "hue": (-HUE_MAX_DELTA, HUE_MAX_DELTA),
    "contrast": CONTRAST_RANGE,
}
_UINT8_TO_UNIT = 1.0 / 255.0


class InceptionTrainParams(NamedTuple):
    """One draw of inception's training randomness.

    `color_ops` lists (op, value) in the order applied, values in slim's [0, 1] units:
    brightness delta, saturation factor, hue delta, contrast factor.
    """

    crop: ops.CropBox
    resize_method: int
    flip: bool
    color_ops: tuple[tuple[str, float], ...]


def _apply_color_op(image: torch.Tensor, name: str, value: float, value_range: float) -> torch.Tensor:
    """One colour op of distort_color; `value_range` is 1 for [0, 1] images, 255 for 0..255 ones."""
    if name == "brightness":
        return image.add_(float(np.float32(value)) * value_range)
    if name == "saturation":
        return ops.adjust_saturation(image, value)
    if name == "hue":
        return ops.adjust_hue(image, value)
    if name == "contrast":
        return ops.adjust_contrast(image, value)
    raise ConfigError(f"unknown colour op '{name}': use brightness, saturation, hue or contrast")


def _color_op_names(color_ordering: int, fast_mode: bool) -> tuple[str, ...]:
    """The colour ops distort_color applies, in order."""
    if not 0 <= color_ordering <= 3:
        raise ConfigError(f"color_ordering must be in [0, 3], got {color_ordering}")
    if fast_mode:
        return FAST_COLOR_OPS if color_ordering == 0 else FAST_COLOR_OPS[::-1]
    return COLOR_ORDERINGS[color_ordering]


def distort_color(image: torch.Tensor, color_ordering: int = 0, fast_mode: bool = True,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """slim's distort_color on a float RGB image in [0, 1]; the result is clipped to [0, 1].

    Fast mode: ordering 0 is brightness then saturation, any other ordering the reverse.
    Otherwise one of the four orderings of brightness, saturation, hue and contrast.
    """
    names = _color_op_names(color_ordering, fast_mode)
    for name, draw in zip(names, ops.random_draws(len(names), generator)):
        image = _apply_color_op(image, name, ops.uniform_between(draw, *_COLOR_RANGES[name]), 1.0)
    return image.clamp_(0.0, 1.0)


def sample_train_params(image_height: int, image_width: int, bbox=None, fast_mode: bool = True,
                        random_crop: bool = True,
                        generator: Optional[torch.Generator] = None) -> InceptionTrainParams:
    """Draw crop, resize method, mirror and colour distortion in slim's order and ranges."""
    if random_crop:
        crop = ops.sample_distorted_bounding_box(image_height, image_width, bbox=bbox,
                                                 min_object_covered=0.1, aspect_ratio_range=(0.75, 1.33),
                                                 area_range=(0.05, 1.0), max_attempts=100,
                                                 generator=generator)
    else:
        crop = ops.CropBox(0, 0, image_height, image_width)
    if fast_mode:
        flip_draw, *color_draws = ops.random_draws(3, generator)
        method, names = ops.RESIZE_BILINEAR, FAST_COLOR_OPS
    else:
        method_draw, flip_draw, ordering_draw, *color_draws = ops.random_draws(7, generator)
        method = ops.int_below(method_draw, 4)
        names = COLOR_ORDERINGS[ops.int_below(ordering_draw, 4)]
    color_ops = tuple((name, ops.uniform_between(draw, *_COLOR_RANGES[name]))
                      for name, draw in zip(names, color_draws))
    return InceptionTrainParams(crop, method, flip_draw < 0.5, color_ops)


def _fused_brightness_saturation(pixels: torch.Tensor, delta: float, factor: float) -> torch.Tensor:
    """Brightness, saturation, clip and the [-1, 1] map on a 0..255 image, as one affine pass.

    adjust_saturation(x + delta, f) == top - ratio * (v - x) per pixel (see ops.saturation_affine);
    clamp(y, 0, 255) * 2/255 - 1 == clamp(y * 2/255 - 1, -1, 1), so the map folds in as well.
    """
    to_unit = 2.0 / 255.0
    ratio, top, v = ops.saturation_affine(pixels, factor, brightness_delta=delta * 255.0)
    ratio.mul_(to_unit)
    offset = torch.addcmul(top.mul_(to_unit).sub_(1.0), ratio, v, value=-1.0)
    return torch.addcmul(offset, pixels, ratio).clamp_(-1.0, 1.0)


def _scaled_crop(crop: ops.CropBox, source_size: tuple[int, int], image_height: int,
                 image_width: int) -> ops.CropBox:
    """The crop drawn on a source_size image, moved onto a reduced-size decode of that image."""
    source_height, source_width = source_size
    if (source_height, source_width) == (image_height, image_width):
        return crop
    scale_y, scale_x = image_height / source_height, image_width / source_width
    top, left = round(crop.top * scale_y), round(crop.left * scale_x)
    bottom = min(max(round((crop.top + crop.height) * scale_y), top + 1), image_height)
    right = min(max(round((crop.left + crop.width) * scale_x), left + 1), image_width)
    top, left = min(top, bottom - 1), min(left, right - 1)
    return ops.CropBox(top, left, bottom - top, right - left)


def apply_train(image: torch.Tensor, height: int, width: int, params: InceptionTrainParams,
                use_grayscale: bool = False, exact: bool = False,
                source_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Crop, resize, mirror, distort colours, clip and map to [-1, 1] with fixed parameters.

    `exact=True` follows TF's float32 arithmetic step by step ([0, 1] floats, TF's resize order,
    one op after another). The default works in 0..255 units, picks the faster resize order and
    fuses brightness + saturation + clip + scaling into one pass; every op involved is
    scale-equivariant, so the two differ by float rounding only (~1e-6). `source_size`: the
    (height, width) of the image the crop was drawn for, when `image` is a reduced-size decode of
    it (see ``train_decode_size``); the crop is scaled onto it.
    """
    ops.check_image(image)
    image = ops.to_rgb(image)
    crop = params.crop
    bounds = source_size or (image.shape[1], image.shape[2])
    if crop.top < 0 or crop.left < 0 or crop.height < 1 or crop.width < 1 \
            or crop.top + crop.height > bounds[0] or crop.left + crop.width > bounds[1]:
        raise ConfigError(f"crop {tuple(crop)} does not fit in the {bounds[0]}x{bounds[1]} image")
    if source_size is not None:
        crop = _scaled_crop(crop, source_size, image.shape[1], image.shape[2])
    window = image[:, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width]
    value_scale, value_range = (_UINT8_TO_UNIT, 1.0) if exact else (None, 255.0)
    if params.resize_method == ops.RESIZE_BILINEAR:
        # Resize and mirror in one pass over just the crop's pixels.
        pixels = ops.resize_bilinear_tf1_window(window, height, width, flip=params.flip,
                                                value_scale=value_scale, exact=exact)
    else:
        source = window.to(torch.float32)
        pixels = ops.resize_tf1(source.mul_(value_scale) if exact else source, height, width,
                                params.resize_method)
        if params.flip:
            pixels = ops.flip_left_right(pixels)
    names = tuple(name for name, _ in params.color_ops)
    if not exact and names == FAST_COLOR_OPS and not use_grayscale:
        return _fused_brightness_saturation(pixels, params.color_ops[0][1], params.color_ops[1][1])
    for name, value in params.color_ops:
        pixels = _apply_color_op(pixels, name, value, value_range)
    pixels = pixels.clamp_(0.0, value_range)
    if use_grayscale:
        pixels = ops.rgb_to_grayscale(pixels)
    if exact:
        return pixels.sub_(0.5).mul_(2.0)          # slim's (x - 0.5) * 2
    return pixels.mul_(2.0 / value_range).sub_(1.0)


def train_decode_size(params: InceptionTrainParams, image_height: int, image_width: int, height: int,
                      width: int) -> tuple[int, int]:
    """The smallest decoded size at which the crop still spans more than height x width pixels.

    One pixel of margin absorbs the rounding of the crop onto the reduced image, so a decode at
    least this large is only ever shrunk by the resize, as the full image would be.
    """
    crop = params.crop
    return (math.ceil((height + 1) * image_height / crop.height),
            math.ceil((width + 1) * image_width / crop.width))


def plan_train(image_height: int, image_width: int, height: int, width: int, bbox=None, fast_mode: bool = True,
               crop_image: bool = True, generator: Optional[torch.Generator] = None
               ) -> tuple[InceptionTrainParams, tuple[int, int]]:
    """preprocess_image's training draws from the image size alone, and the decode size they need.

    Takes preprocess_image's options and draws exactly what it would from the same generator
    state, so ``apply_train(image, height, width, params)`` gives the same result.
    """
    params = sample_train_params(image_height, image_width, bbox, fast_mode, crop_image, generator)
    return params, train_decode_size(params, image_height, image_width, height, width)


def preprocess_for_train(image: torch.Tensor, height: int, width: int, bbox=None, fast_mode: bool = True,
                         random_crop: bool = True, use_grayscale: bool = False,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """slim's inception preprocess_for_train on a uint8 CHW image -> float32 CHW in [-1, 1].

    `bbox`: (..., 4) normalised [ymin, xmin, ymax, xmax] boxes the crop must cover 10% of one of
    (default: the whole image). `fast_mode=False` also picks one of four resize methods and one
    of four colour orderings (with hue and contrast) at random, as slim does.
    """
    ops.check_image(image)
    params = sample_train_params(image.shape[1], image.shape[2], bbox, fast_mode, random_crop, generator)
    return apply_train(image, height, width, params, use_grayscale)


def preprocess_for_eval(image: torch.Tensor, height: int, width: int,
                        central_fraction: Optional[float] = CENTRAL_FRACTION, central_crop: bool = True,
                        use_grayscale: bool = False) -> torch.Tensor:
    """slim's inception preprocess_for_eval: x/255, central crop 0.875, TF1 bilinear resize, [-1, 1]."""
    ops.check_image(image)
    image = ops.to_rgb(image)
    if central_crop and central_fraction:
        image = ops.central_crop(image, central_fraction)
    if use_grayscale:
        # slim converts to grayscale before cropping and resizing.
        image = ops.rgb_to_grayscale(image.to(torch.float32).mul_(_UINT8_TO_UNIT))
        scale = None
    else:
        scale = _UINT8_TO_UNIT      # applied to the gathered pixels, in TF's order
    if height and width:
        pixels = ops.resize_bilinear_tf1_window(image, height, width, value_scale=scale)
    else:
        pixels = image.to(torch.float32, copy=True)
        if scale is not None:
            pixels.mul_(scale)
    return pixels.sub_(0.5).mul_(2.0)


def preprocess_image(image: torch.Tensor, height: int, width: int, is_training: bool = False,
                     bbox=None, fast_mode: bool = True, crop_image: bool = True,
                     use_grayscale: bool = False,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """slim's inception_preprocessing.preprocess_image on a uint8 CHW tensor -> float32 CHW."""
    if is_training:
        return preprocess_for_train(image, height, width, bbox, fast_mode, random_crop=crop_image,
                                    use_grayscale=use_grayscale, generator=generator)
    return preprocess_for_eval(image, height, width, central_crop=crop_image, use_grayscale=use_grayscale)
