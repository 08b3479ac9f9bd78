"""TF-Slim's named TFRecord datasets (flowers, cifar10, mnist, imagenet, visualwakewords) and
datasets written by `slimtune.data.convert`, as stream sources over their shards.

`get_split(dataset_name, split_name, dataset_dir)` plays the part of slim's
``dataset_factory.get_dataset``: same file patterns, split sizes, class counts, labels.txt and
Example keys, so shards made by slim's download_and_convert scripts are read as they are. What
differs on purpose:
- missing or incomplete shards fail at once with the pattern and directory, instead of slim's
  "FIFOQueue is closed and has insufficient elements" at the first step;
- a record without a label, or with a label outside [0, num_classes), is an error naming the
  shard and record (slim silently used label 0);
- visualwakewords' validation split is 'val' (the file names its converter writes); slim's
  reader asked for 'validation.record-*', which never exists. Both names are accepted.
- nothing is downloaded: imagenet without labels.txt gets 'background' plus numbered names.

A dataset written by `convert_to_tfrecord` carries a small JSON spec (`DATASET_SPEC_FILENAME`)
beside its shards, so `get_split(None, split, dir)` reads it with no registration.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ConfigError, DataError
from .base import Payload, StreamSource, Target
from .labels import MAX_NUM_CLASSES, read_labels_file
from .decode import UnreadablePayload
from .tfrecord import TFRecordError, count_records, iter_tfrecord, parse_example

LABELS_FILENAME = "labels.txt"
DATASET_SPEC_FILENAME = "slimtune_dataset.json"
SPEC_FORMAT = "slimtune-dataset-spec"
SPEC_VERSION = 1

# Example keys. The first five are slim's dataset_utils.image_to_tfexample keys.
KEY_ENCODED = "image/encoded"
KEY_FORMAT = "image/format"
KEY_LABEL = "image/class/label"
KEY_HEIGHT = "image/height"
KEY_WIDTH = "image/width"
KEY_FILENAME = "image/filename"
KEY_LABEL_TEXT = "image/class/text"
KEY_OBJECT_LABEL = "image/object/class/label"
KEY_BBOX_PREFIX = "image/object/bbox/"
# slimtune's extension for multi-label data: class indices whose label is "ignore" (-1), e.g. a
# VOC class present only as 'difficult' objects. Readers that do not know it just skip it.
KEY_IGNORE = "image/class/ignore"


@dataclass(frozen=True)
class DatasetSpec:
    """Everything needed to find and read one TFRecord dataset's splits."""

    name: str
    file_pattern: str                     # relative to dataset_dir, '%s' stands for the split
    splits: dict[str, int]                # split name -> number of samples
    num_classes: int
    default_format: str = "jpeg"          # slim's default for a missing image/format
    raw_shape: tuple[int, ...] | None = None  # pixel layout of format 'raw' records
    channels: int = 3
    multi_label: bool = False
    split_aliases: dict[str, str] = field(default_factory=dict)
    default_class_names: tuple[str, ...] = ()
    background_class: bool = False        # index 0 is 'background' (slim's 1001-class ImageNet)

    def resolve_split(self, split_name: str) -> str:
        """Map a user's split name (aliases included) to the dataset's own."""
        split = self.split_aliases.get(split_name, split_name)
        if split not in self.splits:
            known = sorted(set(self.splits) | set(self.split_aliases))
            raise ConfigError(f"dataset '{self.name}' has no split '{split_name}': use one of "
                              f"{', '.join(known)} (--dataset_split_name)")
        return split


_VAL = {"val": "validation"}

DATASETS: dict[str, DatasetSpec] = {
    "flowers": DatasetSpec(
        "flowers", "flowers_%s_*.tfrecord", {"train": 3320, "validation": 350}, 5,
        default_format="png", split_aliases=_VAL,
        default_class_names=("daisy", "dandelion", "roses", "sunflowers", "tulips")),
    "cifar10": DatasetSpec(
        "cifar10", "cifar10_%s.tfrecord", {"train": 50000, "test": 10000}, 10,
        default_format="png",
        default_class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                             "horse", "ship", "truck")),
    "mnist": DatasetSpec(
        "mnist", "mnist_%s.tfrecord", {"train": 60000, "test": 10000}, 10,
        default_format="raw", raw_shape=(28, 28, 1), channels=1,
        default_class_names=tuple(str(digit) for digit in range(10))),
    "imagenet": DatasetSpec(
        "imagenet", "%s-*", {"train": 1281167, "validation": 50000}, 1001,
        split_aliases=_VAL, background_class=True),
    "visualwakewords": DatasetSpec(
        "visualwakewords", "%s.record-*", {"train": 82783, "val": 40504}, 2,
        split_aliases={"validation": "val"}, default_class_names=("background", "person")),
}


def list_datasets() -> list[str]:
    """Names of the registered (slim) datasets."""
    return sorted(DATASETS)


# --------------------------------------------------------------------------------------------
# Spec JSON written by the converter
# --------------------------------------------------------------------------------------------

def write_dataset_spec(dataset_dir: str | os.PathLike, spec: DatasetSpec, extra: dict | None = None) -> Path:
    """Write `spec` as DATASET_SPEC_FILENAME in dataset_dir; return its path."""
    path = Path(dataset_dir) / DATASET_SPEC_FILENAME
    content = {
        "format": SPEC_FORMAT, "version": SPEC_VERSION, "name": spec.name,
        "file_pattern": spec.file_pattern, "splits": dict(spec.splits),
        "num_classes": spec.num_classes, "multi_label": spec.multi_label,
        "default_format": spec.default_format, "channels": spec.channels,
        "label_key": KEY_LABEL,
        "label_encoding": ("list of positive class indices; " + KEY_IGNORE + " lists ignored ones"
                           if spec.multi_label else "one class index"),
    }
    content.update(extra or {})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_dataset_spec(dataset_dir: str | os.PathLike) -> DatasetSpec | None:
    """Read the converter's spec JSON from dataset_dir, or None when there is none."""
    path = Path(dataset_dir) / DATASET_SPEC_FILENAME
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if content.get("format") != SPEC_FORMAT:
            raise ValueError(f"'format' is {content.get('format')!r}, expected {SPEC_FORMAT!r}")
        if int(content.get("version", 0)) > SPEC_VERSION:
            raise ValueError(f"version {content['version']} is newer than this slimtune reads "
                             f"({SPEC_VERSION}); upgrade slimtune")
        if not isinstance(content, dict):
            raise ValueError("the file is not a JSON object")
        pattern = str(content["file_pattern"])
        if "%s" not in pattern:
            raise ValueError("'file_pattern' must contain %s for the split name")
        check_pattern(pattern, path)
        splits = {str(name): _split_size(name, size) for name, size in dict(content["splits"]).items()}
        num_classes = content["num_classes"]
        if type(num_classes) is not int or not 1 <= num_classes <= MAX_NUM_CLASSES:
            raise DataError(f"{path}: num_classes must be an integer in 1..{MAX_NUM_CLASSES}, got "
                            f"{str(num_classes)[:40]}")
        spec = DatasetSpec(
            name=str(content["name"]), file_pattern=pattern, splits=splits,
            num_classes=num_classes, multi_label=bool(content.get("multi_label", False)),
            default_format=str(content.get("default_format", "jpeg")),
            channels=int(content.get("channels", 3)), split_aliases=_aliases_for(splits))
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError) as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise DataError(f"{path}: malformed dataset spec ({reason}); re-run the conversion or "
                        "fix the file") from None
    if spec.num_classes < 1:
        raise DataError(f"{path}: num_classes must be >= 1")
    return spec


def _split_size(name: object, size: object) -> int:
    """A split's example count: a non-negative integer."""
    if type(size) is not int or size < 0:
        raise ValueError(f"split {str(name)[:40]!r} has size {str(size)[:40]}; sizes are counts (integers >= 0)")
    return size


def check_pattern(pattern: str, where: object) -> None:
    """Refuse a shard pattern that could reach outside the dataset directory (absolute, or '..')."""
    parts = pattern.replace("\\", "/").split("/")
    if os.path.isabs(pattern) or ".." in parts or (len(pattern) > 1 and pattern[1] == ":"):
        raise DataError(f"{where}: file pattern {pattern!r} must name shards inside the dataset directory "
                        "(no absolute path, no '..'); point --dataset_dir at the shards instead")


def _aliases_for(splits: dict[str, int]) -> dict[str, str]:
    """Accept 'val' for 'validation' and back, whichever one the data has."""
    if "validation" in splits and "val" not in splits:
        return {"val": "validation"}
    if "val" in splits and "validation" not in splits:
        return {"validation": "val"}
    return {}


def dataset_spec(dataset_name: str | None, dataset_dir: str | os.PathLike | None = None) -> DatasetSpec:
    """The spec for a registered name, or the converter's spec found in dataset_dir."""
    local = read_dataset_spec(dataset_dir) if dataset_dir is not None and Path(dataset_dir).is_dir() else None
    if local is not None and (not dataset_name or dataset_name == local.name):
        return local  # the converter's record of this very data beats the registry's sizes
    if dataset_name in DATASETS:
        return DATASETS[dataset_name]
    where = f" and {dataset_dir} holds no {DATASET_SPEC_FILENAME}" if dataset_dir is not None else ""
    if not dataset_name:
        raise ConfigError(f"no --dataset_name given{where}: name one of {', '.join(list_datasets())}, "
                          "or point --dataset_dir at shards written by `slimtune convert`")
    hint = f" (found a dataset named '{local.name}' there)" if local is not None else ""
    raise ConfigError(f"unknown dataset '{dataset_name}'{where}{hint}: use one of "
                      f"{', '.join(list_datasets())}, or convert your data with `slimtune convert`")


# --------------------------------------------------------------------------------------------
# Finding shards
# --------------------------------------------------------------------------------------------

_SHARD_NUMBER = re.compile(r"(\d+)-of-(\d+)")


def find_shards(dataset_dir: str | os.PathLike, pattern: str, description: str = "",
                check_complete: bool = True) -> list[Path]:
    """Sorted files matching `pattern` in dataset_dir; DataError when none, or (check_complete)
    when a numbered 'N-of-M' set lacks a member."""
    directory = Path(dataset_dir)
    label = f" for {description}" if description else ""
    if not directory.is_dir():
        raise DataError(f"dataset directory {directory} does not exist (--dataset_dir)")
    check_pattern(pattern, f"dataset{label}")
    # Path.glob keeps the directory literal (it may contain glob characters itself).
    matches = sorted(p for p in directory.glob(pattern) if p.is_file() and not p.name.endswith(".tmp"))
    if not matches:
        others = sorted(p.name for p in directory.iterdir()
                        if p.is_file() and ("tfrecord" in p.name or ".record" in p.name or "-of-" in p.name))
        seen = f"; files there that look like shards: {', '.join(others[:5])}" if others else \
            "; the directory holds no TFRecord shards"
        raise DataError(f"no TFRecord shards{label}: nothing matches '{pattern}' in {directory}{seen} "
                        "(check --dataset_dir, --dataset_name and --dataset_split_name)")
    if check_complete:
        _check_complete(matches, directory, pattern)
    return matches


def _check_complete(shards: list[Path], directory: Path, pattern: str) -> None:
    """Shards named 'xxx-0000N-of-0000M' must all be there: a missing one silently loses data."""
    groups: dict[tuple[str, int], set[int]] = {}
    for shard in shards:
        found = _SHARD_NUMBER.search(shard.name)
        if found:
            stem = shard.name[:found.start()]
            groups.setdefault((stem, int(found.group(2))), set()).add(int(found.group(1)))
    for (stem, total), present in groups.items():
        if total > 100_000:   # never build a set sized by what a file name claims
            raise DataError(f"shard {stem}*-of-{total} in {directory} claims {total} shards; "
                            f"{len(present)} present (a stray or corrupt file name?)")
        missing = sorted(set(range(total)) - present)
        if missing:
            raise DataError(f"incomplete shard set '{pattern}' in {directory}: {len(present)} of "
                            f"{total} '{stem}*-of-{total:05d}' shards present, missing number(s) "
                            f"{', '.join(map(str, missing[:10]))} (a conversion was interrupted "
                            "or a copy is incomplete)")


# --------------------------------------------------------------------------------------------
# The stream source
# --------------------------------------------------------------------------------------------

def class_names_for(spec: DatasetSpec, dataset_dir: str | os.PathLike) -> list[str]:
    """Class names from labels.txt in dataset_dir, else the dataset's known names, else numbers."""
    defaults = list(spec.default_class_names)
    if spec.background_class and not defaults:
        defaults = ["background"]
    names = [defaults[i] if i < len(defaults) else str(i) for i in range(spec.num_classes)]
    labels_path = Path(dataset_dir) / LABELS_FILENAME
    if labels_path.is_file():
        from_file = read_labels_file(labels_path)
        too_big = [index for index in from_file if not 0 <= index < spec.num_classes]
        if too_big:
            raise DataError(f"{labels_path}: label {max(too_big)} is outside [0, {spec.num_classes}) "
                            f"for dataset '{spec.name}' (wrong labels.txt, or the data has more classes)")
        for index, name in from_file.items():
            names[index] = name
    return names


class TFRecordSource(StreamSource):
    """Labelled images from TFRecord shards of tf.train.Example records with slim's keys.

    Payloads are the encoded image bytes, or a uint8 HxWxC array for format 'raw' records
    (slim's MNIST layout). Targets are the int in image/class/label, or for a multi-label dataset
    a multi-hot float32 vector built from the list of positive indices in image/class/label
    (1) and image/class/ignore (-1).
    """

    def __init__(self, shards: list[Path], class_names: list[str], num_samples: int, *,
                 name: str = "", split: str = "", multi_label: bool = False,
                 default_format: str = "jpeg", raw_shape: tuple[int, ...] | None = None,
                 channels: int = 3, verify: bool = True, compression: str | None = "auto"):
        self.shards = list(shards)
        self.class_names = list(class_names)
        self.num_samples = int(num_samples)
        self.name = name
        self.split = split
        self.multi_label = multi_label
        self.default_format = default_format
        self.raw_shape = tuple(raw_shape) if raw_shape else None
        self.channels = channels
        self.verify = verify
        self.compression = compression

    def __len__(self) -> int:
        return self.num_samples

    def count_records(self) -> int:
        """Count the records actually present in the shards (reads headers only)."""
        return sum(count_records(shard, self.compression) for shard in self.shards)

    def iter_shard(self, shard: Path, start: int = 0, step: int = 1) -> Iterator[tuple[Payload, Target, str]]:
        """Yield (payload, target, description) for records start, start+step, ... of a shard.

        start/step let several DataLoader workers share one shard (cifar10 and mnist have a
        single file per split) without reading each other's payloads.
        """
        for item in self.iter_items(shard, start, step):
            yield item["image"], item["label"], item["description"]

    def iter_items(self, shard: Path, start: int = 0, step: int = 1) -> Iterator[dict]:
        """Yield slim's decoded items per record: image, label, plus whatever the record holds of
        format, filename, height, width, label_text, object/bbox (N x [ymin, xmin, ymax, xmax])
        and object/label, and a description naming shard and record.

        A record that is not a well-formed Example, or whose features have the wrong kind (the
        image as floats, an empty image list, the width as bytes, ...), is a bad record: its
        item's image is an `UnreadablePayload`, which decoding refuses like a corrupt image, so
        training skips and counts it (or stops with the reason under --on_bad_image fail).
        """
        for offset, record in enumerate(iter_tfrecord(shard, self.verify, self.compression, start, step)):
            index = start + offset * step
            where = f"{shard}:record {index}"
            try:
                item = self._items(parse_example(record), where)
            except _BadRecord as error:
                item = {"image": UnreadablePayload(str(error)), "label": self._empty_target(),
                        "format": "", "description": where}
            except TFRecordError as error:
                if "malformed tf.train.Example" not in str(error):
                    raise
                item = {"image": UnreadablePayload(f"{where}: {error}"), "label": self._empty_target(),
                        "format": "", "description": where}
            yield item

    def _empty_target(self) -> Target:
        return np.zeros(self.num_classes, np.float32) if self.multi_label else 0

    def _items(self, example: dict, where: str) -> dict:
        image_format = _text(example, KEY_FORMAT, where) or self.default_format
        encoded = example.get(KEY_ENCODED)
        if encoded is None:
            raise TFRecordError(f"{where}: record has no {KEY_ENCODED}")
        if not isinstance(encoded, list):
            raise _BadRecord(f"{where}: {KEY_ENCODED} is a {_kind(encoded)} list, expected bytes")
        if not encoded:
            raise _BadRecord(f"{where}: {KEY_ENCODED} is an empty list")
        filename = _text(example, KEY_FILENAME, where)
        items: dict = {
            "image": self._payload(encoded[0], image_format.lower(), where),
            "label": self._target(example, where),
            "format": image_format,
            "description": f"{where} ({filename})" if filename else where,
        }
        if filename:
            items["filename"] = filename
        for key, item in ((KEY_HEIGHT, "height"), (KEY_WIDTH, "width")):
            values = _numbers(example, key, where, np.int64)
            if values is not None and len(values):
                items[item] = int(values[0])
        text = _text(example, KEY_LABEL_TEXT, where)
        if text is not None:
            items["label_text"] = text
        corners = [_numbers(example, KEY_BBOX_PREFIX + side, where, np.float32)
                   for side in ("ymin", "xmin", "ymax", "xmax")]
        if all(c is not None for c in corners):
            lengths = {len(c) for c in corners}
            if len(lengths) != 1:
                raise TFRecordError(f"{where}: bounding-box coordinate lists differ in length")
            items["object/bbox"] = np.stack([np.asarray(c, np.float32) for c in corners], axis=1) \
                if lengths != {0} else np.zeros((0, 4), np.float32)
        object_labels = _numbers(example, KEY_OBJECT_LABEL, where, np.int64)
        if object_labels is not None:
            items["object/label"] = np.asarray(object_labels, dtype=np.int64)
        return items

    def _payload(self, data: bytes, image_format: str, where: str) -> Payload:
        if image_format != "raw":
            return data
        if self.raw_shape is None:
            raise TFRecordError(f"{where}: image/format is 'raw' but dataset '{self.name}' has no "
                                "known pixel shape for raw records")
        expected = int(np.prod(self.raw_shape))
        if len(data) != expected:
            raise TFRecordError(f"{where}: raw image has {len(data)} bytes, expected {expected} "
                                f"for shape {self.raw_shape}")
        return np.frombuffer(data, dtype=np.uint8).reshape(self.raw_shape).copy()

    def _target(self, example: dict, where: str) -> Target:
        labels = example.get(KEY_LABEL)
        if labels is None or (not self.multi_label and len(labels) == 0):
            raise TFRecordError(f"{where}: record has no {KEY_LABEL}")
        labels = _numbers(example, KEY_LABEL, where, np.int64)
        num_classes = self.num_classes
        if self.multi_label:
            target = np.zeros(num_classes, dtype=np.float32)
            ignore = _numbers(example, KEY_IGNORE, where, np.int64)
            for values, value in ((labels, 1.0), (ignore if ignore is not None else [], -1.0)):
                for label in values:
                    if not 0 <= int(label) < num_classes:
                        raise DataError(f"{where}: label {int(label)} is outside [0, {num_classes}) "
                                        f"for dataset '{self.name}'")
                    target[int(label)] = value
            return target
        if len(labels) != 1:
            raise TFRecordError(f"{where}: {len(labels)} labels in a single-label dataset "
                                f"('{self.name}' is not marked multi_label)")
        label = int(labels[0])
        if not 0 <= label < num_classes:
            raise DataError(f"{where}: label {label} is outside [0, {num_classes}) for dataset "
                            f"'{self.name}' (wrong --dataset_name, or labels written with an offset)")
        return label


class _BadRecord(TFRecordError):
    """A record whose features have the wrong kind: skipped and counted like a corrupt image."""


def _kind(values: object) -> str:
    if isinstance(values, list):
        return "bytes"
    return "float" if getattr(values, "dtype", None) == np.float32 else "int64"


def _numbers(example: dict, key: str, where: str, dtype: type) -> np.ndarray | None:
    """A numeric feature of the expected kind (int64 or float), or None when absent.

    An empty list of any kind reads as an empty array: protobuf cannot tell their kinds apart.
    """
    values = example.get(key)
    if values is None:
        return None
    if len(values) == 0:
        return np.zeros(0, dtype)
    if not isinstance(values, np.ndarray) or values.dtype != dtype:
        expected = "int64" if dtype is np.int64 else "float"
        raise _BadRecord(f"{where}: {key} is a {_kind(values)} list, expected {expected}")
    return values


def _text(example: dict, key: str, where: str) -> str | None:
    """The first value of a bytes feature as text, or None when absent or empty."""
    values = example.get(key)
    if values is None or len(values) == 0:
        return None
    if not isinstance(values, list):
        raise _BadRecord(f"{where}: {key} is a {_kind(values)} list, expected bytes")
    return values[0].decode("utf-8", errors="replace")


def get_split(dataset_name: str | None, split_name: str, dataset_dir: str | os.PathLike,
              file_pattern: str | None = None, verify: bool = True) -> TFRecordSource:
    """Open one split of a slim dataset (or of a dataset_dir written by the converter).

    file_pattern overrides the dataset's pattern ('%s' is replaced by the split name), as in
    slim. Raises ConfigError for an unknown name or split, DataError when no shard matches.
    """
    spec = dataset_spec(dataset_name, dataset_dir)
    split = spec.resolve_split(split_name)
    pattern = file_pattern or spec.file_pattern
    pattern = pattern % split if "%s" in pattern else pattern
    # A pattern of the user's own may pick a subset of shards on purpose.
    shards = find_shards(dataset_dir, pattern, f"dataset '{spec.name}' split '{split}'",
                         check_complete=file_pattern is None)
    return TFRecordSource(shards, class_names_for(spec, dataset_dir), spec.splits[split],
                          name=spec.name, split=split, multi_label=spec.multi_label,
                          default_format=spec.default_format, raw_shape=spec.raw_shape,
                          channels=spec.channels, verify=verify)
