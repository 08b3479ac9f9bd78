"""slim's labels.txt: one `<id>:<class name>` per line."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Union

from ..errors import DataError

LABELS_FILENAME = "labels.txt"


def read_labels_file(path: Union[str, Path]) -> dict[int, str]:
    """Read a labels.txt into {id: name}; blank lines are skipped, bad lines name the line."""
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILENAME
    if not path.is_file():
        raise DataError(f"no labels file at {path}")
    labels: dict[int, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        index, sep, name = line.partition(":")
        if not sep or not index.strip().lstrip("-").isdigit():
            raise DataError(f"{path}:{number}: expected '<id>:<class name>', got {line!r}")
        labels[int(index)] = name.strip()
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
    missing = sorted(set(range(max(labels) + 1)) - set(labels))
    if missing or min(labels) < 0:
        raise DataError(f"labels.txt ids must run 0..{max(labels)} without gaps; missing {missing[:5]}")
    return [labels[i] for i in range(len(labels))]
