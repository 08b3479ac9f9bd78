"""ImageNet class names of slim's published checkpoints, shipped with the package (never downloaded).

slim's `datasets/imagenet.py` fetched two files at run time to name the classes: the 1000 ILSVRC
synsets and the synset -> human-readable table of all of ImageNet. `imagenet_synsets.tsv` holds the
1000 rows of that table that slim uses, in slim's order (synsets sorted), so `predict` with a
published checkpoint prints 'tabby, tabby cat', not 282.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Optional

from ..errors import DataError

#: slim's name of label 0 in the 1001-class checkpoints (Inception, MobileNet, ResNet v2, NASNet).
BACKGROUND = "background"


@lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[tuple[str, str], ...]:
    """The 1000 ILSVRC-2012 classes as (synset id, human-readable names), in slim's label order."""
    text = resources.files("slimtune.data").joinpath("imagenet_synsets.tsv").read_text(encoding="utf-8")
    rows = tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if line)
    if len(rows) != 1000:  # a damaged install, not a user error; say so plainly
        raise DataError(f"slimtune's imagenet_synsets.tsv has {len(rows)} classes instead of 1000: reinstall slimtune")
    return rows  # type: ignore[return-value]


def imagenet_class_names(num_classes: int) -> Optional[list[str]]:
    """slim's class names for a 1000- or 1001-class ImageNet head (1001: 'background' first), else None."""
    if num_classes not in (1000, 1001):
        return None
    names = [human for _, human in imagenet_synsets()]
    return [BACKGROUND] + names if num_classes == 1001 else names
