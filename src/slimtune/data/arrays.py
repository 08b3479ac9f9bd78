"""In-memory numpy arrays as a data source (images uint8 NHWC / NHW / NCHW, labels int)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import DataError
from .base import ImageSource


class ArraySource(ImageSource):
    """Images held in a numpy array with one label (or multi-hot row) per image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Optional[Sequence[str]] = None,
                 multi_label: bool = False) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (0..255), got {images.dtype}; scale and cast first")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            images = images.transpose(0, 2, 3, 1)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(f"images must be NHW, NHWC or NCHW with 1 or 3 channels, got {images.shape}")
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.multi_label = multi_label or labels.ndim == 2
        count = labels.shape[1] if self.multi_label else int(labels.max()) + 1 if len(labels) else 0
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(count)]
        if not self.multi_label and len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise DataError(f"labels must lie in 0..{len(self.class_names) - 1}, got {labels.min()}..{labels.max()}")

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int):
        """The uint8 HWC array and its target."""
        label = self.labels[index]
        target = label.astype(np.float32) if self.multi_label else int(label)
        return self.images[index], target

    def targets(self) -> list:
        """Targets in order."""
        return list(self.labels.astype(np.float32)) if self.multi_label else [int(v) for v in self.labels]


def load_npz_source(path: str | Path, split: str = "train") -> ArraySource:
    """A dataset stored as numpy arrays in one .npz: `images` + `labels`, or `<split>_images` +
    `<split>_labels`; optional `class_names`. Loaded without pickle."""
    path = Path(path)
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable .npz of arrays ({error})") from error
    with arrays:
        keys = set(arrays.files)
        for images_key, labels_key in ((f"{split}_images", f"{split}_labels"), ("images", "labels")):
            if images_key in keys and labels_key in keys:
                names = [str(n) for n in arrays["class_names"]] if "class_names" in keys else None
                return ArraySource(arrays[images_key], arrays[labels_key], class_names=names)
    splits = sorted(k[: -len("_images")] for k in keys if k.endswith("_images"))
    raise DataError(f"{path} has no 'images'/'labels' arrays" +
                    (f" for split {split!r} (it has {', '.join(splits)})" if splits else ""))
