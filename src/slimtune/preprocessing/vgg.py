"""slim's vgg_preprocessing (VGG and ResNet-v1 checkpoints): aspect resize, crop, mean subtraction.

Outputs stay in 0..255 units minus the ImageNet RGB means; nothing is scaled. Train: a random
smaller side in [256, 512], a random crop, a random mirror. Eval: smaller side 256, central crop.
The TF1 bilinear resize is computed only for the pixels of the crop, which is what makes the
train path cheap; the values are those of resizing the whole image and cropping.

Training is split into drawing the random parameters (``sample_train_params``) and applying
them (``apply_train``), so a run can be replayed or checked against TF with fixed parameters.
The draws need only the image size, so a loader can draw them from a JPEG header and decode at
the coarsest DCT scale that still covers the resized image at full detail (``plan_train``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from ..errors import ConfigError
from . import ops

R_MEAN, G_MEAN, B_MEAN = 123.68, 116.78, 103.94
RESIZE_SIDE_MIN = 256
RESIZE_SIDE_MAX = 512

_RGB_MEANS = torch.tensor([R_MEAN, G_MEAN, B_MEAN], dtype=torch.float32).view(3, 1, 1)
# slim cannot run vgg with use_grayscale (its mean subtraction needs 3 channels); subtracting
# the luma of the mean colour is the consistent extension.
_GRAY_MEAN = float(sum(np.float32(w) * np.float32(m)
                       for w, m in zip(ops.GRAYSCALE_WEIGHTS, (R_MEAN, G_MEAN, B_MEAN))))


class VggTrainParams(NamedTuple):
    """One draw of vgg's training randomness: resize side, crop offset in the resized image, mirror."""

    resize_side: int
    top: int
    left: int
    flip: bool


def _resized_size(image_height: int, image_width: int, side: int, height: int,
                  width: int) -> tuple[int, int]:
    """Aspect-preserving size for `side`, checked to hold a height x width crop."""
    new_h, new_w = ops.aspect_preserving_size(image_height, image_width, side)
    if new_h < height or new_w < width:
        raise ConfigError(f"vgg preprocessing resizes the smaller side to {side} ({new_h}x{new_w}), "
                          f"too small for a {height}x{width} crop: lower the image size or raise "
                          "resize_side_min")
    return new_h, new_w


def _subtract_means(pixels: torch.Tensor, use_grayscale: bool) -> torch.Tensor:
    """Optional grayscale, then per-channel mean subtraction (in place on a fresh tensor)."""
    if use_grayscale:
        return ops.rgb_to_grayscale(pixels).sub_(_GRAY_MEAN)
    return pixels.sub_(_RGB_MEANS)


def sample_train_params(image_height: int, image_width: int, height: int, width: int,
                        resize_side_min: int = RESIZE_SIDE_MIN, resize_side_max: int = RESIZE_SIDE_MAX,
                        generator: Optional[torch.Generator] = None) -> VggTrainParams:
    """Draw slim's side in [min, max] (inclusive), crop offset and mirror for one image."""
    if not 0 < resize_side_min <= resize_side_max:
        raise ConfigError(f"need 0 < resize_side_min <= resize_side_max, got {resize_side_min} and "
                          f"{resize_side_max}")
    side_draw, top_draw, left_draw, flip_draw = ops.random_draws(4, generator)
    side = resize_side_min + ops.int_below(side_draw, resize_side_max - resize_side_min + 1)
    new_h, new_w = _resized_size(image_height, image_width, side, height, width)
    return VggTrainParams(side, ops.int_below(top_draw, new_h - height + 1),
                          ops.int_below(left_draw, new_w - width + 1), flip_draw < 0.5)


def apply_train(image: torch.Tensor, height: int, width: int, params: VggTrainParams,
                use_grayscale: bool = False, exact: bool = False,
                source_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Resize to params.resize_side, crop at (top, left), mirror if asked, subtract the means.

    `exact=True` keeps TF's float32 operation order (bit-identical resize); the default picks
    the faster order, which differs by float rounding only. `source_size`: the (height, width)
    of the image the parameters were drawn for, when `image` is a reduced-size decode of it
    (see ``train_decode_size``); the crop then lands on the same part of the picture.
    """
    ops.check_image(image)
    image = ops.to_rgb(image)
    image_height, image_width = source_size or (image.shape[1], image.shape[2])
    new_h, new_w = _resized_size(image_height, image_width, params.resize_side, height, width)
    pixels = ops.resize_bilinear_tf1_window(image, new_h, new_w, (params.top, params.left, height, width),
                                            flip=params.flip, exact=exact)
    return _subtract_means(pixels, use_grayscale)


def train_decode_size(params: VggTrainParams, image_height: int, image_width: int, height: int,
                      width: int) -> tuple[int, int]:
    """The smallest decoded size that loses nothing for `params`: the resized image's size.

    A decode at least this large is only ever shrunk by the resize, as the full image is.
    """
    return _resized_size(image_height, image_width, params.resize_side, height, width)


def plan_train(image_height: int, image_width: int, height: int, width: int,
               resize_side_min: int = RESIZE_SIDE_MIN, resize_side_max: int = RESIZE_SIDE_MAX,
               generator: Optional[torch.Generator] = None) -> tuple[VggTrainParams, tuple[int, int]]:
    """preprocess_for_train's draws from the image size alone, and the decode size they need.

    Draws exactly what preprocess_for_train would from the same generator state, so
    ``apply_train(image, height, width, params)`` gives the same result.
    """
    params = sample_train_params(image_height, image_width, height, width, resize_side_min, resize_side_max,
                                 generator)
    return params, train_decode_size(params, image_height, image_width, height, width)


def preprocess_for_train(image: torch.Tensor, height: int, width: int,
                         resize_side_min: int = RESIZE_SIDE_MIN, resize_side_max: int = RESIZE_SIDE_MAX,
                         use_grayscale: bool = False,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random smaller side in [min, max], random height x width crop, random mirror, minus means."""
    ops.check_image(image)
    params = sample_train_params(image.shape[1], image.shape[2], height, width, resize_side_min,
                                 resize_side_max, generator)
    return apply_train(image, height, width, params, use_grayscale)


def preprocess_for_eval(image: torch.Tensor, height: int, width: int,
                        resize_side: int = RESIZE_SIDE_MIN, use_grayscale: bool = False) -> torch.Tensor:
    """Smaller side to `resize_side` (rint rule), central crop at floor((n - size) / 2), minus means."""
    ops.check_image(image)
    image = ops.to_rgb(image)
    new_h, new_w = _resized_size(image.shape[1], image.shape[2], resize_side, height, width)
    window = ((new_h - height) // 2, (new_w - width) // 2, height, width)
    pixels = ops.resize_bilinear_tf1_window(image, new_h, new_w, window)
    return _subtract_means(pixels, use_grayscale)


def preprocess_image(image: torch.Tensor, height: int, width: int, is_training: bool = False,
                     resize_side_min: int = RESIZE_SIDE_MIN, resize_side_max: int = RESIZE_SIDE_MAX,
                     use_grayscale: bool = False,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """slim's vgg_preprocessing.preprocess_image on a uint8 CHW tensor -> float32 CHW.

    Eval resizes the smaller side to `resize_side_min`, as slim does.
    """
    if is_training:
        return preprocess_for_train(image, height, width, resize_side_min, resize_side_max,
                                    use_grayscale, generator)
    return preprocess_for_eval(image, height, width, resize_side_min, use_grayscale)
