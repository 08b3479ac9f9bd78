"""Convert any labelled image source to slim-compatible TFRecord shards, and tell sources apart.

`convert_to_tfrecord(source, out_dir, name, num_shards, split=...)` writes
``<name>_<split>_0000N-of-0000M.tfrecord`` (slim's flowers naming) with slim's Example keys:

- ``image/encoded``: the original file bytes when they are already a JPEG or PNG that every
  reader decodes the same way (8-bit RGB or grayscale, no EXIF rotation); anything else (other
  formats, CMYK, alpha, 16-bit, EXIF-rotated, in-memory arrays) is decoded as slimtune decodes it
  for training and re-encoded (as JPEG quality 95 when the original was lossy already, else as
  PNG; `reencode_format` forces one), so TensorFlow and slimtune see the same pixels;
- ``image/format`` (b'jpeg' / b'png'), ``image/height``, ``image/width``, ``image/filename``;
- ``image/class/label`` (int64): the class index; for a multi-label source, the list of the
  positive class indices (empty when none), plus ``image/class/ignore`` with the indices whose
  target is -1. `slim_datasets.TFRecordSource` turns both back into the 1/0/-1 vector; slim's
  own readers need a VarLenFeature for the label of such data.

Beside the shards go labels.txt and `slim_datasets.DATASET_SPEC_FILENAME` (split sizes,
num_classes, multi_label), so ``get_split(None, split, out_dir)`` (``--dataset_dir OUT``) reads
the data back with no registration. Records are shuffled (seeded) before sharding, as slim's
flowers converter does, so a streaming reader with a modest shuffle buffer still mixes classes.
Unreadable images are skipped and counted (or fatal with on_bad_image='fail').
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import ConfigError, DataError
from .base import ImageSource, Payload, Target
from .decode import BadImageError, decode_image
from .labels import LABELS_FILENAME, labels_to_names, read_labels_file, write_labels_file
from .slim_datasets import (DATASET_SPEC_FILENAME, KEY_ENCODED, KEY_FILENAME, KEY_FORMAT, KEY_HEIGHT,
                            KEY_IGNORE, KEY_LABEL, KEY_WIDTH, DatasetSpec, TFRecordSource, get_split,
                            read_dataset_spec, write_dataset_spec)
from .sources import SourceKind, detect_source
from .tfrecord import TFRecordWriter, encode_example

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("skip", "fail")
# 'auto': images that were lossy already (JPEG, WebP) are re-encoded as JPEG quality 95 (fast,
# small; slim's ImageNet converter does the same for its CMYK JPEGs), everything else as PNG.
REENCODE_FORMATS = ("auto", "png", "jpeg")
_LOSSY_FORMATS = ("JPEG", "MPO", "WEBP")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class EncodedImage:
    """What goes into one record's image keys."""

    data: bytes
    format: str          # 'jpeg' or 'png'
    height: int
    width: int
    reencoded: bool


@dataclass
class ConversionReport:
    """What a conversion wrote and what it skipped."""

    out_dir: Path
    name: str
    split: str
    shards: list[Path]
    num_written: int
    num_reencoded: int
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (description, reason)
    removed_stale: list[Path] = field(default_factory=list)
    spec_path: Path | None = None
    labels_path: Path | None = None

    def summary(self) -> str:
        """One line for the console."""
        text = (f"wrote {self.num_written} images of {self.name}/{self.split} to {len(self.shards)} "
                f"shards in {self.out_dir} ({self.num_reencoded} re-encoded)")
        if self.skipped:
            text += f"; skipped {len(self.skipped)} unreadable (first: {self.skipped[0][0]}: {self.skipped[0][1]})"
        return text


def shard_filename(name: str, split: str, index: int, num_shards: int) -> str:
    """slim's shard file name: <name>_<split>_0000N-of-0000M.tfrecord."""
    return f"{name}_{split}_{index:05d}-of-{num_shards:05d}.tfrecord"


def _read_bytes(payload: Payload, description: str) -> bytes:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    try:
        return Path(payload).read_bytes()
    except FileNotFoundError as error:
        raise BadImageError(f"{description}: file not found") from error
    except OSError as error:
        raise BadImageError(f"{description}: cannot read ({error})") from error


def _keepable(data: bytes, image: Image.Image) -> str | None:
    """'jpeg' or 'png' when the bytes can go into a record unchanged, else None."""
    if data.startswith(_JPEG_MAGIC) and image.format in ("JPEG", "MPO"):
        image_format = "jpeg"
    elif data.startswith(_PNG_MAGIC) and image.format == "PNG":
        image_format = "png"
    else:
        return None
    if image.mode not in ("RGB", "L"):
        return None  # CMYK, alpha, palette, 16-bit: TF and slimtune would disagree on pixels
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        return None  # TF's decoders ignore EXIF rotation; store the upright image instead
    if "transparency" in image.info:
        return None
    return image_format


def encode_for_record(payload: Payload, description: str = "", reencode_format: str = "auto",
                      verify: bool = True) -> EncodedImage:
    """The bytes, format and size to store for one image (see the module docstring).

    reencode_format: what an image that cannot be kept becomes ('auto', 'png' or 'jpeg').
    verify: fully decode kept JPEG/PNG bytes, so truncated or corrupt files are caught here
    rather than in the middle of a training run. Raises BadImageError for unreadable images.
    """
    if reencode_format not in REENCODE_FORMATS:
        raise ConfigError(f"re-encode format must be one of {', '.join(REENCODE_FORMATS)}, got {reencode_format!r}")
    if isinstance(payload, np.ndarray):
        channels = 1 if payload.ndim == 2 or payload.shape[-1] == 1 else 3
        pixels = decode_image(payload, channels=channels, description=description)
        return _encode_pixels(pixels, "png" if reencode_format == "auto" else reencode_format)
    data = _read_bytes(payload, description)
    try:
        with Image.open(io.BytesIO(data)) as image:
            source_format, mode = image.format, image.mode
            keep = _keepable(data, image)
            if keep is not None:
                height, width = image.height, image.width  # before draft() shrinks them
                if verify:
                    if keep == "jpeg":
                        # Reduced-size DCT decoding still walks the whole entropy-coded stream.
                        image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                    image.load()
                return EncodedImage(data, keep, height, width, reencoded=False)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadImageError(f"{description or 'image'}: cannot decode image ({error})") from error
    grayscale = mode in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "1")
    pixels = decode_image(data, channels=1 if grayscale else 3, description=description)
    if reencode_format == "auto":
        reencode_format = "jpeg" if source_format in _LOSSY_FORMATS else "png"
    return _encode_pixels(pixels, reencode_format)


def _encode_pixels(pixels: np.ndarray, image_format: str) -> EncodedImage:
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=95)
    else:
        # Level 1: PNG's higher levels cost 3x the time for ~10% smaller photos.
        image.save(buffer, format="PNG", compress_level=1)
    return EncodedImage(buffer.getvalue(), image_format, pixels.shape[0], pixels.shape[1], reencoded=True)


def label_features(target: Target, multi_label: bool, num_classes: int) -> dict[str, np.ndarray]:
    """image/class/label (and image/class/ignore) for a target (see the module docstring)."""
    if not multi_label:
        return {KEY_LABEL: np.array([int(target)], dtype=np.int64)}
    vector = np.asarray(target, dtype=np.float32).reshape(-1)
    if vector.shape[0] != num_classes:
        raise DataError(f"multi-label target has {vector.shape[0]} entries, expected {num_classes}")
    features = {KEY_LABEL: np.flatnonzero(vector == 1.0).astype(np.int64)}
    ignored = np.flatnonzero(vector == -1.0).astype(np.int64)
    if ignored.size:
        features[KEY_IGNORE] = ignored
    return features


def _filename(payload: Payload, source: ImageSource, index: int) -> str:
    if isinstance(payload, (str, Path)):
        return Path(payload).name
    return source.describe(index)


def _check_existing(out_dir: Path, name: str, source: ImageSource) -> dict[str, int]:
    """Splits already converted into out_dir for this dataset; DataError when they disagree."""
    spec_path = out_dir / DATASET_SPEC_FILENAME
    spec = read_dataset_spec(out_dir) if spec_path.is_file() else None
    if spec is None:
        return {}
    if spec.name != name:
        raise DataError(f"{out_dir} already holds the converted dataset '{spec.name}'; write "
                        f"'{name}' to another output directory")
    if spec.num_classes != source.num_classes or spec.multi_label != source.multi_label:
        raise DataError(f"{out_dir} holds '{name}' with {spec.num_classes} classes "
                        f"(multi_label={spec.multi_label}); this source has {source.num_classes} "
                        f"(multi_label={source.multi_label}). Use another output directory")
    labels_path = out_dir / LABELS_FILENAME
    if labels_path.is_file() and labels_to_names(read_labels_file(labels_path)) != list(source.class_names):
        raise DataError(f"{labels_path} lists other class names than this source; every split of "
                        "a dataset must share one class order. Use another output directory")
    return dict(spec.splits)


def _encoded_sample(source: ImageSource, index: int, reencode_format: str, verify: bool
                    ) -> tuple[Payload, Target, str, EncodedImage | BadImageError]:
    """Read and encode one sample; a bad image comes back as its error (decided by the caller)."""
    payload, target = source.read(index)
    description = source.describe(index)
    try:
        return payload, target, description, encode_for_record(payload, description, reencode_format, verify)
    except BadImageError as error:
        return payload, target, description, error


def _check_options(source: ImageSource, name: str, split: str, num_shards: int, on_bad_image: str,
                   reencode_format: str) -> int:
    """Refuse options no writer accepts; the number of images to convert."""
    if not _NAME_OK.match(name) or not _NAME_OK.match(split):
        raise ConfigError(f"dataset name {name!r} and split {split!r} must be letters, digits, '.', "
                          "'_' or '-' (they become file names)")
    if num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
    if reencode_format not in REENCODE_FORMATS:
        raise ConfigError(f"reencode_format must be one of {', '.join(REENCODE_FORMATS)}, got {reencode_format!r}")
    if len(source) == 0:
        raise DataError("the source holds no images; nothing to convert")
    return len(source)


class _Encoder:
    """Reads and encodes samples on a thread pool (PIL releases the GIL), in the order asked,
    skipping and counting bad images (or raising with on_bad_image='fail'); shared by both writers."""

    def __init__(self, source: ImageSource, reencode_format: str, verify: bool, on_bad_image: str,
                 report: ConversionReport, num_threads: int | None, progress: bool) -> None:
        self.source, self.reencode_format, self.verify = source, reencode_format, verify
        self.on_bad_image, self.report = on_bad_image, report
        self.threads = num_threads or min(8, (os.cpu_count() or 1) + 1)
        self.bar = tqdm(total=len(source), desc=f"converting {report.name}/{report.split}", unit="img",
                        disable=not progress)
        self.pool = ThreadPoolExecutor(max_workers=self.threads)

    def encode(self, indices: list[int]) -> Iterator[tuple[int, Payload, Target, EncodedImage]]:
        """(index, payload, target, encoded image) for each good sample of `indices`, in order."""
        # Bounded batches keep memory flat; map() keeps the record order deterministic.
        for batch_start in range(0, len(indices), 4 * self.threads):
            batch = indices[batch_start:batch_start + 4 * self.threads]
            encoded = self.pool.map(
                lambda i: _encoded_sample(self.source, i, self.reencode_format, self.verify), batch)
            for index, (payload, target, description, image) in zip(batch, encoded):
                self.bar.update(1)
                if isinstance(image, BadImageError):
                    if self.on_bad_image == "fail":
                        raise image
                    self.report.skipped.append((description, str(image)))
                    continue
                self.report.num_written += 1
                self.report.num_reencoded += image.reencoded
                yield index, payload, target, image

    def __enter__(self) -> _Encoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.bar.close()


def convert_to_tfrecord(source: ImageSource, out_dir: str | os.PathLike, name: str, num_shards: int = 5,
                        split: str = "train", *, shuffle: bool = True, seed: int = 0,
                        reencode_format: str = "auto", on_bad_image: str = "skip",
                        verify_images: bool = True, num_threads: int | None = None,
                        progress: bool = True) -> ConversionReport:
    """Write one split of `source` as slim-compatible TFRecord shards plus labels.txt and a spec.

    Converting further splits into the same out_dir adds them to the spec (class names must
    match). Old shards of this name and split with another shard count are removed afterwards.
    num_threads: images are verified/re-encoded on a thread pool (PIL releases the GIL);
    the output does not depend on it.
    """
    total = _check_options(source, name, split, num_shards, on_bad_image, reencode_format)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = _check_existing(out_dir, name, source)

    order = np.random.default_rng(seed).permutation(total) if shuffle else np.arange(total)
    per_shard = math.ceil(total / num_shards)
    report = ConversionReport(out_dir, name, split, [], 0, 0)
    with _Encoder(source, reencode_format, verify_images, on_bad_image, report, num_threads, progress) as encoder:
        for shard_index in range(num_shards):
            path = out_dir / shard_filename(name, split, shard_index, num_shards)
            indices = [int(i) for i in order[shard_index * per_shard:(shard_index + 1) * per_shard]]
            with TFRecordWriter(path) as writer:
                for index, payload, target, image in encoder.encode(indices):
                    features: dict[str, object] = {
                        KEY_ENCODED: image.data,
                        KEY_FORMAT: image.format.encode(),
                        **label_features(target, source.multi_label, source.num_classes),
                        KEY_HEIGHT: image.height,
                        KEY_WIDTH: image.width,
                        KEY_FILENAME: _filename(payload, source, index).encode("utf-8"),
                    }
                    writer.write(encode_example(features))
            report.shards.append(path)

    report.removed_stale = _remove_stale_shards(out_dir, name, split, set(report.shards))
    report.labels_path = write_labels_file(out_dir / LABELS_FILENAME, list(source.class_names))
    splits[split] = report.num_written
    spec = DatasetSpec(name=name, file_pattern=f"{name}_%s_*.tfrecord", splits=splits,
                       num_classes=source.num_classes, multi_label=source.multi_label,
                       default_format="png" if reencode_format == "png" else "jpeg")
    previous = _read_skipped(out_dir)
    previous[split] = len(report.skipped)
    report.spec_path = write_dataset_spec(out_dir, spec, {"skipped_unreadable": previous})
    if report.skipped:
        logger.warning("%s", report.summary())
    return report


def convert_to_webdataset(source: ImageSource, out_dir: str | os.PathLike, name: str, num_shards: int = 5,
                          split: str = "train", *, shuffle: bool = True, seed: int = 0,
                          reencode_format: str = "auto", on_bad_image: str = "skip",
                          verify_images: bool = True, num_threads: int | None = None,
                          progress: bool = True) -> ConversionReport:
    """Write one split of `source` as WebDataset tar shards (`slimtune.data.webdataset` reads them).

    The same images, order and skip rules as `convert_to_tfrecord` (same seed, same shards);
    each sample is <key>.<jpg|png> with <key>.cls (class index) or, multi-label, <key>.json
    ({"labels": [...], "ignore": [...]}), written by the `webdataset` library's TarWriter.
    """
    from webdataset import TarWriter

    from .webdataset import read_existing_splits, shard_name, write_webdataset_spec

    total = _check_options(source, name, split, num_shards, on_bad_image, reencode_format)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = read_existing_splits(out_dir, name, source.num_classes, source.multi_label)
    labels_path = out_dir / LABELS_FILENAME
    if labels_path.is_file() and labels_to_names(read_labels_file(labels_path)) != list(source.class_names):
        raise DataError(f"{labels_path} lists other class names than this source; every split of "
                        "a dataset must share one class order. Use another output directory")
    order = np.random.default_rng(seed).permutation(total) if shuffle else np.arange(total)
    per_shard = math.ceil(total / num_shards)
    report = ConversionReport(out_dir, name, split, [], 0, 0)
    with _Encoder(source, reencode_format, verify_images, on_bad_image, report, num_threads, progress) as encoder:
        for shard_index in range(num_shards):
            path = out_dir / shard_name(name, split, shard_index)
            tmp = path.with_name(path.name + ".tmp")
            indices = [int(i) for i in order[shard_index * per_shard:(shard_index + 1) * per_shard]]
            # mtime fixed: the same data make byte-identical shards.
            with open(tmp, "wb") as stream, TarWriter(stream, mtime=0.0) as writer:
                for index, payload, target, image in encoder.encode(indices):
                    sample: dict[str, object] = {"__key__": f"{index:09d}",
                                                 "jpg" if image.format == "jpeg" else "png": image.data}
                    if source.multi_label:
                        vector = np.asarray(target, dtype=np.float32).reshape(-1)
                        sample["json"] = json.dumps({
                            "labels": np.flatnonzero(vector == 1.0).tolist(),
                            "ignore": np.flatnonzero(vector == -1.0).tolist(),
                            "filename": _filename(payload, source, index)}).encode()
                    else:
                        sample["cls"] = str(int(target)).encode()
                    writer.write(sample)
            os.replace(tmp, path)
            report.shards.append(path)
    stale = set(out_dir.glob(f"{name}-{split}-*.tar")) - set(report.shards)
    for path in sorted(stale):
        path.unlink()
    report.removed_stale = sorted(stale)
    report.labels_path = write_labels_file(labels_path, list(source.class_names))
    splits[split] = report.num_written
    report.spec_path = write_webdataset_spec(out_dir, name, splits, source.num_classes, source.multi_label)
    if report.skipped:
        logger.warning("%s", report.summary())
    return report


def _read_skipped(out_dir: Path) -> dict[str, int]:
    try:
        content = json.loads((out_dir / DATASET_SPEC_FILENAME).read_text(encoding="utf-8"))
        return {str(k): int(v) for k, v in dict(content.get("skipped_unreadable", {})).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _remove_stale_shards(out_dir: Path, name: str, split: str, keep: set[Path]) -> list[Path]:
    """Delete this name/split's shards from an earlier run with another shard count."""
    ours = re.compile(rf"^{re.escape(name)}_{re.escape(split)}_\d{{5}}-of-\d{{5}}\.tfrecord$")
    removed = []
    for path in sorted(out_dir.iterdir()):
        if ours.match(path.name) and path not in keep:
            path.unlink()
            removed.append(path)
    if removed:
        logger.info("removed %d shards of an earlier conversion of %s/%s", len(removed), name, split)
    return removed


def open_converted(dataset_dir: str | os.PathLike, split: str) -> TFRecordSource:
    """Open one split of a directory written by `convert_to_tfrecord` (reads its spec JSON)."""
    return get_split(None, split, dataset_dir)


def _split_sources(path: Path, kind: SourceKind, splits: list[str] | None, validation_fraction: float,
                   seed: int) -> dict[str, ImageSource]:
    """The splits of a folder, VOC devkit or manifest to convert, by name; one source without
    splits of its own is divided by `validation_fraction` when asked."""
    from .base import holdout_split

    found = kind.convertible(path, splits)
    if validation_fraction > 0 and len(found) == 1:
        train, validation = holdout_split(next(iter(found.values())), validation_fraction, seed)
        return {"train": train, "validation": validation}
    return found


def convert_command(source_path: str | os.PathLike, out_dir: str | os.PathLike, *, name: str | None = None,
                    num_shards: int = 5, splits: str | None = None, validation_fraction: float = 0.0,
                    seed: int = 0, output_format: str = "tfrecord") -> Path:
    """`slimtune data convert`: every split of a folder / VOC / manifest to TFRecord (slim's) or
    WebDataset shards."""
    writers = {"tfrecord": convert_to_tfrecord, "webdataset": convert_to_webdataset}
    if output_format not in writers:
        raise ConfigError(f"--format must be one of {', '.join(writers)}, got {output_format!r}")
    path = Path(source_path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist")
    kind = detect_source(path)
    if kind.convertible is None:
        raise DataError(f"{path} already holds {kind.description}; nothing to convert")
    if not 0.0 <= validation_fraction < 1.0:
        raise DataError("--validation_fraction must be in [0, 1)")
    wanted = [s.strip() for s in splits.split(",") if s.strip()] if splits else None
    dataset_name = name or (path.stem if path.is_file() else path.resolve().name).lower() or "dataset"
    for split, source in _split_sources(path, kind, wanted, validation_fraction, seed).items():
        report = writers[output_format](source, out_dir, dataset_name, num_shards=num_shards, split=split, seed=seed)
        print(report.summary(), file=sys.stderr)
    return Path(out_dir)
