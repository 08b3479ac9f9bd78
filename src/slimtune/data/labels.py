"""slim's labels.txt: one `<id>:<class name>` per line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping, Union

from ..errors import DataError

LABELS_FILENAME = "labels.txt"
# No real label set comes near this (ImageNet-21k has 21,843 classes); a bigger id or class count
# is a wrong column or a corrupt file, refused before anything is sized by it.
MAX_NUM_CLASSES = 1_000_000
# ASCII digits only: str.isdigit also accepts '²' and other digits int() refuses.
_LABEL_ID = re.compile(r"-?[0-9]+")


def parse_label_id(text: str) -> int | None:
    """The integer a label id string spells ('-1', '42'), or None when it is not one."""
    text = text.strip()
    return int(text) if _LABEL_ID.fullmatch(text) and len(text) <= 24 else None


def check_num_classes(count: int, where: str) -> int:
    """Refuse a class count (or largest id + 1) beyond MAX_NUM_CLASSES, naming where it came from."""
    if count > MAX_NUM_CLASSES:
        raise DataError(f"{where}: {count} classes is beyond the limit of {MAX_NUM_CLASSES} "
                        "(a wrong label column, or a corrupt id?)")
    return count


def read_labels_file(path: Union[str, Path]) -> dict[int, str]:
    """Read a labels.txt into {id: name}; blank lines are skipped, bad lines name the line."""
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILENAME
    if not path.is_file():
        raise DataError(f"no labels file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    labels: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        index, sep, name = line.partition(":")
        value = parse_label_id(index) if sep else None
        if value is None:
            raise DataError(f"{path}:{number}: expected '<id>:<class name>', got {line[:80]!r}")
        if value >= MAX_NUM_CLASSES:
            raise DataError(f"{path}:{number}: label id {value} is beyond the limit of {MAX_NUM_CLASSES} classes")
        labels[value] = name.strip()
    return labels


def write_labels_file(path: Union[str, Path], names: Union[Iterable[str], Mapping[int, str]]) -> Path:
    """Write class names as labels.txt (a directory gets labels.txt inside); return the file path."""
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILENAME
    items = sorted(names.items()) if isinstance(names, Mapping) else list(enumerate(names))
    path.write_text("".join(f"{index}:{name}\n" for index, name in items), encoding="utf-8")
    return path


def labels_to_names(labels: Mapping[int, str]) -> list[str]:
    """Dense class-name list from {id: name}; ids must be 0..n-1 without gaps."""
    if not labels:
        return []
    # Ids 0..n-1 for n entries; never size anything by the largest id (it may be huge).
    missing = [i for i in range(len(labels)) if i not in labels][:5]
    if missing or min(labels) < 0:
        raise DataError(f"labels.txt ids must run 0..{len(labels) - 1} without gaps; they run "
                        f"{min(labels)}..{max(labels)}, missing {missing}")
    return [labels[i] for i in range(len(labels))]
