"""Manifests: a CSV or JSON-lines file listing image paths with one label or several.

CSV (``.csv``, ``.tsv`` tab-separated, anything else sniffed)::

    path,label                     # optional header; a path column: path/filename/file/image…
    cats/1.jpg,cat                 # a label by name …
    dogs/7.jpg,1                   # … or by index
    both.jpg,cat;dog               # several labels in one cell, separated by ';' or '|'
    other.jpg,cat,dog              # without a header, every column after the path is a label

JSON lines (``.jsonl``, ``.ndjson``, or lines starting with '{')::

    {"path": "cats/1.jpg", "label": "cat"}
    {"path": "both.jpg", "labels": ["cat", 3], "ignore": ["dog"]}

Paths are relative to the manifest's folder unless absolute. Class names come from a labels.txt
beside the manifest, else from the data (sorted names, or indices 0..max). A label column or key
named in the plural (labels, classes), an "ignore" entry, or a line listing several labels makes
the manifest multi-label (or `multi_label=True`, `--multi_label`): targets are 1/0 vectors, and
JSON's "ignore" entries become -1. A line with no label is no such signal: in a single-label
manifest it is an error naming the file and line. A line whose image
is missing is counted and, by default, skipped (`missing` lists them).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from .base import IGNORE, ImageSource, Target
from .labels import LABELS_FILENAME, check_num_classes, labels_to_names, parse_label_id, read_labels_file

logger = logging.getLogger(__name__)

PATH_KEYS = ("path", "image", "image_path", "filename", "file", "filepath", "file_path")
LABEL_KEYS = ("label", "class", "category", "target", "class_id", "label_id")
MULTI_LABEL_KEYS = ("labels", "classes", "categories", "targets")
IGNORE_KEY = "ignore"
LABEL_SEPARATORS = (";", "|")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
# What a manifest inside a dataset folder is called (a bare .txt or .json there may be anything).
MANIFEST_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")

Label = int | str


class _Line:
    """One manifest line before labels are resolved."""

    __slots__ = ("number", "path", "labels", "ignore")

    def __init__(self, number: int, path: str, labels: list[Label], ignore: list[Label]):
        self.number, self.path, self.labels, self.ignore = number, path, labels, ignore


def _split_cell(cell: str) -> list[str]:
    parts = [cell]
    for separator in LABEL_SEPARATORS:
        parts = [piece for part in parts for piece in part.split(separator)]
    return [part.strip() for part in parts if part.strip()]


def _is_jsonl(path: Path, text: str) -> bool:
    if path.suffix.lower() in JSONL_SUFFIXES:
        return True
    first = next((line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")), "")
    return first.startswith("{")


def _parse_jsonl(path: Path, text: str) -> tuple[list[_Line], bool]:
    lines: list[_Line] = []
    plural = False
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object with a path and a label")
        path_key = next((key for key in PATH_KEYS if key in record), None)
        if path_key is None or not isinstance(record[path_key], str):
            raise DataError(f"{path}:{number}: no image path (use one of the keys {', '.join(PATH_KEYS[:4])})")
        labels: list[Label] = []
        single = next((key for key in LABEL_KEYS if key in record), None)
        several = next((key for key in MULTI_LABEL_KEYS if key in record), None)
        if single is not None:
            labels.extend(_json_labels(record[single], path, number))
        if several is not None:
            plural = True
            labels.extend(_json_labels(record[several], path, number))
        ignore = _json_labels(record.get(IGNORE_KEY, []), path, number)
        if ignore:
            plural = True
        lines.append(_Line(number, record[path_key], labels, ignore))
    return lines, plural


def _json_labels(value: object, path: Path, number: int) -> list[Label]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    labels: list[Label] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise DataError(f"{path}:{number}: labels must be class names or integer indices, got {item!r}")
        labels.extend(_split_cell(item) if isinstance(item, str) else [item])
    return labels


def _parse_csv(path: Path, text: str) -> tuple[list[_Line], bool]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else None
    content = [line for line in text.splitlines()]
    sample = "\n".join(line for line in content[:20] if line.strip() and not line.lstrip().startswith("#"))
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(sample, delimiters=",\t").delimiter if sample else ","
        except csv.Error:
            delimiter = ","
    rows = csv.reader(io.StringIO(text), delimiter=delimiter)
    lines: list[_Line] = []
    path_column, label_columns, plural = 0, None, False
    first = True
    previous = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as error:   # a field over csv's size limit, a NUL byte, ...
            raise DataError(f"{path}:{rows.line_num}: unreadable CSV line ({error})") from None
        number = rows.line_num
        if number - previous > 1:
            # csv joins lines inside quotes: a stray quote would otherwise swallow rows silently.
            raise DataError(f"{path}:{previous + 1}: a quoted field runs over lines {previous + 1}-{number} "
                            "(unterminated quote?)")
        previous = number
        if not row or not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        cells = [cell.strip() for cell in row]
        if first:
            first = False
            header = [cell.lower() for cell in cells]
            if any(name in PATH_KEYS for name in header):
                path_column = next(i for i, name in enumerate(header) if name in PATH_KEYS)
                label_columns = [i for i, name in enumerate(header) if name in LABEL_KEYS + MULTI_LABEL_KEYS]
                if not label_columns:
                    raise DataError(f"{path}:{number}: the header names no label column (use one "
                                    f"of {', '.join(LABEL_KEYS[:2] + MULTI_LABEL_KEYS[:1])})")
                plural = any(header[i] in MULTI_LABEL_KEYS for i in label_columns)
                continue
        columns = label_columns if label_columns is not None else \
            [i for i in range(len(cells)) if i != path_column]
        if path_column >= len(cells) or not cells[path_column]:
            raise DataError(f"{path}:{number}: no image path in this line")
        labels: list[Label] = []
        for column in columns:
            if column < len(cells):
                labels.extend(_split_cell(cells[column]))
        lines.append(_Line(number, cells[path_column], labels, []))
    return lines, plural


def _is_index(label: Label) -> bool:
    return isinstance(label, int) or (isinstance(label, str) and parse_label_id(label) is not None)


def _index(label: Label) -> int:
    return label if isinstance(label, int) else parse_label_id(label)  # type: ignore[return-value]


def _is_file(path: Path) -> bool:
    """Path.is_file, with a name too long for the file system or holding a NUL byte counted as
    missing (is_file raises for those instead of answering)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def find_manifest(path: str | os.PathLike) -> Path:
    """The manifest a path means: the file itself, or the one manifest file inside a folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"manifest {path} not found")
    manifests = sorted(child for child in path.iterdir()
                       if child.is_file() and child.suffix.lower() in MANIFEST_FILE_SUFFIXES)
    if len(manifests) != 1:
        found = f": {', '.join(m.name for m in manifests[:5])}" if manifests else ""
        raise DataError(f"expected exactly one manifest ({', '.join(MANIFEST_FILE_SUFFIXES)}) in {path}, "
                        f"found {len(manifests)}{found}; pass the manifest file itself")
    return manifests[0]


class ManifestSource(ImageSource):
    """Images listed in a CSV or JSON-lines manifest (or a folder holding exactly one),
    single- or multi-label."""

    def __init__(self, manifest: str | os.PathLike, class_names: Sequence[str] | None = None,
                 multi_label: bool | None = None, root: str | os.PathLike | None = None,
                 skip_missing: bool = True, num_classes: int | None = None):
        self.manifest = find_manifest(manifest)
        self.root = Path(root) if root is not None else self.manifest.parent
        try:
            text = self.manifest.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            raise DataError(f"{self.manifest}: not UTF-8 text ({error})") from error
        lines, plural = (_parse_jsonl if _is_jsonl(self.manifest, text) else _parse_csv)(self.manifest, text)
        if not lines:
            raise DataError(f"manifest {self.manifest} lists no images")
        # The task type is decided by something the user wrote on purpose: the flag, a plural
        # label column/key, or a line listing several labels. A line with no label is not such a
        # signal (one forgotten cell must not turn the whole dataset multi-label).
        self.multi_label = bool(multi_label) if multi_label is not None else \
            plural or any(len(line.labels) > 1 for line in lines)
        self.task_reason = ("--multi_label" if multi_label is not None else
                            "a plural label column or key" if plural else
                            f"line {next(line.number for line in lines if len(line.labels) > 1)} lists several labels"
                            if self.multi_label else "every line lists at most one label")
        self.class_names = self._class_names(lines, class_names, num_classes)
        by_name = {name: index for index, name in enumerate(self.class_names)}

        self.paths: list[Path] = []
        self.line_numbers: list[int] = []
        self.missing: list[tuple[int, Path]] = []
        single: list[int] = []
        multi: list[np.ndarray] = []
        for line in lines:
            indices = [self._resolve(label, by_name, line.number) for label in line.labels]
            ignored = [self._resolve(label, by_name, line.number) for label in line.ignore]
            if not self.multi_label and len(indices) != 1:
                raise DataError(self._single_label_error(line, len(indices)))
            image = Path(line.path) if os.path.isabs(line.path) else self.root / line.path
            if not _is_file(image):
                self.missing.append((line.number, image))
                continue
            self.paths.append(image)
            self.line_numbers.append(line.number)
            if self.multi_label:
                target = np.zeros(len(self.class_names), dtype=np.float32)
                target[ignored] = IGNORE
                target[indices] = 1.0  # a class both listed and ignored counts as present
                multi.append(target)
            else:
                single.append(indices[0])
        self._single = np.asarray(single, dtype=np.int64)
        self._multi = np.stack(multi) if multi else np.zeros((0, len(self.class_names)), np.float32)
        if self.missing:
            number, image = self.missing[0]
            message = (f"{self.manifest}: {len(self.missing)} of {len(lines)} lines point at missing "
                       f"images (first: line {number}, {image})")
            if not skip_missing:
                raise DataError(message + "; fix the paths or allow skipping missing images")
            logger.warning("%s; skipped", message)
        if not self.paths:
            raise DataError(f"{self.manifest}: none of the {len(lines)} listed images exists "
                            f"(paths are relative to {self.root})")

    def _single_label_error(self, line: _Line, count: int) -> str:
        """The one line a single-label manifest's label-less or several-label line gets."""
        where = f"{self.manifest}:{line.number}"
        if count == 0:
            return (f"{where}: no label, but this manifest is single-label ({self.task_reason}); give this "
                    f"image its class, or make the dataset multi-label on purpose (a 'labels' column, or "
                    f"--multi_label) if images may have no label")
        return (f"{where}: expected one label, found {count}, but this dataset is single-label "
                f"({self.task_reason}); drop --multi_label false (or multi_label=False) for a multi-label dataset")

    def _class_names(self, lines: list[_Line], given: Sequence[str] | None,
                     num_classes: int | None) -> list[str]:
        if given is not None:
            return list(given)
        labels_file = self.manifest.parent / LABELS_FILENAME
        if labels_file.is_file():
            return labels_to_names(read_labels_file(labels_file))
        tokens = [label for line in lines for label in line.labels + line.ignore]
        if not tokens:
            raise DataError(f"{self.manifest}: no labels at all, and no {LABELS_FILENAME} beside it")
        if all(_is_index(token) for token in tokens):
            largest = max(_index(token) for token in tokens)
            count = check_num_classes(num_classes if num_classes is not None else largest + 1,
                                      f"{self.manifest} (largest label index {largest})")
            return [str(index) for index in range(count)]
        names = [token for token in tokens if not _is_index(token)]
        if len(names) != len(tokens):
            line = next(line for line in lines if any(_is_index(t) for t in line.labels + line.ignore))
            raise DataError(f"{self.manifest}:{line.number}: labels mix class names and indices; "
                            f"indices need a {LABELS_FILENAME} beside the manifest to name the classes")
        return sorted(set(names))  # as folder datasets do: class ids follow sorted names

    def _resolve(self, label: Label, by_name: dict[str, int], number: int) -> int:
        if isinstance(label, str) and label in by_name:
            return by_name[label]
        if _is_index(label):
            index = _index(label)
            if not 0 <= index < len(self.class_names):
                raise DataError(f"{self.manifest}:{number}: label index {index} is outside "
                                f"[0, {len(self.class_names)}) (num_classes {len(self.class_names)})")
            return index
        raise DataError(f"{self.manifest}:{number}: unknown class {label!r} (known: "
                        f"{', '.join(self.class_names[:8])}{'…' if len(self.class_names) > 8 else ''})")

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> tuple[Path, Target]:
        """The image path and target (class id, or 1/0/-1 vector)."""
        if self.multi_label:
            return self.paths[index], self._multi[index].copy()
        return self.paths[index], int(self._single[index])

    def describe(self, index: int) -> str:
        """The image path and the manifest line it came from."""
        return f"{self.paths[index]} ({self.manifest.name}:{self.line_numbers[index]})"

    def targets(self) -> list[Target]:
        """All targets in order."""
        if self.multi_label:
            return list(self._multi.copy())
        return [int(label) for label in self._single]
