"""slim's cifarnet_preprocessing (CIFAR-10): no resize, per-image standardisation.

Train: pad 4 zero pixels on each side, random height x width crop, random mirror, brightness
+-63 (0..255 units), contrast [0.2, 1.8], per_image_standardization. Eval: centre-crop or zero-pad
to size, then per_image_standardization pooled over all channels and the padding.

slim's eval passes (output_width, output_height) into resize_image_with_crop_or_pad's
(target_height, target_width) slots, so a non-square eval size comes out transposed
(width x height). That is reproduced by default (``slim_size_swap=True``) so results match slim;
pass False to get height x width like the train path. Square sizes (32x32) are unaffected.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..errors import ConfigError
from . import ops

PADDING = 4
BRIGHTNESS_MAX_DELTA = 63.0
CONTRAST_RANGE = (0.2, 1.8)


class CifarnetTrainParams(NamedTuple):
    """One draw of cifarnet's training randomness (offsets are in the padded image)."""

    top: int
    left: int
    flip: bool
    brightness_delta: float
    contrast_factor: float


def _channels(image: torch.Tensor, use_grayscale: bool) -> torch.Tensor:
    """Three channels, or the image as it is when it will become grayscale anyway."""
    return image if use_grayscale else ops.to_rgb(image)


def sample_train_params(image_height: int, image_width: int, height: int, width: int,
                        padding: int = PADDING,
                        generator: Optional[torch.Generator] = None) -> CifarnetTrainParams:
    """Draw crop offset, mirror, brightness delta and contrast factor in slim's ranges."""
    padded_h, padded_w = image_height + 2 * padding, image_width + 2 * padding
    if padded_h < height or padded_w < width:
        raise ConfigError(f"cifarnet preprocessing crops {height}x{width} from the {padded_h}x{padded_w} "
                          f"padded image: use an image size of at most {padded_h}x{padded_w}")
    top_draw, left_draw, flip_draw, brightness_draw, contrast_draw = ops.random_draws(5, generator)
    return CifarnetTrainParams(
        ops.int_below(top_draw, padded_h - height + 1), ops.int_below(left_draw, padded_w - width + 1),
        flip_draw < 0.5, ops.uniform_between(brightness_draw, -BRIGHTNESS_MAX_DELTA, BRIGHTNESS_MAX_DELTA),
        ops.uniform_between(contrast_draw, *CONTRAST_RANGE))


def apply_train(image: torch.Tensor, height: int, width: int, params: CifarnetTrainParams,
                padding: int = PADDING, use_grayscale: bool = False) -> torch.Tensor:
    """Pad, crop at (top, left), mirror, brightness, contrast and standardise with fixed parameters."""
    ops.check_image(image)
    image = _channels(image, use_grayscale)
    channels, in_h, in_w = image.shape
    top, left = params.top, params.left
    if not (0 <= top <= in_h + 2 * padding - height and 0 <= left <= in_w + 2 * padding - width):
        raise ConfigError(f"crop at ({top}, {left}) of size {height}x{width} does not fit in the "
                          f"padded {in_h + 2 * padding}x{in_w + 2 * padding} image")
    # Copy the part of the crop that overlaps the image into zeros: the padded image is never built.
    src_top, src_left = max(top - padding, 0), max(left - padding, 0)
    src_bottom, src_right = min(top + height - padding, in_h), min(left + width - padding, in_w)
    crop = torch.zeros((channels, height, width), dtype=torch.float32)
    if src_bottom > src_top and src_right > src_left:
        dst_top, dst_left = src_top + padding - top, src_left + padding - left
        crop[:, dst_top:dst_top + src_bottom - src_top, dst_left:dst_left + src_right - src_left] = \
            image[:, src_top:src_bottom, src_left:src_right]
    if use_grayscale and channels == 3:
        crop = ops.rgb_to_grayscale(crop)
    if params.flip:
        crop = ops.flip_left_right(crop)
    crop = ops.adjust_brightness(crop, params.brightness_delta)
    crop = ops.adjust_contrast(crop, params.contrast_factor)
    return ops.per_image_standardization(crop)


def preprocess_for_train(image: torch.Tensor, height: int, width: int, padding: int = PADDING,
                         use_grayscale: bool = False,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pad, random crop, random mirror, random brightness and contrast, standardise."""
    ops.check_image(image)
    params = sample_train_params(image.shape[1], image.shape[2], height, width, padding, generator)
    return apply_train(image, height, width, params, padding, use_grayscale)


def preprocess_for_eval(image: torch.Tensor, height: int, width: int, use_grayscale: bool = False,
                        slim_size_swap: bool = True) -> torch.Tensor:
    """Centre-crop or zero-pad, then per_image_standardization over every value."""
    ops.check_image(image)
    image = _channels(image, use_grayscale)
    target_h, target_w = (width, height) if slim_size_swap else (height, width)
    # Cropping/padding first is exact (both only move pixels) and avoids converting a whole photo.
    values = ops.crop_or_pad(image, target_h, target_w).to(torch.float32)
    if use_grayscale and values.shape[0] == 3:
        values = ops.rgb_to_grayscale(values)
    return ops.per_image_standardization(values)


def preprocess_image(image: torch.Tensor, height: int, width: int, is_training: bool = False,
                     padding: int = PADDING, use_grayscale: bool = False, slim_size_swap: bool = True,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """slim's cifarnet_preprocessing.preprocess_image on a uint8 CHW tensor -> float32 CHW."""
    if is_training:
        return preprocess_for_train(image, height, width, padding, use_grayscale, generator)
    return preprocess_for_eval(image, height, width, use_grayscale, slim_size_swap)
