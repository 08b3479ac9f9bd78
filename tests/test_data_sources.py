"""Data sources and the loader: folders, arrays, digits, labels.txt, counting, seeding, resuming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from slimtune.data import build_source
from slimtune.data.arrays import ArraySource
from slimtune.data.base import holdout_split
from slimtune.data.decode import decode_image, open_image
from slimtune.data.digits import load_digits_source
from slimtune.data.folder import ImageFolderSource
from slimtune.data.labels import labels_to_names, read_labels_file, write_labels_file
from slimtune.data.loader import EpochSampler, SharedBatchRing, build_loader, sample_seed, set_loader_epoch
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


def test_worker_batches_through_the_shared_ring_equal_single_process_batches(cats_vs_dogs):
    # Batches of 2 from 12 images: each of the 2 workers writes 3 batches an epoch, so over 3 epochs
    # its 6 ring slots are all reused at least once.
    source = ImageFolderSource(cats_vs_dogs)
    preprocess = get_preprocessing("vgg", is_training=True)
    single = build_loader(source, preprocess, (40, 40), batch_size=2, training=True, num_workers=0, seed=5)
    pooled = build_loader(source, preprocess, (40, 40), batch_size=2, training=True, num_workers=2, seed=5)
    assert isinstance(pooled.ring, SharedBatchRing)
    for epoch in range(3):
        set_loader_epoch(single, epoch)
        set_loader_epoch(pooled, epoch)
        expected, got = list(single), list(pooled)
        assert len(got) == len(expected) == 6
        for want, batch in zip(expected, got):
            assert torch.equal(batch.indices, want.indices) and torch.equal(batch.targets, want.targets)
            assert torch.equal(batch.images, want.images)
    assert int(pooled.ring.generations.max()) > pooled.ring.slots  # the slots did go round


def test_partial_last_batch_bypasses_the_ring_and_keeps_every_image(cats_vs_dogs):
    source = ImageFolderSource(cats_vs_dogs)
    preprocess = get_preprocessing("vgg", is_training=False)
    single = list(build_loader(source, preprocess, (32, 32), batch_size=5, training=False))
    pooled = list(build_loader(source, preprocess, (32, 32), batch_size=5, training=False, num_workers=2))
    assert [len(b) for b in pooled] == [5, 5, 2]
    for want, batch in zip(single, pooled):
        assert torch.equal(batch.indices, want.indices) and torch.equal(batch.images, want.images)


def test_ring_refuses_a_slot_rewritten_before_it_was_read():
    ring = SharedBatchRing(num_workers=1, slots=3, image_shape=(3, 4, 4), batch_size=2)
    ring.generations[0, 1] = 7
    assert ring.take((0, 1, 7)).shape == (2, 3, 4, 4)
    ring.generations[0, 1] = 10  # the worker came round to this slot again
    with pytest.raises(RuntimeError, match="rewrote batch slot 1"):
        ring.take((0, 1, 7))


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


def test_numpy_arrays_in_an_npz_are_a_dataset(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", train_images=rng.integers(0, 255, (10, 16, 16, 3), dtype=np.uint8),
             train_labels=np.arange(10) % 3, test_images=rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8),
             test_labels=np.array([0, 1, 2, 0]), class_names=np.array(["a", "b", "c"]))
    train = build_source(dataset_dir=str(tmp_path / "data.npz"), split="train")
    assert len(train) == 10 and train.class_names == ["a", "b", "c"]
    assert len(build_source(dataset_dir=str(tmp_path / "data.npz"), split="auto")) == 4  # picks 'test'
    with pytest.raises(DataError, match="for split 'validation'"):
        build_source(dataset_dir=str(tmp_path / "data.npz"), split="validation")


def _expected_training_image(path, transform, size, seed, epoch, index):
    """What the loader must give: the plain transform on a full Pillow decode, seeded per sample."""
    image = torch.from_numpy(decode_image(path)).permute(2, 0, 1)
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, index))
    return transform(image, size, size, generator=generator)


@pytest.mark.parametrize("name", ["vgg", "inception"])
def test_training_batches_equal_the_plain_transform_on_a_full_decode(cats_vs_dogs, name):
    # The loader draws the crop from the JPEG header and decodes with torchvision when the crop
    # needs the full resolution: the result must be the plain path's, bit for bit.
    source = ImageFolderSource(cats_vs_dogs)
    preprocess = get_preprocessing(name, is_training=True)
    loader = build_loader(source, preprocess, (40, 40), batch_size=4, training=True, seed=5)
    set_loader_epoch(loader, 2)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 12
    for batch in batches:
        for image, index in zip(batch.images, batch.indices.tolist()):
            path = source.samples[index][0]
            assert torch.equal(image, _expected_training_image(path, preprocess, 40, 5, 2, index))


def _large_jpeg_folder(root: Path) -> Path:
    photo = Image.fromarray(skimage.data.astronaut()).resize((1024, 768), Image.Resampling.BICUBIC)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(2):
            photo.rotate(90 * index).save(root / label / f"{index}.jpg", quality=90)
    return root


def test_large_training_jpegs_are_decoded_at_the_size_their_crop_needs(tmp_path, monkeypatch):
    import slimtune.data.loader as loader_module

    scales: list[int] = []

    def spying_open_image(payload, description=""):
        image = open_image(payload, description)
        decode = image.decode
        image.decode = lambda channels=3, min_size=None: (scales.append(image.dct_scale(min_size)),
                                                          decode(channels, min_size))[1]
        return image

    monkeypatch.setattr(loader_module, "open_image", spying_open_image)
    source = ImageFolderSource(_large_jpeg_folder(tmp_path / "large"))
    preprocess = get_preprocessing("inception", is_training=True)
    loader = build_loader(source, preprocess, (64, 64), batch_size=4, training=True, seed=1)
    for epoch in range(3):
        set_loader_epoch(loader, epoch)
        for batch in loader:
            for image, index in zip(batch.images, batch.indices.tolist()):
                path = source.samples[index][0]
                generator = torch.Generator().manual_seed(sample_seed(1, epoch, index))
                with open_image(path) as header:
                    plan = preprocess.plan(header.height, header.width, 64, 64, generator=generator)
                    scale = header.dct_scale(plan.decode_size)
                # The same crop of the same picture: against a box-filtered full decode the only
                # difference is how the DCT-domain downscale rounds.
                reduced = Image.fromarray(decode_image(path)).reduce(scale)
                expected = preprocess.apply_plan(torch.from_numpy(np.array(reduced)).permute(2, 0, 1), 64, 64, plan)
                assert (image - expected).abs().mean() < 0.01
    assert len(scales) == 12 and max(scales) > 1
    scales.clear()
    evaluation = build_loader(source, get_preprocessing("inception", is_training=False), (64, 64), batch_size=4,
                              training=False)
    assert sum(len(b) for b in evaluation) == 4 and scales == [1, 1, 1, 1]   # evaluation decodes in full


@pytest.mark.parametrize("name, options", [("vgg", {}), ("vgg", dict(resize_side_min=300, resize_side_max=320)),
                                           ("inception", {}), ("inception", dict(fast_mode=False)),
                                           ("inception", dict(bbox=[[0.1, 0.2, 0.6, 0.9]]))])
def test_plan_then_apply_equals_one_call(name, options):
    image = torch.from_numpy(skimage.data.coffee()).permute(2, 0, 1)        # 400 x 600
    for use_grayscale in (False, True):
        preprocess = get_preprocessing(name, is_training=True, use_grayscale=use_grayscale, **options)
        for seed in range(4):
            plan = preprocess.plan(400, 600, 96, 80, generator=torch.Generator().manual_seed(seed))
            assert plan.image_size == (400, 600) and min(plan.decode_size) > 0
            planned = preprocess.apply_plan(image, 96, 80, plan)
            assert torch.equal(planned, preprocess(image, 96, 80, generator=torch.Generator().manual_seed(seed)))
    assert get_preprocessing(name, is_training=False).plan(400, 600, 96, 80) is None    # eval has no draws
    assert get_preprocessing("cifarnet", is_training=True).plan(32, 32, 32, 32) is None  # needs the pixels


def _noisy_crop(image, height, width):
    """A transform without a generator argument: it draws from torch's global RNG."""
    return image[:, :height, :width].float() + torch.rand(())


def test_transforms_without_a_generator_are_seeded_per_sample(cats_vs_dogs):
    source = ImageFolderSource(cats_vs_dogs)
    loader = build_loader(source, _noisy_crop, (16, 16), batch_size=4, training=True, seed=2)
    torch.manual_seed(123)
    first = [b.images for b in loader]
    after_noisy = torch.rand(3)
    torch.manual_seed(123)
    list(build_loader(source, lambda image, h, w: image.float(), (16, 16), batch_size=4, training=True, seed=2))
    assert torch.equal(after_noisy, torch.rand(3))       # the transform's draws leave the global RNG alone
    again = [b.images for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    noise = torch.cat([(b - b.round()).flatten(1)[:, 0] for b in first])
    assert len(set(noise.tolist())) == 12                     # a different draw per sample


def test_resizing_a_decoded_hwc_image_equals_resizing_a_contiguous_one():
    # Decoders hand over HWC memory (a CHW view); strong downscales gather rows from it directly.
    from slimtune.preprocessing import ops

    photo = skimage.data.astronaut()                                   # 512 x 512
    view = torch.from_numpy(photo).permute(2, 0, 1)
    assert view.stride(0) == 1
    for window, exact, flip in (((10, 20, 48, 40), True, False), ((0, 0, 60, 60), False, True),
                                ((5, 3, 50, 30), True, True)):
        a = ops.resize_bilinear_tf1_window(view, 60, 64, window, flip=flip, exact=exact)
        b = ops.resize_bilinear_tf1_window(view.contiguous(), 60, 64, window, flip=flip, exact=exact)
        assert torch.equal(a, b)
    gray = view[:1].expand(3, -1, -1)                                   # a broadcast 1-channel image
    assert torch.equal(ops.resize_bilinear_tf1_window(gray, 30, 30),
                       ops.resize_bilinear_tf1_window(gray.contiguous(), 30, 30))


def test_labels_offset_shifts_labels_like_slim():
    # slim's ImageNet records use 1..1000 with 0 = background; --labels_offset 1 trains a 1000-class net.
    source = ArraySource(np.zeros((4, 8, 8, 3), np.uint8), np.array([1, 2, 3, 1]),
                         class_names=["background", "a", "b", "c"])
    batch = next(iter(_loader(source, labels_offset=1, channels=3)))
    assert batch.targets.tolist() == [0, 1, 2, 0]


def _split_layout(cats_vs_dogs: Path, root: Path) -> Path:
    """dir/<split>/<class>: the same two classes under train/ and validation/."""
    import shutil
    for split in ("train", "validation"):
        shutil.copytree(cats_vs_dogs, root / split)
    return root


def test_a_misspelt_split_of_a_split_layout_is_an_error_listing_the_splits(cats_vs_dogs, tmp_path):
    root = _split_layout(cats_vs_dogs, tmp_path / "pets")
    assert build_source(dataset_dir=str(root), split="validation").class_names == ["cat", "dog"]
    # 'trian' used to open the whole tree with the split folders as the classes
    with pytest.raises(DataError, match=r"no split 'trian' \(did you mean train\?\); its splits are train, validation"):
        build_source(dataset_dir=str(root), split="trian")
    # a flat class folder is one split and opens whole under any name
    assert len(build_source(dataset_dir=str(cats_vs_dogs), split="train")) == 12
