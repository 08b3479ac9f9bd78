"""The images every export is checked on, and the check itself.

An export is run in its own runtime on the same real images as the eager (unexported) model;
it passes when max |exported - eager| over the logits is at most 1e-4 of the largest |logit|.
Images: the user's (--verify_images), else scikit-image's sample photos when installed, else
the bundled handwritten digit scans (every install has them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import SlimtuneError

#: the largest allowed max |exported - eager| as a fraction of the largest |eager logit| (fp32).
RELATIVE_TOLERANCE = 1e-4


class VerificationError(SlimtuneError):
    """The exported file does not compute what the trained model computes."""


@dataclass
class VerificationImages:
    """Real images as decoded uint8 HWC arrays, with where they came from."""

    arrays: list[np.ndarray]
    source: str


def _skimage_photos() -> Optional[list[np.ndarray]]:
    try:
        from skimage import data
    except ImportError:
        return None
    return [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]


def load_verification_images(paths: Optional[Sequence[str]], channels: int, count: int = 4) -> VerificationImages:
    """Up to `count` real images (decoded with `channels` channels) to compare runtimes on."""
    from ..data.decode import decode_image

    if paths:
        from ..data.folder import expand_inputs

        files = expand_inputs(paths)[:count]
        return VerificationImages([decode_image(p, channels, description=str(p)) for p in files],
                                  ", ".join(str(p) for p in files))
    photos = _skimage_photos()
    source = "scikit-image sample photos (chelsea, coffee, astronaut, rocket)"
    if photos is None:
        from ..data.digits import _upscaled_digits

        images, _ = _upscaled_digits()
        photos = [np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image for image in images[:count]]
        source = "bundled handwritten digit scans"
    arrays = []
    for photo in photos[:count]:
        photo = np.ascontiguousarray(photo[..., :3]) if photo.ndim == 3 else photo[..., None]
        if channels == 1 and photo.shape[2] == 3:
            photo = np.round(photo.astype(np.float32) @ np.array([0.2989, 0.5870, 0.1140], np.float32))
            photo = photo.clip(0, 255).astype(np.uint8)[..., None]
        elif channels == 3 and photo.shape[2] == 1:
            photo = np.repeat(photo, 3, axis=2)
        arrays.append(photo)
    return VerificationImages(arrays, source)


def preprocess_batch(images: VerificationImages, preprocessing: str, image_size: int) -> torch.Tensor:
    """The net's eval preprocessing of every image, stacked: float32 NCHW."""
    from ..preprocessing import get_preprocessing

    preprocess = get_preprocessing(preprocessing, is_training=False)
    return torch.stack([preprocess(torch.from_numpy(a).permute(2, 0, 1).contiguous(), image_size, image_size)
                        for a in images.arrays])


@dataclass
class Comparison:
    """How far an exported file's logits are from the eager model's."""

    max_abs_diff: float
    largest_logit: float
    top1_agreement: float
    num_images: int

    @property
    def relative(self) -> float:
        """max diff / largest |logit|."""
        return self.max_abs_diff / max(self.largest_logit, 1e-12)

    def line(self, runtime: str) -> str:
        """One printed line: what was compared and how far apart."""
        return (f"verified in {runtime} on {self.num_images} images: max |diff| {self.max_abs_diff:.3g} "
                f"(largest |logit| {self.largest_logit:.4g}, ratio {self.relative:.3g}), "
                f"top-1 agreement {self.top1_agreement:.3f}")


def compare(expected: np.ndarray, actual: np.ndarray) -> Comparison:
    """Compare exported logits with eager ones (both [N, C])."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if expected.shape != actual.shape:
        raise VerificationError(f"exported model returns logits of shape {actual.shape}, expected {expected.shape}")
    if not np.all(np.isfinite(actual)):
        raise VerificationError("exported model returns non-finite logits")
    diff = float(np.max(np.abs(expected - actual))) if expected.size else 0.0
    agreement = float(np.mean(expected.argmax(-1) == actual.argmax(-1))) if expected.size else 1.0
    return Comparison(diff, float(np.max(np.abs(expected))) if expected.size else 0.0, agreement, expected.shape[0])


def check_close(comparison: Comparison, runtime: str, tolerance: float = RELATIVE_TOLERANCE) -> str:
    """The printed line, or VerificationError when the export is further than `tolerance` allows."""
    line = comparison.line(runtime)
    if comparison.max_abs_diff > tolerance * comparison.largest_logit:
        raise VerificationError(f"export NOT written: {line} exceeds {tolerance:g} of the largest logit")
    return line
