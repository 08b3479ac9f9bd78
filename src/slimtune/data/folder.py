"""Image folders: one sub-folder per class (the cats-vs-dogs layout), optional split folders."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Optional, Sequence

from ..errors import DataError
from .base import ImageSource
from .labels import LABELS_FILENAME, labels_to_names, read_labels_file

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def list_images(folder: Path) -> list[Path]:
    """Image files below `folder` (recursively), sorted for a stable order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class ImageFolderSource(ImageSource):
    """Labelled images from `root/<class>/<image>`; class ids follow labels.txt or sorted names."""

    def __init__(self, root: str | Path, class_names: Optional[Sequence[str]] = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"dataset directory {self.root} does not exist")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if class_names is None:
            labels_file = self.root / LABELS_FILENAME
            class_names = labels_to_names(read_labels_file(labels_file)) if labels_file.is_file() else folders
        self.class_names = list(class_names)
        if not self.class_names:
            raise DataError(f"{self.root} has no class sub-folders (expected {self.root}/<class>/<images>)")
        unknown = sorted(set(folders) - set(self.class_names))
        if unknown:
            raise DataError(f"{self.root}: folders {unknown[:5]} are not classes of labels.txt "
                            f"({', '.join(self.class_names[:5])}…); fix labels.txt or the folders")
        self.samples: list[tuple[Path, int]] = []
        for index, name in enumerate(self.class_names):
            folder = self.root / name
            images = list_images(folder) if folder.is_dir() else []
            if not images:
                raise DataError(f"class folder {folder} has no images "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the class")
            self.samples.extend((path, index) for path in images)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[Path, int]:
        """The image path and class id."""
        return self.samples[index]

    def describe(self, index: int) -> str:
        """The image path."""
        return str(self.samples[index][0])

    def targets(self) -> list[int]:
        """Class ids in order."""
        return [label for _, label in self.samples]


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Image files from paths, folders (recursively) and glob patterns, in the order given."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found.extend(list_images(path))
        elif path.is_file():
            found.append(path)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            found.extend(p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            raise DataError(f"{item}: no such image, folder or glob match")
    if not found:
        raise DataError(f"no images found in {', '.join(inputs)}")
    return found
