"""WebDataset tar shards: `data convert --format webdataset` writes them, every command reads them.

Checked against two independent readings: the TFRecord conversion of the same source (same seed,
same shards: same bytes and labels in the same order) and the `webdataset` library's own pipeline.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from slimtune.cli import main
from slimtune.data import available_splits, build_source
from slimtune.data.loader import build_loader
from slimtune.data.sources import detect_source
from slimtune.errors import DataError
from slimtune.preprocessing import get_preprocessing
from voc_fixture import make_voc_fixture


def _split_layout(cats_vs_dogs: Path, root: Path) -> Path:
    for split in ("train", "validation"):
        shutil.copytree(cats_vs_dogs, root / split)
    return root


def _records(source) -> list[tuple[bytes, object]]:
    return [(payload, target) for shard in source.shards for payload, target, _ in source.iter_shard(shard)]


@pytest.fixture()
def converted(cats_vs_dogs, tmp_path) -> tuple[Path, Path]:
    """The same split layout converted both ways with the same seed and shard count."""
    root = _split_layout(cats_vs_dogs, tmp_path / "pets")
    assert main(["data", "convert", str(root), str(tmp_path / "wds"), "--format", "webdataset",
                 "--num_shards", "3"]) == 0
    assert main(["data", "convert", str(root), str(tmp_path / "tfr"), "--num_shards", "3"]) == 0
    return tmp_path / "wds", tmp_path / "tfr"


def test_webdataset_shards_hold_what_the_tfrecord_conversion_holds(converted):
    wds_dir, tfr_dir = converted
    assert detect_source(wds_dir).name == "webdataset"
    assert available_splits(None, str(wds_dir)) == ["train", "validation"]
    for split in ("train", "validation"):
        ours, reference = build_source(dataset_dir=str(wds_dir), split=split), \
            build_source(dataset_dir=str(tfr_dir), split=split)
        assert ours.class_names == reference.class_names == ["cat", "dog"] and len(ours) == len(reference) == 12
        assert [s.name for s in ours.shards] == [f"pets-{split}-00000{i}.tar" for i in range(3)]
        assert _records(ours) == _records(reference)  # same image bytes, same labels, same order


def test_the_webdataset_library_reads_our_shards_as_we_do(converted):
    wds_dir, _ = converted
    source = build_source(dataset_dir=str(wds_dir), split="train")
    urls = [str(shard) for shard in source.shards]
    theirs = [(sample["jpg"], int(sample["cls"])) for sample in wds.WebDataset(urls, shardshuffle=False)]
    assert theirs == _records(source)


@pytest.mark.parametrize("num_shards", [3, 5])
def test_every_sample_is_read_once_across_ranks_and_workers(cats_vs_dogs, tmp_path, num_shards):
    """2 ranks x 2 loader workers = 4 readers, with fewer and with more shards than readers."""
    out = tmp_path / "wds"
    assert main(["data", "convert", str(cats_vs_dogs), str(out), "--format", "webdataset", "--num_shards",
                 str(num_shards)]) == 0
    source = build_source(dataset_dir=str(out), split="train")
    expected = sorted(zlib.crc32(where.encode()) for shard in source.shards
                      for _, _, where in source.iter_shard(shard))
    preprocess = get_preprocessing("lenet", is_training=False)
    seen = []
    for rank in range(2):
        loader = build_loader(source, preprocess, (28, 28), batch_size=4, training=False, num_workers=2,
                              rank=rank, world_size=2)
        seen += torch.cat([batch.indices for batch in loader]).tolist()
    assert sorted(seen) == expected and len(expected) == 12


def test_multi_label_voc_round_trips_with_ignored_entries(tmp_path):
    devkit = make_voc_fixture(tmp_path / "voc")
    out = tmp_path / "wds"
    assert main(["data", "convert", str(devkit), str(out), "--format", "webdataset", "--splits", "trainval",
                 "--num_shards", "2"]) == 0
    ours = build_source(dataset_dir=str(out), split="trainval")
    original = build_source(dataset_dir=str(devkit), split="trainval")
    assert ours.multi_label and ours.class_names == original.class_names
    targets = sorted(tuple(np.asarray(t).tolist()) for _, t in _records(ours))
    assert targets == sorted(tuple(np.asarray(t).tolist()) for t in original.targets())
    assert any(-1.0 in t for t in targets)  # 'difficult' objects stay ignored, not absent


def test_training_reads_webdataset_shards(converted, tmp_path):
    wds_dir, _ = converted
    assert main(["train", "--model_name", "lenet", "--dataset_dir", str(wds_dir), "--train_dir",
                 str(tmp_path / "run"), "--batch_size", "4", "--max_number_of_steps", "2", "--num_workers",
                 "0"]) == 0
    assert (tmp_path / "run" / "labels.txt").read_text().split() == ["0:cat", "1:dog"]


def test_damaged_shards_and_labels_are_one_line_errors(converted, tmp_path):
    wds_dir, _ = converted
    shard = wds_dir / "pets-train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 7])  # cut mid-member
    source = build_source(dataset_dir=str(wds_dir), split="train")
    with pytest.raises(DataError, match=r"pets-train-000001.tar: not a readable tar shard"):
        list(source.iter_shard(shard))
    with pytest.raises(DataError, match=r"no split 'trian' \(did you mean train\?\)"):
        build_source(dataset_dir=str(wds_dir), split="trian")
    # another tool's shard: no description file, a label beyond labels.txt
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "labels.txt").write_text("0:cat\n1:dog\n")
    with wds.TarWriter(str(foreign / "x-train-000000.tar")) as writer:
        writer.write({"__key__": "a", "jpg": b"\xff\xd8", "cls": b"1"})
        writer.write({"__key__": "b", "jpg": b"\xff\xd8", "cls": b"7"})
    source = build_source(dataset_dir=str(foreign), split="train")
    assert len(source) == 2  # counted, since no description gives the size
    with pytest.raises(DataError, match=r"x-train-000000.tar:b: label 7 is not a class index below 2"):
        list(source.iter_shard(source.shards[0]))
