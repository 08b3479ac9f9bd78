"""Data sources and the loader: folders, arrays, digits, labels.txt, counting, seeding, resuming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimtune.data import build_source
from slimtune.data.arrays import ArraySource
from slimtune.data.base import holdout_split
from slimtune.data.digits import load_digits_source
from slimtune.data.folder import ImageFolderSource
from slimtune.data.labels import labels_to_names, read_labels_file, write_labels_file
from slimtune.data.loader import EpochSampler, build_loader, set_loader_epoch
from slimtune.errors import DataError
from slimtune.preprocessing import get_preprocessing


def test_labels_file_round_trip_and_errors(tmp_path):
    path = write_labels_file(tmp_path, ["cat", "dog", "tabby cat"])
    assert path.read_text() == "0:cat\n1:dog\n2:tabby cat\n"
    assert labels_to_names(read_labels_file(tmp_path)) == ["cat", "dog", "tabby cat"]
    (tmp_path / "bad.txt").write_text("0:cat\ndog\n")
    with pytest.raises(DataError, match="bad.txt:2"):
        read_labels_file(tmp_path / "bad.txt")
    with pytest.raises(DataError, match="without gaps"):
        labels_to_names({0: "a", 2: "c"})


def test_image_folder_classes_and_order(cats_vs_dogs):
    source = ImageFolderSource(cats_vs_dogs)
    assert source.class_names == ["cat", "dog"]
    assert len(source) == 12
    assert sorted(set(source.targets())) == [0, 1]
    assert source.describe(0).endswith("cat_0.jpg")
    write_labels_file(cats_vs_dogs, ["dog", "cat"])  # labels.txt decides the ids
    relabelled = ImageFolderSource(cats_vs_dogs)
    assert relabelled.class_names == ["dog", "cat"]
    assert {path.parent.name: label for path, label in relabelled.samples} == {"dog": 0, "cat": 1}


def test_image_folder_errors_name_what_to_fix(tmp_path, cats_vs_dogs):
    with pytest.raises(DataError, match="does not exist"):
        build_source(dataset_dir=str(tmp_path / "nowhere"))
    (cats_vs_dogs / "bird").mkdir()
    with pytest.raises(DataError, match="bird has no images"):
        ImageFolderSource(cats_vs_dogs)


def test_array_source_accepts_nchw_and_checks_labels():
    images = np.zeros((4, 3, 10, 12), np.uint8)
    source = ArraySource(images, np.array([0, 1, 1, 0]))
    assert source.read(2)[0].shape == (10, 12, 3) and source.num_classes == 2
    with pytest.raises(DataError, match="uint8"):
        ArraySource(images.astype(np.float32), np.zeros(4))


def test_digits_split_is_stratified_deterministic_and_disjoint():
    train, test = load_digits_source("train"), load_digits_source("test")
    assert len(train) + len(test) == 1797
    assert 350 <= len(test) <= 370
    every = np.bincount(np.array(train.targets() + test.targets()))
    assert np.array_equal(np.bincount(np.array(test.targets())), every // 5)  # a fifth of each class
    assert np.array_equal(load_digits_source("test").images, test.images)
    image, _ = train.read(0)
    assert image.shape == (24, 24, 1) and image.dtype == np.uint8 and image.max() > 200
    train_rows = {row.tobytes() for row in train.images}
    assert sum(row.tobytes() in train_rows for row in test.images) < 5  # sklearn has a few duplicate scans


def _loader(source, **kwargs):
    preprocess = get_preprocessing("lenet", is_training=False)
    options = dict(batch_size=7, training=False, channels=1)
    options.update(kwargs)
    return build_loader(source, preprocess, (28, 28), **options)


def test_evaluation_loader_counts_every_sample_exactly_once():
    source = load_digits_source("test")
    seen = torch.cat([batch.indices for batch in _loader(source)])
    assert sorted(seen.tolist()) == list(range(len(source)))  # no wrap-around, no duplicates


def test_unreadable_images_are_skipped_and_counted_or_fatal(cats_vs_dogs):
    (cats_vs_dogs / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    source = ImageFolderSource(cats_vs_dogs)
    preprocess = get_preprocessing("vgg", is_training=False)
    batches = list(build_loader(source, preprocess, (32, 32), batch_size=5, training=False))
    assert sum(len(b) for b in batches) == 12
    bad = [d for b in batches for d in b.bad]
    assert len(bad) == 1 and "broken.jpg" in bad[0]
    loader = build_loader(source, preprocess, (32, 32), batch_size=5, training=False, on_bad_image="fail")
    with pytest.raises(DataError, match="broken.jpg"):
        list(loader)


def test_training_batches_do_not_depend_on_worker_count(cats_vs_dogs):
    source = ImageFolderSource(cats_vs_dogs)
    preprocess = get_preprocessing("inception", is_training=True)

    def first_epoch(workers):
        loader = build_loader(source, preprocess, (48, 48), batch_size=4, training=True, num_workers=workers, seed=3)
        set_loader_epoch(loader, 1)
        return [(b.indices, b.images) for b in loader]

    alone, pooled = first_epoch(0), first_epoch(2)
    assert len(alone) == 3  # drop_last: 12 images // 4
    for (indices_a, images_a), (indices_b, images_b) in zip(alone, pooled):
        assert torch.equal(indices_a, indices_b)
        assert torch.equal(images_a, images_b)


def test_resumed_epoch_continues_the_same_order():
    sampler = EpochSampler(50, shuffle=True, seed=1)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, start=20)
    assert list(sampler) == full[20:]
    sampler.set_epoch(5)
    assert list(sampler) != [(5, i) for _, i in full]


def test_distributed_ranks_partition_the_samples():
    ranks = [EpochSampler(23, shuffle=True, seed=0, rank=r, world_size=3) for r in range(3)]
    parts = [[i for _, i in sampler] for sampler in ranks]
    assert sorted(sum(parts, [])) == list(range(23))


def test_holdout_split_is_disjoint_and_repeatable(cats_vs_dogs):
    source = ImageFolderSource(cats_vs_dogs)
    train, validation = holdout_split(source, 0.25, seed=0)
    assert len(train) == 9 and len(validation) == 3
    assert not set(train.indices) & set(validation.indices)
    assert holdout_split(source, 0.25, seed=0)[1].indices == validation.indices
