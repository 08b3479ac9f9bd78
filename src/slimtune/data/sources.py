"""The kinds of dataset a path can hold, in one registry: how to recognise, list, open and convert each.

`build_source`, `available_splits` and `slimtune data convert` all go through `detect_source` and the
`SourceKind` it returns, so adding a format is one `register_source(...)` here, not an if-chain in
three places. Detection tries the kinds in registration order; the first whose `detect` says yes
wins (a VOCdevkit tree before a folder of class folders, TFRecord shards before a lone manifest).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from ..errors import DataError
from .base import ImageSource, StreamSource

Source = Union[ImageSource, StreamSource]

#: Folder names that mark a `dir/<split>/<class>/...` layout (and the splits `data convert` writes).
SPLIT_NAMES = ("train", "validation", "val", "test", "trainval", "eval")
#: A file that is one of slim's TFRecord shards (train-00000-of-00005, x.tfrecord, x.record-00001).
TFRECORD_NAME = re.compile(r"(\.tfrecords?$|\.record(-|$)|-of-\d+)")
#: Files accepted as a manifest when given directly; a directory's lone manifest needs a data suffix.
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".txt")


@dataclass(frozen=True)
class SourceKind:
    """One kind of dataset path."""

    name: str
    #: what it looks like, for error messages ('class sub-folders with images')
    description: str
    detect: Callable[[Path], bool]
    #: split names the path offers
    splits: Callable[[Path], list[str]]
    open: Callable[[Path, str], Source]
    #: the splits `slimtune data convert` writes: (path, wanted splits or None) -> {split: source};
    #: None when the kind is already what convert writes
    convertible: Optional[Callable[[Path, Optional[list[str]]], dict[str, ImageSource]]] = None


_KINDS: dict[str, SourceKind] = {}


def register_source(kind: SourceKind) -> SourceKind:
    """Add a kind of dataset (detected after the ones registered before it)."""
    _KINDS[kind.name] = kind
    return kind


def get_source_kind(name: str) -> SourceKind:
    """A registered kind by name ('folder', 'voc', 'manifest', 'tfrecord')."""
    if name not in _KINDS:
        raise DataError(f"unknown dataset kind {name!r}; known: {', '.join(_KINDS)}")
    return _KINDS[name]


def detect_source(path: Union[str, os.PathLike]) -> SourceKind:
    """The kind of dataset at `path`; DataError naming what was expected when it is none of them."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset path {path} does not exist")
    for kind in _KINDS.values():
        if kind.detect(path):
            return kind
    if path.is_file():
        raise DataError(f"{path} is a file but neither a manifest ({', '.join(MANIFEST_SUFFIXES)}) "
                        "nor a TFRecord shard")
    expected = ", ".join(kind.description for kind in _KINDS.values())
    raise DataError(f"cannot tell what {path} holds: expected {expected}")


def unknown_split(root: Path, split: str, splits: list[str]) -> DataError:
    """The error for a split a dataset does not have, with the nearest name."""
    close = difflib.get_close_matches(split, splits, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return DataError(f"{root} has no split {split!r}{hint}; its splits are {', '.join(splits)}")


# ---- image folders: dir/<class>/... or dir/<split>/<class>/... --------------------------------------------


def _subfolders(path: Path) -> list[Path]:
    return [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def folder_splits(root: Path) -> list[str]:
    """The split folders of a `dir/<split>/<class>` layout, [] for a flat `dir/<class>` folder."""
    return [p.name for p in _subfolders(root) if p.name in SPLIT_NAMES]


def _is_image_folder(path: Path) -> bool:
    from .folder import IMAGE_EXTENSIONS

    return path.is_dir() and any(any(p.suffix.lower() in IMAGE_EXTENSIONS for p in child.rglob("*"))
                                 for child in _subfolders(path))


def _open_folder(root: Path, split: str) -> ImageSource:
    """A split folder of a split layout (an unknown split is an error, never the whole tree);
    a flat class folder is one split and opens whole."""
    from .folder import ImageFolderSource

    splits = folder_splits(root)
    if not splits:
        return ImageFolderSource(root)
    if split not in splits:
        raise unknown_split(root, split, splits)
    return ImageFolderSource(root / split)


def _convertible_folder(root: Path, wanted: Optional[list[str]]) -> dict[str, ImageSource]:
    from .folder import ImageFolderSource

    splits = folder_splits(root)
    if not splits:
        return {(wanted or ["train"])[0]: ImageFolderSource(root)}
    for split in wanted or []:
        if split not in splits:
            raise unknown_split(root, split, splits)
    return {split: ImageFolderSource(root / split) for split in splits if not wanted or split in wanted}


# ---- Pascal VOC ---------------------------------------------------------------------------------------------

VOC_SPLITS = ["train", "val", "trainval", "test"]


def _is_voc(path: Path) -> bool:
    from .voc import is_voc_root

    return path.is_dir() and is_voc_root(path)


def _open_voc(root: Path, split: str) -> ImageSource:
    from .voc import VOCSource

    return VOCSource(root, split)


def _convertible_voc(root: Path, wanted: Optional[list[str]]) -> dict[str, ImageSource]:
    from .voc import VOCSource

    found = {}
    for split in wanted or ["trainval", "test"]:
        try:
            found[split] = VOCSource(root, split)
        except DataError:
            if wanted:  # asked for explicitly: say what is wrong
                raise
    if not found:
        raise DataError(f"{root}: no VOC split among {', '.join(wanted or ['trainval', 'test'])} could be read")
    return found


# ---- TFRecord shards (slim's converters, `slimtune data convert`) --------------------------------------------


def _is_tfrecord(path: Path) -> bool:
    from .slim_datasets import DATASET_SPEC_FILENAME

    if path.is_file():
        return bool(TFRECORD_NAME.search(path.name))
    return any(child.is_file() and (child.name == DATASET_SPEC_FILENAME or TFRECORD_NAME.search(child.name))
               for child in path.iterdir())


def _tfrecord_splits(root: Path) -> list[str]:
    from .slim_datasets import dataset_spec

    return list(dataset_spec(None, root).splits)


def _open_tfrecord(root: Path, split: str) -> Source:
    from .slim_datasets import get_split

    return get_split(None, split, root)


# ---- WebDataset tar shards ---------------------------------------------------------------------------------


def _is_webdataset(path: Path) -> bool:
    from .webdataset import is_webdataset

    return is_webdataset(path)


def _webdataset_splits(root: Path) -> list[str]:
    from .webdataset import webdataset_splits

    return webdataset_splits(root)


def _open_webdataset(root: Path, split: str) -> Source:
    from .webdataset import open_webdataset

    return open_webdataset(root, split)


# ---- manifests (CSV / JSON lines) ---------------------------------------------------------------------------


def _is_manifest(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() in MANIFEST_SUFFIXES
    from .manifest import MANIFEST_FILE_SUFFIXES

    return len([c for c in path.iterdir() if c.is_file() and c.suffix.lower() in MANIFEST_FILE_SUFFIXES]) == 1


def _open_manifest(root: Path, split: str) -> ImageSource:
    from .manifest import ManifestSource

    return ManifestSource(root)


def _convertible_manifest(root: Path, wanted: Optional[list[str]]) -> dict[str, ImageSource]:
    return {(wanted or ["train"])[0]: _open_manifest(root, "train")}


# Detection order: what a path most specifically is comes first.
register_source(SourceKind("voc", "a VOCdevkit/VOC2007 tree", _is_voc, lambda root: list(VOC_SPLITS), _open_voc,
                           _convertible_voc))
register_source(SourceKind("webdataset", "WebDataset .tar shards", _is_webdataset, _webdataset_splits,
                           _open_webdataset))
register_source(SourceKind("tfrecord", "TFRecord shards", _is_tfrecord, _tfrecord_splits, _open_tfrecord))
register_source(SourceKind("folder", "class sub-folders with images", _is_image_folder,
                           lambda root: folder_splits(root) or ["all"], _open_folder, _convertible_folder))
register_source(SourceKind("manifest", "a manifest file (.csv/.jsonl)", _is_manifest, lambda root: ["all"],
                           _open_manifest, _convertible_manifest))
