"""The TFRecord converter: slim-compatible shards TensorFlow reads back, and source detection."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from slimtune.data.base import ImageSource
from slimtune.data.convert import (ConversionReport, convert_to_tfrecord, encode_for_record, open_converted,
                                   shard_filename)
from slimtune.data.decode import BadImageError, decode_image
from slimtune.data.manifest import ManifestSource, find_manifest
from slimtune.data.slim_datasets import DATASET_SPEC_FILENAME, find_shards, get_split
from slimtune.data.sources import detect_source
from slimtune.data.tfrecord import iter_examples
from slimtune.data.voc import VOCSource
from slimtune.errors import ConfigError, DataError
from voc_fixture import make_voc_fixture

FIXTURES = Path(__file__).parent / "fixtures" / "tfrecord"
READBACK = json.loads((FIXTURES / "converted" / "tf_readback.json").read_text())


def _records(source) -> list[tuple]:
    return [record for shard in source.shards for record in source.iter_shard(shard)]


# ---- what TensorFlow made of shards slimtune wrote ---------------------------------------------

def test_tensorflow_read_our_single_label_shards_as_we_do():
    """slim's own flowers decoder (TF 2.21) parsed every record; we see the same labels and pixels."""
    source = get_split(None, "train", FIXTURES / "converted" / "single")
    items = [item for shard in source.shards for item in source.iter_items(shard)]
    assert len(items) == len(READBACK["single"]) == 7
    for item, tf_item in zip(items, READBACK["single"]):
        assert item["label"] == tf_item["label"]
        assert (item["filename"], item["format"]) == (tf_item["filename"], tf_item["format"])
        assert (item["height"], item["width"]) == (tf_item["height"], tf_item["width"])
        pixels = decode_image(item["image"])
        assert list(pixels.shape) == tf_item["shape"] == [item["height"], item["width"], 3]
        if item["format"] == "png":  # lossless: both decoders agree to the bit
            assert hashlib.sha256(pixels.tobytes()).hexdigest() == tf_item["pixels_sha256"]
        else:  # JPEG decoders may round differently
            assert abs(pixels.mean() - tf_item["mean"]) < 1.0
    formats = {tf_item["filename"]: tf_item["format"] for tf_item in READBACK["single"]}
    # Lossy originals stay JPEG (kept, or re-encoded when CMYK / rotated); the rest become PNG.
    assert formats == {"cat_rgb.jpg": "jpeg", "person_gray.jpg": "jpeg", "cup_cmyk.jpg": "jpeg",
                       "cat_exif6.jpg": "jpeg", "person_alpha.png": "png", "person_16bit.png": "png",
                       "cup_rgb.png": "png"}
    rotated = next(t for t in READBACK["single"] if t["filename"] == "cat_exif6.jpg")
    assert rotated["height"] > rotated["width"]  # TensorFlow sees it upright too


def test_tensorflow_read_our_multi_label_shards_as_we_do():
    source = get_split(None, "trainval", FIXTURES / "converted" / "multi")
    records = _records(source)
    assert len(records) == len(READBACK["multi"])
    for (payload, target, _), tf_item in zip(records, READBACK["multi"]):
        expected = np.zeros(20, np.float32)
        expected[tf_item["labels"]] = 1
        expected[tf_item["ignore"]] = -1
        np.testing.assert_array_equal(target, expected)
        assert list(decode_image(payload).shape) == tf_item["shape"] == [tf_item["height"], tf_item["width"], 3]


# ---- converting ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def devkit(tmp_path_factory) -> Path:
    return make_voc_fixture(tmp_path_factory.mktemp("voc"), copies=1, max_side=48)


def test_voc_round_trip_keeps_every_target(devkit, tmp_path):
    source = VOCSource(devkit, "trainval")
    report = convert_to_tfrecord(source, tmp_path, "voc", num_shards=3, split="trainval", progress=False)
    assert isinstance(report, ConversionReport) and report.num_written == len(source)
    assert [p.name for p in report.shards] == [shard_filename("voc", "trainval", i, 3) for i in range(3)]
    back = open_converted(tmp_path, "trainval")
    assert back.multi_label and back.class_names == source.class_names and len(back) == len(source)
    written = {}
    for shard in back.shards:
        for item in back.iter_items(shard):
            written[item["filename"]] = item["label"]
    for index in range(len(source)):
        path, target = source.read(index)
        np.testing.assert_array_equal(written[path.name], target)
    spec = json.loads((tmp_path / DATASET_SPEC_FILENAME).read_text())
    assert spec["splits"] == {"trainval": len(source)} and spec["num_classes"] == 20 and spec["multi_label"]
    assert (tmp_path / "labels.txt").read_text().splitlines()[:2] == ["0:aeroplane", "1:bicycle"]


def test_conversion_is_deterministic_and_shuffled(devkit, tmp_path):
    source = VOCSource(devkit, "trainval")
    first = convert_to_tfrecord(source, tmp_path / "a", "voc", 2, "trainval", num_threads=1, progress=False)
    second = convert_to_tfrecord(source, tmp_path / "b", "voc", 2, "trainval", num_threads=3, progress=False)
    assert [p.read_bytes() for p in first.shards] == [p.read_bytes() for p in second.shards]
    order = [e["image/filename"][0].decode() for s in first.shards for e in iter_examples(s)]
    assert sorted(order) == sorted(source.image_path(i).name for i in range(len(source)))
    assert order != [source.image_path(i).name for i in range(len(source))]
    plain = convert_to_tfrecord(source, tmp_path / "c", "voc", 2, "trainval", shuffle=False, progress=False)
    assert [e["image/filename"][0].decode() for s in plain.shards for e in iter_examples(s)] == \
        [source.image_path(i).name for i in range(len(source))]


class _Arrays(ImageSource):
    """An in-memory source with array payloads (what cifar/mnist-style data look like)."""

    def __init__(self, arrays, labels, names):
        self.arrays, self.labels, self.class_names = arrays, labels, names

    def __len__(self):
        return len(self.arrays)

    def read(self, index):
        return self.arrays[index], self.labels[index]


def test_array_payloads_become_lossless_png(tmp_path):
    rgb = skimage.data.astronaut()[::16, ::16]
    gray = skimage.data.camera()[::16, ::16, None]
    report = convert_to_tfrecord(_Arrays([rgb, gray], [1, 0], ["a", "b"]), tmp_path, "arrays", 1,
                                 shuffle=False, progress=False)
    assert report.num_reencoded == 2
    examples = list(iter_examples(report.shards[0]))
    assert [e["image/format"] for e in examples] == [[b"png"], [b"png"]]
    np.testing.assert_array_equal(decode_image(examples[0]["image/encoded"][0]), rgb)
    with Image.open(io.BytesIO(examples[1]["image/encoded"][0])) as stored:
        assert stored.mode == "L"  # grayscale stays one channel
    np.testing.assert_array_equal(decode_image(examples[1]["image/encoded"][0], channels=1), gray)
    assert [e["image/class/label"].tolist() for e in examples] == [[1], [0]]
    assert (int(examples[0]["image/height"][0]), int(examples[0]["image/width"][0])) == rgb.shape[:2]


def _photo_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **save)
    return buffer.getvalue()


def test_awkward_images_are_stored_as_slimtune_decodes_them():
    photo = Image.fromarray(skimage.data.chelsea()[:40, :60])
    plain = _photo_bytes(photo, format="JPEG", quality=90)
    kept = encode_for_record(plain)
    assert not kept.reencoded and kept.data == plain and (kept.height, kept.width) == (40, 60)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _photo_bytes(photo, format="JPEG", quality=90, exif=exif.tobytes())
    upright = encode_for_record(rotated)
    assert upright.reencoded and (upright.height, upright.width) == (60, 40)
    assert np.abs(decode_image(upright.data).astype(int) - decode_image(rotated)).mean() < 1.5
    lossless = encode_for_record(rotated, reencode_format="png")
    np.testing.assert_array_equal(decode_image(lossless.data), decode_image(rotated))
    rotated_png = _photo_bytes(photo, format="PNG", exif=exif.tobytes())
    assert (encode_for_record(rotated_png).height, encode_for_record(rotated_png).width) == (60, 40)
    cmyk = _photo_bytes(photo.convert("CMYK"), format="JPEG")
    stored = encode_for_record(cmyk)
    assert stored.reencoded and stored.format == "jpeg"  # lossy stays lossy under 'auto'
    assert encode_for_record(cmyk, reencode_format="png").format == "png"
    assert encode_for_record(rotated).format == "jpeg"
    rgba = photo.convert("RGBA")
    rgba.putalpha(0)
    stored = encode_for_record(_photo_bytes(rgba, format="PNG"))
    assert stored.reencoded and decode_image(stored.data).min() == 255  # transparent -> white
    bmp = _photo_bytes(photo, format="BMP")
    assert encode_for_record(bmp).format == "png"  # lossless originals stay lossless
    as_jpeg = encode_for_record(bmp, reencode_format="jpeg")
    assert as_jpeg.format == "jpeg" and as_jpeg.data.startswith(b"\xff\xd8\xff")


def test_unreadable_images_are_skipped_and_reported(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    photo = Image.fromarray(skimage.data.coffee()[:48, :48])
    photo.save(folder / "good.jpg", quality=90)
    data = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.jpg").write_bytes(b"not an image at all")
    manifest = folder / "list.csv"
    manifest.write_text("good.jpg,cup\ntruncated.jpg,cup\ntext.jpg,cat\n")
    source = ManifestSource(manifest)
    report = convert_to_tfrecord(source, tmp_path / "out", "mixed", 1, progress=False)
    assert report.num_written == 1 and len(report.skipped) == 2
    assert {Path(d.split(" (")[0]).name for d, _ in report.skipped} == {"truncated.jpg", "text.jpg"}
    assert "skipped 2 unreadable" in report.summary()
    spec = json.loads((tmp_path / "out" / DATASET_SPEC_FILENAME).read_text())
    assert spec["splits"] == {"train": 1} and spec["skipped_unreadable"] == {"train": 2}
    with pytest.raises(BadImageError, match="truncated.jpg"):
        convert_to_tfrecord(source, tmp_path / "strict", "mixed", 1, on_bad_image="fail",
                            shuffle=False, progress=False)
    # The interrupted conversion left no shard a reader would trust.
    assert not list((tmp_path / "strict").glob("*.tfrecord"))


def test_more_splits_share_one_spec_and_must_share_classes(devkit, tmp_path):
    convert_to_tfrecord(VOCSource(devkit, "train"), tmp_path, "voc", 2, "train", progress=False)
    convert_to_tfrecord(VOCSource(devkit, "test"), tmp_path, "voc", 1, "test", progress=False)
    spec = json.loads((tmp_path / DATASET_SPEC_FILENAME).read_text())
    assert spec["splits"] == {"train": len(VOCSource(devkit, "train")), "test": len(VOCSource(devkit, "test"))}
    assert len(get_split(None, "test", tmp_path)) == len(VOCSource(devkit, "test"))
    other = _Arrays([np.zeros((4, 4, 3), np.uint8)], [0], ["x", "y"])
    with pytest.raises(DataError, match="already holds the converted dataset 'voc'"):
        convert_to_tfrecord(other, tmp_path, "other", 1, progress=False)
    with pytest.raises(DataError, match="holds 'voc' with 20 classes"):
        convert_to_tfrecord(other, tmp_path, "voc", 1, "extra", progress=False)


def test_reconverting_with_fewer_shards_removes_the_old_ones(devkit, tmp_path):
    source = VOCSource(devkit, "val")
    convert_to_tfrecord(source, tmp_path, "voc", 4, "val", progress=False)
    report = convert_to_tfrecord(source, tmp_path, "voc", 2, "val", progress=False)
    assert len(report.removed_stale) == 4
    assert [p.name for p in find_shards(tmp_path, "voc_val_*.tfrecord")] == [p.name for p in report.shards]


def test_bad_arguments(devkit, tmp_path):
    source = VOCSource(devkit, "val")
    with pytest.raises(ConfigError, match="file names"):
        convert_to_tfrecord(source, tmp_path, "my data", 1, progress=False)
    with pytest.raises(ConfigError, match="num_shards"):
        convert_to_tfrecord(source, tmp_path, "voc", 0, progress=False)
    with pytest.raises(ConfigError, match="on_bad_image"):
        convert_to_tfrecord(source, tmp_path, "voc", 1, on_bad_image="ignore", progress=False)


def test_progress_bar_is_shown(devkit, tmp_path, capsys):
    convert_to_tfrecord(VOCSource(devkit, "val"), tmp_path, "voc", 1, "val", progress=True)
    assert "converting voc/val" in capsys.readouterr().err


# ---- detect_source ----------------------------------------------------------------------------------

def test_detect_source_tells_the_layouts_apart(devkit, tmp_path):
    for root in (devkit.parent, devkit, devkit / "VOC2007"):
        assert detect_source(root).name == "voc"
    folder = tmp_path / "pets"
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        Image.fromarray(skimage.data.chelsea()[:8, :8]).save(folder / cls / "1.jpg")
    assert detect_source(folder).name == "folder"
    manifest = tmp_path / "pets.csv"
    manifest.write_text("pets/cat/1.jpg,cat\n")
    assert detect_source(manifest).name == "manifest"
    only = tmp_path / "listed"
    only.mkdir()
    shutil.copy(manifest, only / "data.jsonl")
    assert detect_source(only).name == "manifest" and find_manifest(only) == only / "data.jsonl"
    (only / "second.csv").write_text("x.jpg,cat\n")
    with pytest.raises(DataError, match="expected exactly one manifest"):
        find_manifest(only)
    assert detect_source(FIXTURES / "converted" / "single").name == "tfrecord"
    assert detect_source(FIXTURES / "imagenet").name == "tfrecord"
    assert detect_source(FIXTURES / "imagenet" / "train-00000-of-00001").name == "tfrecord"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="cannot tell what"):
        detect_source(empty)
    with pytest.raises(DataError, match="does not exist"):
        detect_source(tmp_path / "missing")
