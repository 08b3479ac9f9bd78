"""WebDataset tar shards as a training and evaluation source.

A WebDataset is a set of POSIX tar files ("shards"); the files of one sample share a key
(``000123.jpg`` + ``000123.cls``). It is the PyTorch ecosystem's format for datasets too big for a
folder: shards are read sequentially, so a dataset on a network filesystem or object store streams
as fast as TFRecords do. The tar parsing and the grouping of files into samples are the `webdataset`
library's own (`tar_file_iterator`, `group_by_keys`); this module adds what slimtune's loaders need:
class names, split sizes, labels checked against them, and records spread over ranks and workers
exactly like TFRecord shards (`StreamSource`).

Layout read here (and written by ``slimtune data convert --format webdataset``)::

    out/labels.txt                       0:cat 1:dog ...
    out/webdataset.json                  {"format": "slimtune-webdataset", "splits": {"train": 1200}, ...}
    out/<name>-<split>-000000.tar        <key>.jpg|.png  + <key>.cls (class index, text)
                                                         or <key>.json ({"labels": [...], "ignore": [...]})

A directory of ``*.tar`` shards written by another tool works too when it has labels.txt: its
splits come from the shard names (``...-train-000000.tar``), its sizes from counting the samples.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import Payload, StreamSource, Target
from .labels import LABELS_FILENAME, labels_to_names, read_labels_file

SPEC_FILENAME = "webdataset.json"
SPEC_FORMAT = "slimtune-webdataset"
#: File extensions taken as the sample's image, in order of preference.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "ppm", "tif", "tiff")
_SHARD_SPLIT = re.compile(r"-([A-Za-z0-9_.]+)-\d+\.tar$")


class WebDatasetError(DataError):
    """A WebDataset shard or sample that cannot be read (names the shard and the sample key)."""


def shard_name(name: str, split: str, index: int) -> str:
    """The shard file name `data convert` writes: <name>-<split>-000000.tar."""
    return f"{name}-{split}-{index:06d}.tar"


def is_webdataset(path: Path) -> bool:
    """True for a .tar shard or a directory holding .tar shards."""
    if path.is_file():
        return path.suffix == ".tar"
    return path.is_dir() and ((path / SPEC_FILENAME).is_file() or any(path.glob("*.tar")))


def _read_spec(root: Path) -> dict | None:
    path = root / SPEC_FILENAME
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        if spec.get("format") != SPEC_FORMAT:
            raise ValueError(f"'format' is {spec.get('format')!r}, expected {SPEC_FORMAT!r}")
        spec["splits"] = {str(split): int(size) for split, size in dict(spec["splits"]).items()}
        if any(size < 0 for size in spec["splits"].values()):
            raise ValueError("a split size is negative")
        spec["num_classes"] = int(spec["num_classes"])
        spec["multi_label"] = bool(spec.get("multi_label", False))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: malformed WebDataset description ({error})") from error
    return spec


def _shards_by_split(root: Path) -> dict[str, list[Path]]:
    shards: dict[str, list[Path]] = {}
    for shard in sorted(root.glob("*.tar")):
        match = _SHARD_SPLIT.search(shard.name)
        shards.setdefault(match.group(1) if match else "all", []).append(shard)
    return shards


def webdataset_splits(root: Path) -> list[str]:
    """The splits a WebDataset directory offers."""
    if root.is_file():
        return ["all"]
    spec = _read_spec(root)
    return list(spec["splits"]) if spec else list(_shards_by_split(root))


def write_webdataset_spec(out_dir: Path, name: str, splits: dict[str, int], num_classes: int,
                          multi_label: bool) -> Path:
    """Write the description `open_webdataset` reads (split sizes, classes), atomically."""
    path = out_dir / SPEC_FILENAME
    content = {"format": SPEC_FORMAT, "version": 1, "name": name, "splits": splits,
               "num_classes": num_classes, "multi_label": multi_label,
               "shard_pattern": f"{name}-<split>-NNNNNN.tar",
               "label_encoding": ("<key>.json: {'labels': [positive indices], 'ignore': [ignored indices]}"
                                  if multi_label else "<key>.cls: the class index as text")}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_existing_splits(out_dir: Path, name: str, num_classes: int, multi_label: bool) -> dict[str, int]:
    """Splits already written into out_dir for this dataset; DataError when they disagree with it."""
    spec = _read_spec(out_dir)
    if spec is None:
        return {}
    if spec.get("name") != name or spec["num_classes"] != num_classes or spec["multi_label"] != multi_label:
        raise DataError(f"{out_dir} already holds the WebDataset '{spec.get('name')}' with {spec['num_classes']} "
                        f"classes (multi_label={spec['multi_label']}); write '{name}' to another directory")
    return dict(spec["splits"])


def _samples(shard: Path) -> Iterator[dict]:
    """The samples of one shard as the webdataset library groups them ({'__key__', 'jpg', 'cls', ...})."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:
        with open(shard, "rb") as stream:
            yield from group_by_keys(tar_file_expander([{"stream": stream, "url": str(shard)}]))
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        raise WebDatasetError(f"{shard}: not a readable tar shard ({str(error).split(' @ ')[0]})") from error


class WebDatasetSource(StreamSource):
    """Labelled images from WebDataset tar shards (see the module docstring for the layout)."""

    def __init__(self, shards: list[Path], class_names: list[str], num_samples: int, *,
                 multi_label: bool = False, name: str = "", split: str = "") -> None:
        self.shards = list(shards)
        self.class_names = list(class_names)
        self.num_samples = int(num_samples)
        self.multi_label = multi_label
        self.name, self.split = name, split

    def __len__(self) -> int:
        return self.num_samples

    def iter_shard(self, shard: Path, start: int = 0, step: int = 1) -> Iterator[tuple[Payload, Target, str]]:
        """Yield (image bytes, target, 'shard:key') for samples start, start+step, ... of a shard."""
        for index, sample in enumerate(_samples(shard)):
            if index >= start and (index - start) % step == 0:
                where = f"{shard}:{sample['__key__']}"
                yield self._image(sample, where), self._target(sample, where), where

    @staticmethod
    def _image(sample: dict, where: str) -> bytes:
        for key in IMAGE_KEYS:
            if key in sample:
                return sample[key]
        files = sorted(k for k in sample if not k.startswith("__"))
        raise WebDatasetError(f"{where}: no image file in the sample (has {', '.join(files) or 'nothing'})")

    def _target(self, sample: dict, where: str) -> Target:
        classes = self.num_classes
        try:
            if self.multi_label:
                if "json" not in sample:
                    raise ValueError("a multi-label sample needs <key>.json with 'labels'")
                content = json.loads(sample["json"])
                vector = np.zeros(classes, dtype=np.float32)
                for value, indices in ((1.0, content.get("labels", [])), (-1.0, content.get("ignore", []))):
                    for label in indices:
                        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes:
                            raise ValueError(f"label {label!r} is not a class index below {classes}")
                        vector[label] = value
                return vector
            if "cls" in sample:
                text = sample["cls"].decode("ascii").strip()
                if not re.fullmatch(r"\d{1,9}", text):
                    raise ValueError(f"label {text[:20]!r} is not a class index")
                label = int(text)
            elif "json" in sample:
                label = json.loads(sample["json"])["label"]
            else:
                raise ValueError("no label (<key>.cls or <key>.json)")
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes:
                raise ValueError(f"label {label!r} is not a class index below {classes}")
            return label
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
            raise WebDatasetError(f"{where}: {error}") from error


def open_webdataset(root: Path, split: str) -> WebDatasetSource:
    """One split of a WebDataset directory (or a single .tar shard)."""
    root = Path(root)
    if root.is_file():
        shards, base = [root], root.parent
    else:
        by_split = _shards_by_split(root)
        if split not in by_split:
            from .sources import unknown_split

            raise unknown_split(root, split, webdataset_splits(root))
        shards, base = by_split[split], root
    labels_path = base / LABELS_FILENAME
    if not labels_path.is_file():
        raise DataError(f"{base} has WebDataset shards but no {LABELS_FILENAME} naming the classes")
    class_names = labels_to_names(read_labels_file(labels_path))
    spec = _read_spec(base)
    if spec is not None:
        if spec["num_classes"] != len(class_names):
            raise DataError(f"{base}: {SPEC_FILENAME} says {spec['num_classes']} classes, "
                            f"{LABELS_FILENAME} lists {len(class_names)}")
        if split not in spec["splits"] and not root.is_file():
            raise DataError(f"{base}: shards of split {split!r} are not in {SPEC_FILENAME}")
        size = spec["splits"].get(split)
        multi_label = spec["multi_label"]
    else:
        size, multi_label = None, False
    source = WebDatasetSource(shards, class_names, 0, multi_label=multi_label, name=base.name, split=split)
    # Another tool's shards carry no sizes: count the samples in one pass over the shards.
    source.num_samples = size if size is not None else sum(1 for shard in shards for _ in _samples(shard))
    return source
