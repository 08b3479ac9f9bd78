"""Pascal VOC 2007 as a multi-label classification source.

Layout (the VOCdevkit tarballs, trainval and test extracted into the same tree)::

    VOCdevkit/VOC2007/JPEGImages/<id>.jpg
    VOCdevkit/VOC2007/Annotations/<id>.xml
    VOCdevkit/VOC2007/ImageSets/Main/<split>.txt            one image id per line
    VOCdevkit/VOC2007/ImageSets/Main/<class>_<split>.txt    '<id> <1|-1|0>' per line

Targets follow the VOC classification protocol: 1 when the class has a non-difficult object in
the image, -1 (ignored by losses and metrics) when all its objects are marked difficult, 0
otherwise. Labels come from the annotation XML; when a tree has no Annotations folder, the
per-class ImageSets lists are used instead (their 0 means "difficult only", i.e. our -1).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .base import IGNORE, ImageSource

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
VOC_SPLITS = ("train", "val", "trainval", "test")


@dataclass(frozen=True)
class VOCObject:
    """One annotated object: class name, flags and its box in pixels (xmin, ymin, xmax, ymax)."""

    name: str
    difficult: bool
    truncated: bool
    bbox: tuple[float, float, float, float] | None


@dataclass(frozen=True)
class VOCAnnotation:
    """The parts of a VOC annotation XML that classification and boxes need."""

    filename: str
    width: int | None
    height: int | None
    objects: tuple[VOCObject, ...]


def read_annotation(path: str | os.PathLike) -> VOCAnnotation:
    """Parse one Annotations/<id>.xml; malformed XML raises DataError naming the file."""
    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
    except FileNotFoundError as error:
        raise DataError(f"VOC annotation missing: {path}") from error
    except ElementTree.ParseError as error:
        raise DataError(f"{path}: malformed annotation XML ({error})") from error
    if root.tag != "annotation":
        raise DataError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    objects = []
    for element in root.findall("object"):
        name = (element.findtext("name") or "").strip()
        if not name:
            raise DataError(f"{path}: an <object> has no <name>")
        objects.append(VOCObject(name=name, difficult=_flag(element, "difficult", path),
                                 truncated=_flag(element, "truncated", path), bbox=_bbox(element, path)))
    return VOCAnnotation(filename=(root.findtext("filename") or "").strip(),
                         width=_int(size, "width", path), height=_int(size, "height", path),
                         objects=tuple(objects))


def _flag(element: ElementTree.Element, tag: str, path: Path) -> bool:
    text = (element.findtext(tag) or "0").strip()
    if text not in ("0", "1"):
        raise DataError(f"{path}: <{tag}> must be 0 or 1, got {text!r}")
    return text == "1"


def _int(element: ElementTree.Element | None, tag: str, path: Path) -> int | None:
    if element is None or element.findtext(tag) is None:
        return None
    text = element.findtext(tag).strip()
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}: <{tag}> is not a number ({text[:40]!r})") from None
    # inf, nan, negative or absurd sizes: no image has them (and int(inf) would raise).
    if not math.isfinite(value) or not 0 <= value <= 1 << 20:
        raise DataError(f"{path}: <{tag}> {text[:40]!r} is not an image size")
    return int(value)


def _bbox(element: ElementTree.Element, path: Path) -> tuple[float, float, float, float] | None:
    box = element.find("bndbox")
    if box is None:
        return None
    try:
        corners = tuple(float(box.findtext(side)) for side in ("xmin", "ymin", "xmax", "ymax"))
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: <bndbox> needs numeric xmin, ymin, xmax, ymax") from error
    if not all(math.isfinite(corner) for corner in corners):
        raise DataError(f"{path}: <bndbox> has a non-finite coordinate {corners}")
    return corners  # type: ignore[return-value]


def find_voc_root(path: str | os.PathLike, year: str = "2007") -> Path:
    """The VOC<year> folder, given it, its VOCdevkit parent, or the folder holding VOCdevkit."""
    path = Path(path)
    candidates = [path, path / f"VOC{year}", path / "VOCdevkit" / f"VOC{year}"]
    for candidate in candidates:
        if (candidate / "JPEGImages").is_dir() and (candidate / "ImageSets" / "Main").is_dir():
            return candidate
    raise DataError(f"{path} is not a Pascal VOC {year} tree: expected JPEGImages/ and "
                    f"ImageSets/Main/ in it, in VOC{year}/ or in VOCdevkit/VOC{year}/")


def is_voc_root(path: str | os.PathLike, year: str = "2007") -> bool:
    """True when `find_voc_root` would accept the path."""
    try:
        find_voc_root(path, year)
    except DataError:
        return False
    return True


def _is_file(path: Path) -> bool:
    """Path.is_file, answering False for names too long for the file system or holding NUL."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _read_text(path: Path) -> str:
    """A VOC list file's text; DataError naming the file when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _read_ids(path: Path) -> list[str]:
    ids = []
    for line in _read_text(path).splitlines():
        fields = line.split()
        if fields:
            ids.append(fields[0])
    return ids


class VOCSource(ImageSource):
    """Pascal VOC classification: image paths with 20-class targets in {1, 0, -1}."""

    multi_label = True

    def __init__(self, root: str | os.PathLike, split: str = "trainval", year: str = "2007"):
        if split not in VOC_SPLITS:
            raise ConfigError(f"VOC has no split '{split}': use one of {', '.join(VOC_SPLITS)} "
                              "(--dataset_split_name)")
        self.root = find_voc_root(root, year)
        self.split = split
        self.class_names = list(VOC_CLASSES)
        main = self.root / "ImageSets" / "Main"
        split_file = main / f"{split}.txt"
        class_files = [main / f"{name}_{split}.txt" for name in VOC_CLASSES]
        if split_file.is_file():
            self.ids = _read_ids(split_file)
        elif class_files[0].is_file():
            self.ids = _read_ids(class_files[0])
        else:
            hint = (" (the VOC2007 test set is a separate download, VOCtest_06-Nov-2007.tar; "
                    "extract it into the same VOCdevkit)" if split == "test" else "")
            raise DataError(f"VOC split list {split_file} not found{hint}")
        if not self.ids:
            raise DataError(f"VOC split list {split_file} is empty")
        missing = [image_id for image_id in self.ids
                   if not _is_file(self.root / "JPEGImages" / f"{image_id}.jpg")]
        if missing:
            raise DataError(f"{len(missing)} of the {len(self.ids)} images listed in {split_file.name} "
                            f"are missing from {self.root / 'JPEGImages'} (first: {missing[0]}.jpg); "
                            "the VOC tree is incomplete")
        if (self.root / "Annotations").is_dir():
            self._labels = self._labels_from_annotations()
        else:
            self._labels = self._labels_from_class_lists(class_files)

    def _labels_from_annotations(self) -> np.ndarray:
        labels = np.zeros((len(self.ids), len(VOC_CLASSES)), dtype=np.int8)
        column = {name: index for index, name in enumerate(VOC_CLASSES)}
        for row, image_id in enumerate(self.ids):
            path = self.root / "Annotations" / f"{image_id}.xml"
            for obj in read_annotation(path).objects:
                if obj.name not in column:
                    raise DataError(f"{path}: unknown VOC class {obj.name!r} (expected one of the "
                                    "20 VOC classes)")
                index = column[obj.name]
                if not obj.difficult:
                    labels[row, index] = 1
                elif labels[row, index] == 0:
                    # Difficult only (so far): ignored unless a clear object of the class shows up.
                    labels[row, index] = int(IGNORE)
        return labels

    def _labels_from_class_lists(self, class_files: list[Path]) -> np.ndarray:
        row_of = {image_id: row for row, image_id in enumerate(self.ids)}
        labels = np.zeros((len(self.ids), len(VOC_CLASSES)), dtype=np.int8)
        for column, path in enumerate(class_files):
            if not path.is_file():
                raise DataError(f"{self.root} has no Annotations/ and no {path.name} to take "
                                "labels from")
            for number, line in enumerate(_read_text(path).splitlines(), start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2 or fields[1] not in ("1", "-1", "0") or fields[0] not in row_of:
                    raise DataError(f"{path}:{number}: expected '<image id of the split> <1|-1|0>', "
                                    f"got {line!r}")
                # VOC's lists say 1 present, -1 absent, 0 difficult-only.
                labels[row_of[fields[0]], column] = {"1": 1, "-1": 0, "0": int(IGNORE)}[fields[1]]
        return labels

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        """The JPEG of sample `index`."""
        return self.root / "JPEGImages" / f"{self.ids[index]}.jpg"

    def read(self, index: int) -> tuple[Path, np.ndarray]:
        """The image path and its 20-class target (1 / 0 / -1, float32)."""
        return self.image_path(index), self._labels[index].astype(np.float32)

    def describe(self, index: int) -> str:
        """The image path."""
        return str(self.image_path(index))

    def targets(self) -> list[np.ndarray]:
        """All targets, as float32 vectors."""
        return list(self._labels.astype(np.float32))

    def target_matrix(self) -> np.ndarray:
        """All targets as one (N, 20) float32 array (for metrics and positive-class weights)."""
        return self._labels.astype(np.float32)

    def annotation(self, index: int) -> VOCAnnotation:
        """The full annotation (objects and boxes) of sample `index`."""
        return read_annotation(self.root / "Annotations" / f"{self.ids[index]}.xml")

