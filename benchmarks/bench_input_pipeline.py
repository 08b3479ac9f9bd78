"""Training input pipeline speed: JPEG folder -> 224x224 batches, slimtune vs torchvision, one run.

    .venv/bin/python benchmarks/bench_input_pipeline.py [--images 512] [--workers 0 2] [--rounds 3]
                                                        [--image-size 500x375]

Builds a folder of 500x375 JPEGs (quality 90) cut from scikit-image's real photos in a temporary
directory (--image-size 2000x1500 shows what reduced-size DCT decoding does for large photos),
then measures images/s of whole training epochs for
  slimtune vgg / inception: ImageFolderSource + build_loader(training=True) with slim's train
    preprocessing (what `slimtune train` runs);
  torchvision: ImageFolder + RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize
    (PIL decoding, the usual recipe), the same with ColorJitter of all four (brightness, saturation,
    hue, contrast: the inception pipeline's counterpart the issue names; slimtune inception's ratio
    is against it), and with brightness + saturation only (what slim's default fast-mode distortion
    does: the strictest comparison, printed as a second ratio);
each with the same number of DataLoader workers (persistent), batch size 32, one thread per process.
After a warm-up epoch, candidates take turns epoch by epoch (so load from other processes hits
them alike) and each keeps its best epoch. Two numbers per cell: images/s (wall clock, what the
target is about) and CPU milliseconds per image summed over the main process and its workers
(Linux /proc), which moves far less than wall time when other processes compete for the cores.
Prints the table, the ratios to torchvision and the load average.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_jpeg_folder(root: Path, count: int, size: tuple[int, int] = (500, 375), classes: int = 4) -> None:
    """`count` quality-90 JPEGs of `size` (w, h): random 4:3 crops of real photos, spread over class folders."""
    import skimage.data
    from PIL import Image

    photos = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket(),
              skimage.data.stereo_motorcycle()[0], skimage.data.immunohistochemistry(),
              skimage.data.hubble_deep_field(), skimage.data.retina()[..., :3]]
    rng = np.random.default_rng(0)
    for index in range(count):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        # a 4:3 crop covering 60-100% of the largest 4:3 window, resized to `size`
        side = int(min(height, width * 0.75) * rng.uniform(0.6, 1.0))
        crop_h, crop_w = side, int(side / 0.75)
        top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
        image = Image.fromarray(np.ascontiguousarray(photo[top:top + crop_h, left:left + crop_w]))
        image = image.resize(size, Image.Resampling.BICUBIC)
        folder = root / f"class_{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:05d}.jpg", quality=90)


def slimtune_loader(root: Path, preprocessing: str, workers: int, batch_size: int):
    """slimtune's training loader over the folder."""
    from slimtune.data.folder import ImageFolderSource
    from slimtune.data.loader import build_loader
    from slimtune.preprocessing import get_preprocessing

    return build_loader(ImageFolderSource(root), get_preprocessing(preprocessing, is_training=True), (224, 224),
                        batch_size=batch_size, training=True, num_workers=workers, seed=0)


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)


def torchvision_loader(root: Path, workers: int, batch_size: int, jitter: str = ""):
    """torchvision's ImageFolder recipe with the same batch size and workers; `jitter` adds
    ColorJitter with the ranges of slim's inception distort_color: 'all' = brightness 32/255,
    contrast 0.5, saturation 0.5, hue 0.2 (the issue's reference), 'fast' = brightness and
    saturation only (exactly the ops of slim's default fast_mode distortion)."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    ranges = {"all": {"brightness": 32 / 255, "contrast": 0.5, "saturation": 0.5, "hue": 0.2},
              "fast": {"brightness": 32 / 255, "saturation": 0.5}}
    color = [T.ColorJitter(**ranges[jitter])] if jitter else []
    transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *color, T.ToTensor(),
                           T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return torch.utils.data.DataLoader(ImageFolder(str(root), transform), batch_size=batch_size, shuffle=True,
                                       drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                                       worker_init_fn=_one_thread if workers else None,
                                       prefetch_factor=4 if workers else None)


def _cpu_seconds() -> float:
    """CPU time of this process and of its live children (the loader workers), in seconds.

    Reads /proc (Linux); elsewhere only this process counts, which is all there is at 0 workers.
    """
    total = time.process_time()
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:    # ppid; then utime, stime at fields 11 and 12
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run_epoch(loader, epoch: int) -> tuple[int, float, float]:
    """Images delivered, wall seconds and CPU seconds (all processes) for one full epoch."""
    from slimtune.data.loader import set_loader_epoch

    if hasattr(loader.dataset, "set_epoch"):
        set_loader_epoch(loader, epoch)
    start, cpu_start, images = time.perf_counter(), _cpu_seconds(), 0
    for batch in loader:
        images += len(batch) if not isinstance(batch, (list, tuple)) else len(batch[0])
    return images, time.perf_counter() - start, _cpu_seconds() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per candidate")
    parser.add_argument("--image-size", default="500x375", help="JPEG size, WIDTHxHEIGHT")
    parser.add_argument("--only", nargs="*", default=None, help="candidate names to run (default: all)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc as it is (default: reuse freed memory, as `slimtune train` "
                             "does; every candidate and worker gets the same setting)")
    args = parser.parse_args()
    size = tuple(int(side) for side in args.image_size.lower().split("x"))
    torch.set_num_threads(1)
    from slimtune.malloc import reuse_freed_memory

    allocator = "glibc as is" if args.system_malloc or not reuse_freed_memory() else "freed memory reused"

    with tempfile.TemporaryDirectory(prefix="slimtune_bench_") as tmp:
        root = Path(tmp) / "images"
        make_jpeg_folder(root, args.images, size)
        print(f"{args.images} JPEGs of {size[0]}x{size[1]} in {root}; batch {args.batch_size}; "
              f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; malloc: {allocator}")
        builders = {"slimtune vgg": lambda w: slimtune_loader(root, "vgg", w, args.batch_size),
                    "slimtune inception": lambda w: slimtune_loader(root, "inception", w, args.batch_size),
                    "torchvision RRC": lambda w: torchvision_loader(root, w, args.batch_size),
                    "torchvision RRC+jitter": lambda w: torchvision_loader(root, w, args.batch_size, jitter="all"),
                    "torchvision RRC+jitter(b,s)": lambda w: torchvision_loader(root, w, args.batch_size,
                                                                               jitter="fast")}
        names = [name for name in builders if args.only is None or name in args.only]
        speeds: dict[tuple[str, int], float] = {}
        costs: dict[tuple[str, int], float] = {}
        for workers in args.workers:
            loaders = {name: builders[name](workers) for name in names}
            for name, loader in loaders.items():
                run_epoch(loader, 0)  # warm-up: starts workers, fills the page cache
            for round_ in range(args.rounds):
                for name, loader in loaders.items():
                    images, seconds, cpu = run_epoch(loader, round_ + 1)
                    key = (name, workers)
                    speeds[key] = max(speeds.get(key, 0.0), images / seconds)
                    costs[key] = min(costs.get(key, float("inf")), cpu / images * 1e3)
            del loaders

        reference = "torchvision RRC"
        print(f"\nBest epoch of {args.rounds} per cell: images/s (wall clock) and CPU ms per image "
              "(all processes); ratios against torchvision at the same number of workers "
              "(slimtune inception: against torchvision RRC+jitter)")
        header = "".join(f"{f'{w} workers: img/s':>24s}{'CPU ms/img':>18s}" for w in args.workers)
        print(f"{'pipeline':28s}{header}")
        for name in names:
            cells = []
            for workers in args.workers:
                # The inception pipeline distorts colours: compare it with torchvision doing the same.
                own_reference = "torchvision RRC+jitter" if name == "slimtune inception" else reference
                own_reference = own_reference if own_reference in names else reference
                key, ref = (name, workers), (own_reference, workers)
                show = own_reference in names and not name.startswith("torchvision")
                speed = f"{speeds[key]:.1f}" + (f" ({speeds[key] / speeds[ref]:.2f}x)" if show else "")
                cost = f"{costs[key]:.2f}" + (f" ({costs[ref] / costs[key]:.2f}x)" if show else "")
                cells.append(f"{speed:>24s}{cost:>18s}")
            print(f"{name:28s}" + "".join(cells))
        strict = "torchvision RRC+jitter(b,s)"
        if "slimtune inception" in names and strict in names:
            ratios = ", ".join(f"{speeds[('slimtune inception', w)] / speeds[(strict, w)]:.2f}x at {w} workers"
                               for w in args.workers)
            print(f"slimtune inception vs {strict} (the same ops as slim's fast mode): {ratios}")
        print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
