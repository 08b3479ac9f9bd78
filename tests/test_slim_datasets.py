"""slim's named datasets over TFRecord shards written by TensorFlow (tests/fixtures/tfrecord)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from slimtune.data.base import StreamSource
from slimtune.data.decode import decode_image
from slimtune.data.slim_datasets import (DATASETS, TFRecordSource, get_split, list_datasets,
                                         read_dataset_spec)
from slimtune.data.tfrecord import TFRecordError, TFRecordWriter, iter_tfrecord
from slimtune.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures" / "tfrecord"


def _records(source: StreamSource) -> list[tuple]:
    return [record for shard in source.shards for record in source.iter_shard(shard)]


def test_registry_matches_slims_dataset_modules():
    assert list_datasets() == ["cifar10", "flowers", "imagenet", "mnist", "visualwakewords"]
    facts = {  # (file pattern, split sizes, classes) from research/slim/datasets/*.py
        "flowers": ("flowers_%s_*.tfrecord", {"train": 3320, "validation": 350}, 5),
        "cifar10": ("cifar10_%s.tfrecord", {"train": 50000, "test": 10000}, 10),
        "mnist": ("mnist_%s.tfrecord", {"train": 60000, "test": 10000}, 10),
        "imagenet": ("%s-*", {"train": 1281167, "validation": 50000}, 1001),
        "visualwakewords": ("%s.record-*", {"train": 82783, "val": 40504}, 2),
    }
    for name, (pattern, splits, classes) in facts.items():
        spec = DATASETS[name]
        assert (spec.file_pattern, spec.splits, spec.num_classes) == (pattern, splits, classes)
    assert DATASETS["mnist"].raw_shape == (28, 28, 1) and DATASETS["mnist"].channels == 1


def test_flowers_shards_labels_and_images():
    source = get_split("flowers", "train", FIXTURES / "flowers")
    assert isinstance(source, StreamSource)
    assert [p.name for p in source.shards] == ["flowers_train_00000-of-00002.tfrecord",
                                               "flowers_train_00001-of-00002.tfrecord"]
    assert len(source) == 3320  # slim's split size; the fixture itself holds 3 records
    assert source.count_records() == 3
    assert source.class_names == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    records = _records(source)
    assert [target for _, target, _ in records] == [2, 4, 0]
    shapes = [decode_image(payload).shape for payload, _, _ in records]
    assert shapes == [(24, 36, 3), (32, 32, 3), (20, 30, 3)]
    assert records[0][2].endswith("flowers_train_00000-of-00002.tfrecord:record 0")


def test_val_and_validation_name_the_same_split():
    for name in ("validation", "val"):
        source = get_split("flowers", name, FIXTURES / "flowers")
        assert source.split == "validation" and [t for _, t, _ in _records(source)] == [1]
    # visualwakewords' converter writes val.record-*; slim's reader looked for validation.record-*.
    for name in ("val", "validation"):
        source = get_split("visualwakewords", name, FIXTURES / "visualwakewords")
        assert source.split == "val" and [t for _, t, _ in _records(source)] == [0]
    source = get_split("visualwakewords", "train", FIXTURES / "visualwakewords")
    assert source.class_names == ["background", "person"]
    items = [item for item in source.iter_items(source.shards[0])]
    assert [item["label"] for item in items] == [1, 0]
    np.testing.assert_allclose(items[0]["object/bbox"], [[0.02, 0.0, 1.0, 0.7]], rtol=1e-6)
    assert items[1]["object/bbox"].shape == (0, 4)


def test_mnist_raw_records_become_arrays():
    source = get_split("mnist", "train", FIXTURES / "mnist")
    (raw, raw_label, _), (png, png_label, _) = _records(source)
    assert isinstance(raw, np.ndarray) and raw.shape == (28, 28, 1) and raw.dtype == np.uint8
    assert (raw_label, png_label) == (7, 3)
    assert source.channels == 1 and source.class_names[7] == "7"
    # The same digit stored raw and as PNG decodes to the same pixels.
    np.testing.assert_array_equal(decode_image(raw, channels=1), decode_image(png, channels=1))


def test_imagenet_background_class_bbox_and_text():
    source = get_split("imagenet", "train", FIXTURES / "imagenet")
    assert source.num_classes == 1001 and source.class_names[0] == "background"
    items = list(source.iter_items(source.shards[0]))
    first, second = items
    assert first["label"] == 282 and first["label_text"] == "tabby, tabby cat"
    assert first["filename"] == "n02123045_1.JPEG" and first["format"] == "JPEG"
    # slim's BoundingBox handler order: [ymin, xmin, ymax, xmax].
    np.testing.assert_allclose(first["object/bbox"], [[0.05, 0.1, 0.95, 0.9], [0.25, 0.5, 0.5, 0.75]],
                               rtol=1e-6)
    assert (first["height"], first["width"]) == (24, 36)
    assert second["label"] == 968 and second["object/bbox"].shape == (0, 4)
    assert decode_image(first["image"]).shape == (24, 36, 3)
    assert [item["label"] for item in source.iter_items(get_split(
        "imagenet", "validation", FIXTURES / "imagenet").shards[0])] == [835]


def test_missing_shards_name_the_pattern_and_directory(tmp_path):
    with pytest.raises(DataError) as error:
        get_split("flowers", "train", tmp_path)
    message = str(error.value)
    assert "flowers_train_*.tfrecord" in message and str(tmp_path) in message
    with pytest.raises(DataError, match="does not exist"):
        get_split("cifar10", "train", tmp_path / "nowhere")
    # Shards of another split or dataset are listed as a hint.
    shutil.copy(FIXTURES / "flowers" / "flowers_validation_00000-of-00001.tfrecord", tmp_path)
    with pytest.raises(DataError, match="flowers_validation_00000-of-00001.tfrecord"):
        get_split("flowers", "train", tmp_path)


def test_incomplete_shard_set_is_an_error(tmp_path):
    shutil.copy(FIXTURES / "flowers" / "flowers_train_00000-of-00002.tfrecord", tmp_path)
    with pytest.raises(DataError, match=r"1 of 2 .* missing number\(s\) 1"):
        get_split("flowers", "train", tmp_path)


def test_unknown_dataset_or_split_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'pets'.*flowers"):
        get_split("pets", "train", tmp_path)
    with pytest.raises(ConfigError, match="no split 'test'.*train, val, validation"):
        get_split("flowers", "test", FIXTURES / "flowers")
    with pytest.raises(ConfigError, match="no --dataset_name"):
        get_split(None, "train", tmp_path)


def test_file_pattern_override():
    source = get_split("flowers", "train", FIXTURES / "flowers", file_pattern="flowers_%s_00001-*.tfrecord")
    assert [p.name for p in source.shards] == ["flowers_train_00001-of-00002.tfrecord"]


def _write_flowers(tmp_path: Path, examples: list[dict]) -> Path:
    with TFRecordWriter(tmp_path / "flowers_train_00000-of-00001.tfrecord") as writer:
        for example in examples:
            writer.write_example(example)
    return tmp_path


def test_label_out_of_range_or_missing_names_shard_and_record(tmp_path):
    image = next(iter(_records(get_split("flowers", "train", FIXTURES / "flowers"))))[0]
    good = {"image/encoded": image, "image/format": b"jpg", "image/class/label": 1}
    _write_flowers(tmp_path, [good, dict(good, **{"image/class/label": 5})])
    source = get_split("flowers", "train", tmp_path)
    with pytest.raises(DataError, match=r"record 1: label 5 is outside \[0, 5\)"):
        _records(source)
    _write_flowers(tmp_path, [{"image/encoded": image, "image/format": b"jpg"}])
    with pytest.raises(TFRecordError, match="record 0: record has no image/class/label"):
        _records(get_split("flowers", "train", tmp_path))


def test_labels_file_with_too_many_classes_is_an_error(tmp_path):
    shutil.copy(FIXTURES / "flowers" / "flowers_validation_00000-of-00001.tfrecord", tmp_path)
    (tmp_path / "labels.txt").write_text("0:a\n1:b\n7:c\n")
    with pytest.raises(DataError, match="label 7 is outside"):
        get_split("flowers", "validation", tmp_path)


def test_without_labels_file_known_names_are_used(tmp_path):
    shutil.copy(FIXTURES / "flowers" / "flowers_validation_00000-of-00001.tfrecord", tmp_path)
    assert get_split("flowers", "val", tmp_path).class_names[1] == "dandelion"


def test_start_step_split_one_shard_between_workers():
    source = get_split("flowers", "train", FIXTURES / "flowers")
    shard = source.shards[0]
    everything = [description for _, _, description in source.iter_shard(shard)]
    parts = [[d for _, _, d in source.iter_shard(shard, start=w, step=2)] for w in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(everything) and not set(parts[0]) & set(parts[1])


def test_converted_dataset_reads_back_without_registration():
    single = get_split(None, "train", FIXTURES / "converted" / "single")
    spec = read_dataset_spec(FIXTURES / "converted" / "single")
    assert single.name == spec.name == "tiny" and len(single) == single.count_records() == 7
    assert single.class_names == ["cat", "cup", "person"] and not single.multi_label
    multi = get_split("voc2007", "trainval", FIXTURES / "converted" / "multi")
    assert multi.multi_label and multi.num_classes == 20
    targets = [target for _, target, _ in _records(multi)]
    assert all(t.shape == (20,) and t.dtype == np.float32 for t in targets)
    assert {float(v) for t in targets for v in t} == {-1.0, 0.0, 1.0}


def test_source_is_cheap_to_pickle():
    import pickle

    source = get_split("flowers", "train", FIXTURES / "flowers")
    copy = pickle.loads(pickle.dumps(source))
    assert isinstance(copy, TFRecordSource) and copy.shards == source.shards
    assert len(pickle.dumps(source)) < 2000


def test_corrupt_shard_fails_with_its_name(tmp_path):
    shard = tmp_path / "flowers_train_00000-of-00001.tfrecord"
    data = bytearray((FIXTURES / "flowers" / "flowers_train_00000-of-00002.tfrecord").read_bytes())
    data[200] ^= 0x55
    shard.write_bytes(bytes(data))
    source = get_split("flowers", "train", tmp_path)
    with pytest.raises(TFRecordError, match=f"{shard.name}: corrupt record 0"):
        _records(source)
    assert len(list(iter_tfrecord(shard, verify=False))) == 2
