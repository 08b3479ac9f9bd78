"""Turn a data source into batches: decode + preprocess in DataLoader workers.

Augmentation randomness is seeded per sample from (seed, epoch, index), so a run gives the same
batches whatever the number of workers, and a resumed run continues the exact sequence of the
uninterrupted one. Unreadable images are skipped and counted (or fatal with on_bad_image='fail').

Training with slim's vgg or inception preprocessing draws each image's crop from its header
before decoding it (``PreprocessingFn.plan``), so a JPEG much larger than its crop is decoded at
1/2, 1/4 or 1/8 size (libjpeg DCT scaling) and nothing the crop needs is lost; plain JPEGs are
decoded by torchvision's libjpeg-turbo binding (see ``decode.LazyImage``). Workers stack batches
straight into shared memory, as torch's default collate does, so handing a batch to the main
process copies nothing. Map-style loaders keep their workers across epochs; with num_workers=0
the per-image work runs on one thread.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing  # imported before our atexit handler registers, so its own runs after ours
import inspect
import logging
import math
import os
import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from ..errors import ConfigError
from .base import ImageSource, StreamSource
from .decode import BadImageError, open_image

logger = logging.getLogger(__name__)

Transform = Callable[..., torch.Tensor]
BAD_IMAGE_POLICIES = ("skip", "fail")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, sample index)."""
    return zlib.crc32(f"{seed}:{epoch}:{index}".encode()) * 1_000_003 + index


def _accepts_generator(transform: Transform) -> bool:
    try:
        return "generator" in inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False


def target_tensor(target: Any, multi_label: bool) -> torch.Tensor:
    """A class id as int64 scalar, or a multi-hot (1/0/-1) row as float32."""
    if multi_label:
        return torch.as_tensor(np.asarray(target, dtype=np.float32))
    return torch.tensor(int(target), dtype=torch.int64)


class _SampleMaker:
    """Decode, preprocess and label one payload (shared by map-style and streamed datasets)."""

    def __init__(self, transform: Transform, image_size: tuple[int, int], channels: int, multi_label: bool,
                 on_bad_image: str, draft: bool, seed: int, labels_offset: int = 0) -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"--on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
        self.transform = transform
        self.height, self.width = image_size
        self.channels = channels
        self.multi_label = multi_label
        self.on_bad_image = on_bad_image
        # Transforms that can draw their randomness from the image size (PreprocessingFn.plan)
        # say which decode size loses nothing; others get JPEG DCT scaling that keeps both sides
        # >= the output size.
        self.takes_generator = _accepts_generator(transform)
        self.plans = draft and self.takes_generator and callable(getattr(transform, "plan", None)) \
            and callable(getattr(transform, "apply_plan", None))
        self.min_decode_size = (self.height, self.width) if draft else None
        self.seed = seed
        self.epoch = 0
        self.labels_offset = labels_offset

    def make(self, payload: Any, target: Any, index: int, description: str, epoch: Optional[int] = None):
        """The sample dict of one payload ({'bad': description} for an unreadable image)."""
        threads = torch.get_num_threads()
        if threads == 1 or get_worker_info() is not None:
            return self._make(payload, target, index, description, epoch)
        # In the main process (num_workers=0) torch would split every small per-image op over all
        # cores: several times slower than one thread, and worse on a busy machine. One thread also
        # keeps reductions (contrast's mean) in the order loader workers use.
        torch.set_num_threads(1)
        try:
            return self._make(payload, target, index, description, epoch)
        finally:
            torch.set_num_threads(threads)

    def _make(self, payload: Any, target: Any, index: int, description: str, epoch: Optional[int]):
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        plan = None
        try:
            with open_image(payload, description) as encoded:
                if self.plans:
                    plan = self.transform.plan(encoded.height, encoded.width, self.height, self.width,
                                               generator=generator)
                image = encoded.decode(self.channels, plan.decode_size if plan is not None else self.min_decode_size)
        except BadImageError:
            if self.on_bad_image == "fail":
                raise
            return {"bad": description}
        if plan is not None:
            pixels = self.transform.apply_plan(image, self.height, self.width, plan)
        elif self.takes_generator:
            pixels = self.transform(image, self.height, self.width, generator=generator)
        else:
            # A transform drawing from the global RNG gets it seeded for this sample and restored
            # after. Only the CPU generator: torch.manual_seed would also queue seeding of every
            # accelerator backend, at a cost of milliseconds per call.
            state = torch.get_rng_state()
            torch.default_generator.manual_seed(generator.initial_seed())
            try:
                pixels = self.transform(image, self.height, self.width)
            finally:
                torch.set_rng_state(state)
        if not self.multi_label and self.labels_offset:
            target = int(target) - self.labels_offset
        return {"image": pixels, "target": target_tensor(target, self.multi_label), "index": index}


class ImageDataset(Dataset):
    """Map-style dataset over an ImageSource; items are dicts (or {'bad': description})."""

    def __init__(self, source: ImageSource, maker: _SampleMaker) -> None:
        self.source = source
        self.maker = maker

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation seeds of an epoch."""
        self.maker.epoch = epoch

    def __getitem__(self, key: int | tuple[int, int]):
        # EpochSampler yields (epoch, index): persistent workers never see set_epoch on their copy.
        epoch, index = key if isinstance(key, tuple) else (None, key)
        payload, target = self.source.read(index)
        return self.maker.make(payload, target, index, self.source.describe(index), epoch)


class StreamDataset(IterableDataset):
    """Iterable dataset over TFRecord-like shards, split across DDP ranks and loader workers.

    Shards are shuffled per epoch and records go through a shuffle buffer (slim's
    RandomShuffleQueue, min 10 x batch). With fewer shards than readers, every reader scans all
    shards and keeps every n-th record, so each record is still read by exactly one reader.
    """

    def __init__(self, source: StreamSource, maker: _SampleMaker, shuffle: bool, buffer_size: int = 1024,
                 rank: int = 0, world_size: int = 1) -> None:
        self.source = source
        self.maker = maker
        self.shuffle = shuffle
        self.buffer_size = buffer_size
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return math.ceil(len(self.source) / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the shard order and augmentation seeds of an epoch."""
        self.maker.epoch = epoch

    def _records(self) -> Iterator[tuple[Any, Any, int, str]]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        worker = info.id if info else 0
        readers, reader = self.world_size * workers, self.rank * workers + worker
        shards = list(self.source.shards)
        if self.shuffle:
            random.Random(self.maker.seed + self.maker.epoch).shuffle(shards)
        if len(shards) >= readers:
            records = (item for shard in shards[reader::readers] for item in self.source.iter_shard(shard))
        else:
            # Fewer shards than readers: each reader takes every n-th record of every shard.
            records = (item for shard in shards for item in self.source.iter_shard(shard, start=reader, step=readers))
        for payload, target, description in records:
            yield payload, target, zlib.crc32(description.encode()), description

    def __iter__(self):
        records = self._records()
        if not self.shuffle:
            for payload, target, key, description in records:
                yield self.maker.make(payload, target, key, description)
            return
        rng = random.Random(self.maker.seed * 7919 + self.maker.epoch)
        buffer: list = []
        for record in records:
            buffer.append(record)
            if len(buffer) >= self.buffer_size:
                chosen = buffer.pop(rng.randrange(len(buffer)))
                yield self.maker.make(*chosen[:2], chosen[2], chosen[3])
        rng.shuffle(buffer)
        for payload, target, key, description in buffer:
            yield self.maker.make(payload, target, key, description)


class EpochSampler(Sampler[tuple[int, int]]):
    """Per-epoch permutation (or order), sharded over DDP ranks, resumable at a batch offset.

    Yields (epoch, index) so that the dataset copies inside persistent workers know the epoch.
    """

    def __init__(self, num_samples: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, epoch_size: Optional[int] = None) -> None:
        self.num_samples = num_samples
        # A run resumed at another world size keeps the epoch of the run that started it: the
        # first `epoch_size` samples of each epoch's order (None: all).
        self.epoch_size = epoch_size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip its first `start` indices of this rank (resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    def _rank_indices(self) -> list[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples).tolist()
        else:
            order = list(range(self.num_samples))
        if self.epoch_size is not None:
            order = order[:self.epoch_size]
        if self.world_size == 1:
            return order
        if self.drop_last:
            usable = (len(order) // self.world_size) * self.world_size
            order = order[:usable]
        # Without drop_last the last ranks simply get one sample fewer: nothing is counted twice.
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in self._rank_indices()[self.start:])

    def __len__(self) -> int:
        return max(len(self._rank_indices()) - self.start, 0)


@dataclass
class Batch:
    """A collated batch; `bad` lists the images that were skipped."""

    images: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor
    bad: list[str] = field(default_factory=list)
    # Set by a worker that left the images in a SharedBatchRing slot: (worker, slot, generation).
    ring_slot: Optional[tuple[int, int, int]] = None

    def pin_memory(self) -> "Batch":
        """Pinned copies for asynchronous host-to-GPU transfer."""
        return Batch(self.images.pin_memory(), self.targets.pin_memory(), self.indices, self.bad)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack; inside a loader worker straight into shared memory, as default_collate does.

    A worker's batch reaches the main process through shared memory: stacking into it directly
    saves copying the whole batch there when it is sent.
    """
    if get_worker_info() is not None:
        first = tensors[0]
        try:
            storage = first._typed_storage()._new_shared(sum(t.numel() for t in tensors), device=first.device)
            out = first.new(storage).resize_(len(tensors), *first.shape)
            return torch.stack(tensors, out=out)
        except (AttributeError, RuntimeError, TypeError):
            pass  # a torch without these internals: the plain stack below is copied when sent
    return torch.stack(tensors)


def collate(items: Sequence[dict], ring: Optional[SharedBatchRing] = None) -> Optional[Batch]:
    """Stack good samples; keep the descriptions of bad ones. None when every sample was bad.

    With a `ring` (in a loader worker), a full batch's images go into its next slot instead.
    """
    bad = [item["bad"] for item in items if "bad" in item]
    good = [item for item in items if "bad" not in item]
    if not good:
        return Batch(torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.int64), bad)
    images = [item["image"] for item in good]
    targets = torch.stack([item["target"] for item in good])
    indices = torch.tensor([item["index"] for item in good], dtype=torch.int64)
    where = ring.put(images) if ring is not None and not bad else None
    if where is not None:
        return Batch(torch.empty(0), targets, indices, ring_slot=where)
    return Batch(_stack(images), targets, indices, bad)


def _free_bytes(path: str) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


class SharedBatchRing:
    """Batch buffers in shared memory, made once before the workers start and reused batch after batch.

    A worker normally stacks each batch into a new shared-memory file that both processes then
    fault in page by page (some 12 ms more than a plain copy for a 32 x 3 x 224 x 224 float batch on
    2 cores, 0.4-0.6 ms per image). Here worker w writes its batches round-robin into its own
    `slots` buffers and sends only the slot number; the main process copies the batch out as it
    arrives. The DataLoader keeps at most `prefetch_factor` batches of a worker in flight, so with
    `slots` >= prefetch_factor + 2 a slot is never rewritten before its batch was copied; each slot
    also carries a generation number, checked after the copy, so a violation raises, never passes.
    """

    def __init__(self, num_workers: int, slots: int, image_shape: tuple[int, ...], batch_size: int) -> None:
        size = num_workers * slots * batch_size * math.prod(image_shape) * 4
        if os.path.isdir("/dev/shm") and size * 2 > _free_bytes("/dev/shm"):
            # Touching shared pages beyond a full /dev/shm kills the process with SIGBUS, not an error.
            raise RuntimeError(f"/dev/shm has less than twice the {size} bytes of the batch ring free")
        self.images = torch.empty((num_workers, slots, batch_size, *image_shape)).share_memory_()
        self.generations = torch.zeros((num_workers, slots), dtype=torch.int64).share_memory_()
        self.slots = slots
        self._written = 0  # batches this process (a worker) has written

    def put(self, tensors: list[torch.Tensor]) -> Optional[tuple[int, int, int]]:
        """In a worker: stack into the next slot; (worker, slot, generation), or None if it does not fit."""
        worker = get_worker_info()
        if worker is None or worker.id >= self.images.shape[0] or len(tensors) != self.images.shape[2] \
                or tuple(tensors[0].shape) != tuple(self.images.shape[3:]):
            return None
        slot = self._written % self.slots
        self._written += 1
        generation = self._written
        self.generations[worker.id, slot] = -1  # being written: a reader copying it now must notice
        torch.stack(tensors, out=self.images[worker.id, slot])
        self.generations[worker.id, slot] = generation
        return worker.id, slot, generation

    def take(self, where: tuple[int, int, int]) -> torch.Tensor:
        """In the main process: a private copy of the batch in slot `where`."""
        worker, slot, generation = where
        images = self.images[worker, slot].clone()
        if int(self.generations[worker, slot]) != generation:
            raise RuntimeError(f"data loader worker {worker} rewrote batch slot {slot} before it was read: "
                               "more batches in flight than the ring has slots")
        return images


class _RingLoader(DataLoader):
    """A DataLoader whose workers hand their images over through a SharedBatchRing."""

    def __init__(self, *args: Any, ring: SharedBatchRing, **kwargs: Any) -> None:
        super().__init__(*args, collate_fn=functools.partial(collate, ring=ring), **kwargs)
        self.ring = ring

    def __iter__(self) -> Iterator[Batch]:
        for batch in super().__iter__():
            if batch.ring_slot is not None:
                batch = Batch(self.ring.take(batch.ring_slot), batch.targets, batch.indices, batch.bad)
            yield batch


def _seed_worker(worker_id: int) -> None:
    # numpy and `random` in workers are not seeded by torch; derive them from torch's worker seed.
    base = torch.initial_seed() % (2**32)
    np.random.seed(base)
    random.seed(base)
    # Stop signals are the main process's to act on (it saves at a step boundary, then shuts the
    # workers down): Ctrl-C and SLURM's SIGTERM reach every process of the group, and a worker that
    # died of them would fail the main process's next batch before it could save.
    import signal

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    """At exit, SIGKILL loader workers still alive (a loader left mid-epoch by an exception).

    multiprocessing's own exit handler SIGTERMs daemonic children and then joins them, but our
    workers ignore SIGTERM (see `_seed_worker`), so that join would wait forever. This handler is
    registered after multiprocessing's and therefore runs before it.
    """
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


atexit.register(_kill_leftover_workers)


def _probe_fd_sharing() -> None:
    """In a forked child: share a tensor's memory by file descriptor the way a loader worker hands
    a batch over (torch.multiprocessing's reduce_storage), exiting 0 when that works."""
    try:
        shared = torch.empty(16).share_memory_()  # as a worker's collate allocates a batch
        fd, _ = shared.untyped_storage()._share_fd_cpu_()
        os.close(os.dup(fd))
    except Exception:  # noqa: BLE001 - any failure means workers could not hand tensors over
        os._exit(1)
    os._exit(0)


@functools.lru_cache(maxsize=None)
def ensure_workers_can_share_tensors() -> str:
    """Make loader workers able to hand tensors to this process; return the sharing strategy.

    torch passes a worker's tensors as file descriptors of shared memory. Some sandboxes refuse
    that (on a gVisor machine, duplicating the descriptor failed with 'Bad file descriptor' in the
    worker's queue thread, and the main process waited for that batch forever); a process out of
    descriptors fails the same way. A forked child tries it once per process; where it fails,
    workers share through named files instead (torch's 'file_system' strategy), said in one line.
    """
    import torch.multiprocessing as torch_mp

    strategy = torch_mp.get_sharing_strategy()
    if strategy != "file_descriptor" or "fork" not in multiprocessing.get_all_start_methods() \
            or not hasattr(torch.UntypedStorage, "_share_fd_cpu_"):
        return strategy
    child = multiprocessing.get_context("fork").Process(target=_probe_fd_sharing, daemon=True)
    try:
        child.start()
    except OSError:  # no process to probe with: the loader's own workers will say why
        return strategy
    child.join(60)
    if child.exitcode is None:
        child.kill()
        child.join()
    if child.exitcode != 0 and "file_system" in torch_mp.get_all_sharing_strategies():
        torch_mp.set_sharing_strategy("file_system")
        logger.warning("this system does not let processes pass shared-memory file descriptors (a sandbox such as "
                       "gVisor, or no descriptors left): loader workers hand batches over through named "
                       "shared-memory files instead (torch's 'file_system' sharing strategy)")
        return "file_system"
    return strategy


def build_loader(source: ImageSource | StreamSource, transform: Transform, image_size: tuple[int, int], *,
                 batch_size: int, training: bool, channels: int = 3, num_workers: int = 0, seed: int = 0,
                 on_bad_image: str = "skip", rank: int = 0, world_size: int = 1, drop_last: Optional[bool] = None,
                 labels_offset: int = 0, pin_memory: bool = False, draft: Optional[bool] = None,
                 epoch_size: Optional[int] = None) -> DataLoader:
    """A DataLoader of `Batch`es over any source; training shuffles, evaluation keeps order.

    `draft` (default: `training`) allows reduced-size JPEG decoding: by the crop each image's
    draws need for slimtune's vgg / inception training preprocessing, else down to the output
    size. `pin_memory=True` (for CUDA training) hands out batches in page-locked memory.
    `epoch_size` keeps each epoch to the first that many samples of its order (sources with random
    access; a run resumed at another world size keeps its epochs this way).
    """
    draft = training if draft is None else draft
    if num_workers:
        ensure_workers_can_share_tensors()
    maker = _SampleMaker(transform, image_size, channels, source.multi_label, on_bad_image, draft, seed,
                         labels_offset)
    drop_last = training if drop_last is None else drop_last
    # The loader draws its workers' base seed each time an epoch starts; from the global RNG that
    # would shift dropout's random stream whenever a resumed run starts an epoch mid-way.
    common = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory,
                  worker_init_fn=_seed_worker if num_workers else None,
                  generator=torch.Generator().manual_seed(seed))
    if num_workers:
        common["prefetch_factor"] = 4
    if isinstance(source, StreamSource):
        dataset = StreamDataset(source, maker, shuffle=training, buffer_size=max(10 * batch_size, 256),
                                rank=rank, world_size=world_size)
        # Workers are re-created each epoch so that their dataset copy sees the new epoch.
        return DataLoader(dataset, drop_last=drop_last or (training and world_size > 1), persistent_workers=False,
                          **common)
    dataset = ImageDataset(source, maker)
    # Training under DDP: every rank gets the same number of samples (a rank with one batch fewer
    # would leave the others waiting in an all-reduce); a partial last batch is the caller's choice.
    sampler = EpochSampler(len(dataset), shuffle=training, seed=seed, rank=rank, world_size=world_size,
                           drop_last=(drop_last or training) and world_size > 1, epoch_size=epoch_size)
    if num_workers and not pin_memory:
        # Pinned batches are copied out of shared memory by the pin thread anyway.
        try:
            ring = SharedBatchRing(num_workers, common["prefetch_factor"] + 2, (channels, *image_size), batch_size)
        except RuntimeError:  # shared memory too small (e.g. a container's 64 MB /dev/shm): plain loader
            pass
        else:
            del common["collate_fn"]
            return _RingLoader(dataset, sampler=sampler, drop_last=drop_last, persistent_workers=True,
                               ring=ring, **common)
    return DataLoader(dataset, sampler=sampler, drop_last=drop_last, persistent_workers=num_workers > 0, **common)


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Point a loader at an epoch (and a batch offset in it, for resuming)."""
    loader.dataset.set_epoch(epoch)
    if isinstance(loader.sampler, EpochSampler):
        loader.sampler.set_epoch(epoch, start_batch * loader.batch_size)
