"""What every data source provides: labelled images, by index or as a stream.

A source knows its class names and yields *payloads* (encoded image bytes, a file path, or an
already decoded uint8 array) with a *target*. Decoding and preprocessing happen later, in the
DataLoader workers (see `slimtune.data.loader`), so sources stay cheap to build and to pickle.

Targets:
- single-label: an ``int`` class index;
- multi-label: a float32 vector of length num_classes with 1 (present), 0 (absent) and -1
  (ignore, e.g. a VOC object marked difficult); losses and metrics skip the -1 entries.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

Payload = Union[bytes, str, Path, np.ndarray]
Target = Union[int, np.ndarray]

IGNORE = -1.0


class _LabelledMixin:
    """Class-name bookkeeping shared by map-style and stream sources."""

    class_names: list[str]
    multi_label: bool = False

    @property
    def num_classes(self) -> int:
        """Number of classes (length of class_names)."""
        return len(self.class_names)


class ImageSource(_LabelledMixin, abc.ABC):
    """A labelled image collection with random access (folders, manifests, VOC, arrays)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abc.abstractmethod
    def read(self, index: int) -> tuple[Payload, Target]:
        """Return the payload and target of one sample, without decoding the image."""

    def describe(self, index: int) -> str:
        """Say where a sample comes from (a file path), for error messages and reports."""
        return f"sample {index}"

    def targets(self) -> list[Target]:
        """All targets in order (sources override this when reading a target is costly)."""
        return [self.read(i)[1] for i in range(len(self))]


class StreamSource(_LabelledMixin, abc.ABC):
    """A labelled image stream split into shards (TFRecord files): read sequentially, never whole."""

    shards: Sequence[Path]

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of samples (from the split size when known)."""

    @abc.abstractmethod
    def iter_shard(self, shard: Path, start: int = 0, step: int = 1) -> Iterator[tuple[Payload, Target, str]]:
        """Yield (payload, target, description) for records start, start+step, … of one shard."""


class SubsetSource(ImageSource):
    """A view of some samples of another source (e.g. a held-out validation fraction)."""

    def __init__(self, source: ImageSource, indices: Sequence[int]) -> None:
        self.source = source
        self.indices = list(indices)
        self.class_names = source.class_names
        self.multi_label = source.multi_label

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, index: int) -> tuple[Payload, Target]:
        """The payload and target of the parent's sample."""
        return self.source.read(self.indices[index])

    def describe(self, index: int) -> str:
        """The parent's description of the sample."""
        return self.source.describe(self.indices[index])


def holdout_split(source: ImageSource, fraction: float, seed: int = 0) -> tuple[SubsetSource, SubsetSource]:
    """Split a source into (train, validation) with `fraction` held out, the same way every time."""
    order = np.random.default_rng(seed).permutation(len(source))
    count = int(round(len(source) * fraction))
    return SubsetSource(source, sorted(order[count:])), SubsetSource(source, sorted(order[:count]))
