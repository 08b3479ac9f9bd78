"""slim's lenet_preprocessing (MNIST): centre-crop or zero-pad, then (x - 128) / 128.

Train and eval are identical in slim (no augmentation). Like slim's, it keeps the image's channels:
LeNet's one channel comes from decoding (the loader decodes to the net's input channels), and
`use_grayscale=True` converts an RGB input with tf.image.rgb_to_grayscale's weights.
Like cifarnet, slim passes (output_width, output_height) as (target_height, target_width); the
swap is kept by default (``slim_size_swap=True``) and only matters for non-square sizes.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops


def preprocess_image(image: torch.Tensor, height: int, width: int, is_training: bool = False,
                     use_grayscale: bool = False, slim_size_swap: bool = True,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """slim's lenet_preprocessing.preprocess_image on a uint8 CHW tensor -> float32 (C, H, W).

    `is_training` and `generator` are accepted for a uniform signature: nothing is random.
    """
    del is_training, generator
    ops.check_image(image)
    target_h, target_w = (width, height) if slim_size_swap else (height, width)
    values = ops.crop_or_pad(image, target_h, target_w).to(torch.float32)
    if use_grayscale and values.shape[0] == 3:
        values = ops.rgb_to_grayscale(values)
    return values.sub_(128.0).div_(128.0)
