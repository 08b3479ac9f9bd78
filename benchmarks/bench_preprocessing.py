"""Training-time preprocessing speed: slimtune's slim pipelines vs torchvision's RandomResizedCrop.

    .venv/bin/python benchmarks/bench_preprocessing.py [--rounds 20] [--chunk 20]

One CPU thread (torch.set_num_threads(1)), a real 500x375 photo (scikit-image's coffee, cropped),
already decoded to uint8. Every candidate runs in interleaved chunks and the best chunk counts, with
per-thread CPU time, so other processes on a shared machine disturb the ratios as little as possible.

Candidates
  slimtune vgg / inception (train): get_preprocessing(name, is_training=True)(image, 224, 224)
  torchvision v2: RandomResizedCrop(224, antialias) + RandomHorizontalFlip + ToDtype + Normalize
    on the same uint8 tensor (the usual tensor pipeline), with and without ColorJitter(brightness
    32/255, saturation 0.5) - the latter does what inception's fast-mode distortion does
  torchvision v1 on PIL: RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize
Inputs are given both as a contiguous CHW tensor and as the CHW view of an HWC array (what
torch.from_numpy(decoded).permute(2, 0, 1) gives a DataLoader).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def best_seconds_per_call(candidates: dict, rounds: int, chunk: int) -> dict[str, float]:
    """Interleave candidates chunk by chunk; keep each one's best per-call thread CPU time."""
    best = {name: float("inf") for name in candidates}
    for fn in candidates.values():
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.thread_time()
            for _ in range(chunk):
                fn()
            best[name] = min(best[name], (time.thread_time() - start) / chunk)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=20)
    args = parser.parse_args()

    import skimage.data
    import torchvision.transforms as T1
    import torchvision.transforms.v2 as T2
    from PIL import Image

    from slimtune.preprocessing import get_preprocessing

    torch.set_num_threads(1)
    torch.manual_seed(0)
    array = np.ascontiguousarray(skimage.data.coffee()[:375, :500])      # H=375, W=500
    view = torch.from_numpy(array).permute(2, 0, 1)
    contiguous = view.contiguous()
    pil = Image.fromarray(array)

    imagenet = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    tv = T2.Compose([T2.RandomResizedCrop(224, antialias=True), T2.RandomHorizontalFlip(),
                     T2.ToDtype(torch.float32, scale=True), T2.Normalize(**imagenet)])
    tv_color = T2.Compose([T2.RandomResizedCrop(224, antialias=True), T2.RandomHorizontalFlip(),
                           T2.ColorJitter(brightness=32 / 255, saturation=0.5),
                           T2.ToDtype(torch.float32, scale=True), T2.Normalize([0.5] * 3, [0.5] * 3)])
    tv_pil = T1.Compose([T1.RandomResizedCrop(224), T1.RandomHorizontalFlip(), T1.ToTensor(),
                         T1.Normalize(**imagenet)])
    vgg = get_preprocessing("vgg", is_training=True)
    inception = get_preprocessing("inception", is_training=True)

    candidates = {
        "slimtune vgg (contiguous)": lambda: vgg(contiguous, 224, 224),
        "slimtune vgg (HWC view)": lambda: vgg(view, 224, 224),
        "slimtune inception (contiguous)": lambda: inception(contiguous, 224, 224),
        "slimtune inception (HWC view)": lambda: inception(view, 224, 224),
        "torchvision v2 RRC (contiguous)": lambda: tv(contiguous),
        "torchvision v2 RRC (HWC view)": lambda: tv(view),
        "torchvision v2 RRC+ColorJitter (contiguous)": lambda: tv_color(contiguous),
        "torchvision v1 RRC on PIL": lambda: tv_pil(pil),
    }
    best = best_seconds_per_call(candidates, args.rounds, args.chunk)
    baseline = best["torchvision v2 RRC (contiguous)"]
    print(f"torch {torch.__version__}, 1 thread, 500x375 photo -> 224x224, best of {args.rounds} chunks "
          f"of {args.chunk} calls (thread CPU time)")
    for name, seconds in best.items():
        print(f"  {name:44s} {seconds * 1e6:8.0f} us  {1 / seconds:7.0f} images/s  "
              f"x{baseline / seconds:4.2f} vs torchvision v2")


if __name__ == "__main__":
    main()
