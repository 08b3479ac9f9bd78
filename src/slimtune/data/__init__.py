"""Data sources and loaders: image folders, numpy arrays, the bundled digits, slim TFRecords,
Pascal VOC and manifests — all behind `build_source`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError
from .base import IGNORE, ImageSource, StreamSource
from .labels import read_labels_file, write_labels_file

BUNDLED = ("digits",)


def _slim_dataset_names() -> tuple[str, ...]:
    from . import slim_datasets
    return tuple(slim_datasets.DATASETS)


def available_splits(dataset_name: Optional[str], dataset_dir: Optional[str]) -> list[str]:
    """Split names a dataset offers (for choosing an evaluation split)."""
    if dataset_name == "digits":
        return ["train", "test"]
    if dataset_name and dataset_name in _slim_dataset_names():
        from . import slim_datasets
        return list(slim_datasets.DATASETS[dataset_name].splits)
    if dataset_dir and str(dataset_dir).endswith(".npz"):
        with np.load(dataset_dir, allow_pickle=False) as arrays:
            return sorted(k[: -len("_images")] for k in arrays.files if k.endswith("_images")) or ["all"]
    if dataset_dir:
        from .sources import detect_source
        root = Path(dataset_dir)
        return detect_source(root).splits(root)
    return []


def resolve_split(dataset_name: Optional[str], dataset_dir: Optional[str], split: str) -> str:
    """Turn 'auto' into test, else validation, else val, else the only split there is."""
    if split != "auto":
        return split
    splits = available_splits(dataset_name, dataset_dir)
    for candidate in ("test", "validation", "val"):
        if candidate in splits:
            return candidate
    return splits[0] if splits else "all"


def build_source(dataset_name: Optional[str] = None, dataset_dir: Optional[str] = None,
                 split: str = "train", multi_label: Optional[bool] = None) -> ImageSource | StreamSource:
    """Open a dataset by name and/or directory.

    - `digits` (bundled): scikit-learn's handwritten digits, splits train/test.
    - slim's named datasets (flowers, cifar10, mnist, imagenet, visualwakewords): TFRecord shards
      in dataset_dir as slim's converters wrote them.
    - `voc` or a VOCdevkit directory: Pascal VOC multi-label.
    - a .csv / .jsonl manifest file.
    - a .npz of numpy arrays (`images` uint8 NHWC/NHW/NCHW + `labels`, or `<split>_images` + …).
    - a directory converted by `slimtune data convert` (TFRecords + slimtune_dataset.json).
    - an image folder `dir/<class>/…`, or `dir/<split>/<class>/…`.

    multi_label (None: as the data says) decides a manifest's task type; a line contradicting
    it is an error naming the file and line.
    """
    split = resolve_split(dataset_name, dataset_dir, split)
    if dataset_name == "digits" or (dataset_name is None and dataset_dir is None):
        from .digits import load_digits_source
        return load_digits_source(split)
    if dataset_name and dataset_name in _slim_dataset_names():
        if not dataset_dir:
            raise DataError(f"--dataset_name {dataset_name} needs --dataset_dir with its TFRecord shards")
        from .slim_datasets import get_split
        return get_split(dataset_name, split, dataset_dir)
    if dataset_dir is None:
        raise DataError(f"unknown --dataset_name {dataset_name!r}; give --dataset_dir, or one of "
                        f"{', '.join(BUNDLED + _slim_dataset_names() + ('voc',))}")
    root = Path(dataset_dir).expanduser()
    if not root.exists():
        raise DataError(f"--dataset_dir {root} does not exist")
    if root.suffix == ".npz" and root.is_file():
        from .arrays import load_npz_source
        return load_npz_source(root, split)
    from .sources import detect_source, get_source_kind
    kind = get_source_kind("voc") if dataset_name == "voc" else detect_source(root)
    if kind.name == "manifest":
        from .manifest import ManifestSource
        return ManifestSource(root, multi_label=multi_label)
    return kind.open(root, split)

__all__ = ["IGNORE", "ImageSource", "StreamSource", "available_splits", "build_source", "read_labels_file",
           "resolve_split", "write_labels_file"]
