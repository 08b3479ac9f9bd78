"""Exact data sharding: every sample once per epoch across ranks x loader workers, for every source.

4 ranks x 2 workers each (8 readers) over each kind of source, counted by sample id: the dataset
index for sources with random access, a hash of "shard:record" for streamed shards. Training order
is a function of (seed, epoch) only: the same epoch read twice gives the same batches, the next
epoch another order.

The default run reads each rank's dataset in this process, as each of its loader workers would
(the worker's id is what `StreamDataset` shards by; for sources with random access the sampler
alone decides, in the main process). The slow-marked test runs real worker processes.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from slimtune.cli import main
from slimtune.data import build_source
from slimtune.data.base import StreamSource
from slimtune.data.loader import build_loader, set_loader_epoch
from slimtune.preprocessing import get_preprocessing
from voc_fixture import make_voc_fixture

RANKS, WORKERS = 4, 2


def _folder(root: Path, cats_vs_dogs: Path) -> Path:
    return cats_vs_dogs


def _voc(root: Path, cats_vs_dogs: Path) -> Path:
    return make_voc_fixture(root / "voc", copies=1, max_side=48)


def _manifest(root: Path, cats_vs_dogs: Path) -> Path:
    lines = [f"{path},{path.parent.name}" for path in sorted(cats_vs_dogs.rglob("*.jpg"))]
    (root / "pets.csv").write_text("\n".join(lines) + "\n")
    return root / "pets.csv"


def _npz(root: Path, cats_vs_dogs: Path) -> Path:
    paths = sorted(cats_vs_dogs.rglob("*.jpg"))
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths] * 2)  # 24 images
    np.savez(root / "pets.npz", images=images, labels=np.arange(len(images)) % 2)
    return root / "pets.npz"


def _converted(output_format: str):
    def make(root: Path, cats_vs_dogs: Path) -> Path:
        assert main(["data", "convert", str(cats_vs_dogs), str(root / output_format), "--format", output_format,
                     "--num_shards", "3"]) == 0
        return root / output_format
    return make


SOURCES = {"folder": _folder, "voc": _voc, "manifest": _manifest, "npz": _npz,
           "tfrecord": _converted("tfrecord"), "webdataset": _converted("webdataset")}


def _all_ids(source) -> list[int]:
    if isinstance(source, StreamSource):
        return sorted(zlib.crc32(where.encode()) for shard in source.shards for *_, where in source.iter_shard(shard))
    return list(range(len(source)))


def _read(source, rank: int, training: bool, epoch: int = 0, real_workers: bool = False) -> list[int]:
    loader = build_loader(source, get_preprocessing("lenet", is_training=False), (16, 16), batch_size=2,
                          training=training, drop_last=False, num_workers=WORKERS if real_workers else 0,
                          rank=rank, world_size=RANKS)
    set_loader_epoch(loader, epoch)
    if real_workers:
        return torch.cat([batch.indices for batch in loader]).tolist()
    if not isinstance(source, StreamSource):
        return [index for _, index in loader.sampler]
    import slimtune.data.loader as loader_module

    ids, real = [], loader_module.get_worker_info
    try:
        for worker in range(WORKERS):
            loader_module.get_worker_info = lambda worker=worker: SimpleNamespace(num_workers=WORKERS, id=worker)
            ids += [sample["index"] for sample in loader.dataset]
    finally:
        loader_module.get_worker_info = real
    return ids


def _check_sharding(kind: str, tmp_path: Path, cats_vs_dogs: Path, real_workers: bool) -> None:
    path = SOURCES[kind](tmp_path, cats_vs_dogs)
    split = "trainval" if kind == "voc" else "train"
    source = build_source(dataset_dir=str(path), split=split)
    expected = _all_ids(source)
    assert len(expected) == len(source) >= 8

    evaluated = [_read(source, rank, False, 0, real_workers) for rank in range(RANKS)]
    assert sorted(sum(evaluated, [])) == expected  # evaluation: once each, nothing padded

    epoch0 = [_read(source, rank, True, 0, real_workers) for rank in range(RANKS)]
    epoch1 = [_read(source, rank, True, 1, real_workers) for rank in range(RANKS)]
    for epoch in (epoch0, epoch1):
        assert sorted(sum(epoch, [])) == expected  # training: once each per epoch
    assert _read(source, 2, True, 0, real_workers) == epoch0[2]  # the order is (seed, epoch)'s alone
    assert epoch0 != epoch1  # and each epoch is shuffled anew


@pytest.mark.parametrize("kind", SOURCES)
def test_every_sample_is_read_once_per_epoch_across_ranks_and_workers(kind, tmp_path, cats_vs_dogs):
    _check_sharding(kind, tmp_path, cats_vs_dogs, real_workers=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "tfrecord", "webdataset"])
def test_sharding_with_real_worker_processes(kind, tmp_path, cats_vs_dogs):
    _check_sharding(kind, tmp_path, cats_vs_dogs, real_workers=True)
