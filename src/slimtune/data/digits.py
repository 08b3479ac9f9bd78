"""The bundled default dataset: scikit-learn's handwritten digits (real scans, shipped offline).

1797 grayscale 8x8 digits with 16 grey levels. We upscale them x3 to 24x24 uint8 images (bilinear)
so that lenet's 28x28 crop-or-pad input holds a readable digit, and split them deterministically:
a stratified 80/20 train/test split with a fixed seed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..errors import DataError
from .arrays import ArraySource

DIGIT_NAMES = [str(d) for d in range(10)]
SPLITS = ("train", "test", "all")


@lru_cache(maxsize=1)
def _upscaled_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits upscaled to 24x24 uint8 (cached: scikit-learn's loader takes seconds)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    images = F.interpolate(images, scale_factor=3, mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    images.setflags(write=False)
    labels = digits.target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def load_digits_source(split: str = "train", seed: int = 0) -> ArraySource:
    """The digits split as an ArraySource of 24x24 grayscale images."""
    if split not in SPLITS:
        raise DataError(f"digits has splits {', '.join(SPLITS)}; got {split!r}")
    images, labels = _upscaled_digits()
    if split != "all":
        rng = np.random.default_rng(seed)
        is_test = np.zeros(len(labels), dtype=bool)
        for digit in range(10):
            members = np.flatnonzero(labels == digit)
            is_test[rng.choice(members, size=len(members) // 5, replace=False)] = True
        keep = is_test if split == "test" else ~is_test
        images, labels = images[keep], labels[keep]
    return ArraySource(images, labels, class_names=DIGIT_NAMES)
