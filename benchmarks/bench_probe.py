"""Linear probes: `run_probe` over 4 end points x 3 learning rates vs 12 separate head-only trainings.

    .venv/bin/python benchmarks/bench_probe.py [--model mobilenet_v1_025] [--images 256] [--epochs 5]

Both sides train the same 12 linear heads (4 end points x 3 rates) for the same epochs on the same
JPEG folder (500x375 crops of scikit-image's photos), eval preprocessing, batch 32, one process.
The baseline is what a user does without the probe: one head-only training per (end point, rate),
each running the frozen backbone on every batch of every epoch (as `train --trainable_scopes` on
the head would). The probe runs the backbone once per image and trains every head on cached
features. Prints wall and CPU seconds of both and the ratio (target: >= 8x less wall time).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_input_pipeline import make_jpeg_folder  # noqa: E402

from slimtune.data import build_source  # noqa: E402
from slimtune.data.loader import build_loader  # noqa: E402
from slimtune.nets.base import pooled_features  # noqa: E402
from slimtune.nets.registry import get_model_spec  # noqa: E402
from slimtune.preprocessing import get_preprocessing  # noqa: E402
from slimtune.probe import resolve_endpoints, run_probe  # noqa: E402

RATES = [1e-3, 1e-2, 1e-1]


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def separate_trainings(model_name: str, data: Path, endpoints: list[str], epochs: int, size: int) -> None:
    """12 head-only trainings, each with its own frozen forward pass per batch and epoch."""
    spec = get_model_spec(model_name)
    backbone = spec.build(0).eval()
    source = build_source(dataset_dir=str(data), split="train")
    loader = build_loader(source, get_preprocessing(spec.preprocessing, is_training=False), (size, size),
                          batch_size=32, training=False, channels=spec.in_channels)
    for endpoint in endpoints:
        for rate in RATES:
            head = None
            optimizer = None
            for _ in range(epochs):
                for batch in loader:
                    with torch.no_grad():
                        features = pooled_features(backbone.forward_endpoints(batch.images)[1][endpoint]).flatten(1)
                    if head is None:
                        head = nn.Linear(features.shape[1], source.num_classes)
                        optimizer = torch.optim.SGD(head.parameters(), lr=rate, momentum=0.9)
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(head(features), batch.targets).backward()
                    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v1_025")
    parser.add_argument("--endpoints", default="Conv2d_3_pointwise,Conv2d_7_pointwise,Conv2d_11_pointwise,"
                                               "Conv2d_13_pointwise")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image_size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    endpoints = args.endpoints.split(",")
    spec = get_model_spec(args.model)
    with torch.no_grad():
        available = list(spec.build(0).forward_endpoints(torch.zeros(1, 3, args.image_size, args.image_size))[1])
    full_names = resolve_endpoints(available, endpoints, spec.scope)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "photos"
        for split in ("train", "validation"):
            make_jpeg_folder(data / split, args.images if split == "train" else args.images // 4)
        timings = {}
        for name, job in (("probe (1 pass, 12 heads)", lambda: run_probe(
                model_name=args.model, endpoints=endpoints, learning_rates=RATES, output_dir=str(Path(tmp) / "out"),
                dataset_dir=str(data), eval_split="validation", num_epochs=args.epochs, batch_size=32,
                image_size=args.image_size)),
                ("12 separate head-only trainings",
                 lambda: separate_trainings(args.model, data, full_names, args.epochs, args.image_size))):
            wall, cpu = time.perf_counter(), _cpu_seconds()
            job()
            timings[name] = (time.perf_counter() - wall, _cpu_seconds() - cpu)
    print(f"\n{args.model} at {args.image_size}, {args.images} training images, {len(endpoints)} end points x "
          f"{len(RATES)} rates, {args.epochs} epochs, load average {os.getloadavg()[0]:.2f}")
    for name, (wall, cpu) in timings.items():
        print(f"{name:<34} wall {wall:8.1f} s   cpu {cpu:8.1f} s")
    (probe_wall, probe_cpu), (base_wall, base_cpu) = timings.values()
    print(f"probe is {base_wall / probe_wall:.1f}x less wall time, {base_cpu / probe_cpu:.1f}x less CPU time "
          "(target >= 8x)")


if __name__ == "__main__":
    main()
