"""Training images/s on GPU: resnet_v1_50 and mobilenet_v1, synthetic input and the real JPEG pipeline.

    .venv/bin/python benchmarks/bench_train_gpu.py [--nets resnet_v1_50,mobilenet_v1] [--batch_size 256]
        [--pipelines synthetic,jpeg-cpu,jpeg-gpu] [--precision bf16] [--steps 50] [--warmup 15]
    # every GPU of the machine (one process per GPU, DDP over NCCL):
    torchrun --nproc_per_node gpu benchmarks/bench_train_gpu.py ...

Issue 17 item 7. Targets on one H100/H200: >= 3,000 img/s for resnet_v1_50 with synthetic input, and
the real pipeline within 80% of it. A training step is what `slimtune train` runs: slimtune's net
(channels_last), bf16 autocast, softmax cross-entropy, backward, momentum SGD with weight decay on
the kernels (slimtune's optimizer and parameter groups). Pipelines:

  synthetic  a batch already on the GPU (the model's ceiling)
  jpeg-cpu   slimtune's training loader (ImageFolderSource + slim's inception preprocessing in
             DataLoader workers, one per CPU core, pinned memory, non-blocking copies)
  jpeg-gpu   the loader's workers only read the JPEG bytes; decoding runs on the GPU
             (torchvision.io.decode_jpeg(device='cuda'), batched), then a random resized crop, flip
             and scaling to [-1, 1] on the GPU: the remedy where the CPU is the bottleneck (simpler
             augmentation than slim's distort_color: a throughput figure, not a recipe)

The JPEG folder is made from scikit-image's photos (500x375, quality 90; --images of them). Reported
figure: images/s over the timed steps (after --warmup), summed over processes. Without CUDA the
script runs on the CPU at whatever size is asked (that is how it is smoke-tested here; the figures
then say nothing about a GPU). Results go to --out as markdown.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_input_pipeline import make_jpeg_folder  # noqa: E402  (same photo folder as the CPU benchmark)

WEIGHT_DECAY, LEARNING_RATE, MOMENTUM = 4e-5, 0.01, 0.9


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); starts NCCL/gloo under torchrun."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def _gpu_batches(root: Path, batch_size: int, image_size: int, device: torch.device, workers: int,
                 rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """JPEG bytes from CPU workers, decoded and augmented on the GPU; endless."""
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms import v2

    files = sorted(root.rglob("*.jpg"))[rank::world]
    classes = sorted({path.parent.name for path in files})

    class Bytes(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return read_file(str(files[index])), classes.index(files[index].parent.name)

    if workers:
        from slimtune.data.loader import ensure_workers_can_share_tensors

        ensure_workers_can_share_tensors()  # as slimtune's own loader does (gVisor refuses descriptors)
    loader = torch.utils.data.DataLoader(Bytes(), batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, collate_fn=lambda items: list(zip(*items)),
                                         persistent_workers=workers > 0)
    crop = v2.RandomResizedCrop(image_size, antialias=True)
    while True:
        for data, labels in loader:
            decoded = decode_jpeg(list(data), device=device) if device.type == "cuda" else \
                [decode_jpeg(item) for item in data]
            images = torch.stack([crop(image) for image in decoded]).float()
            flip = torch.rand(len(images), device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            images = (images / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)
            yield images, torch.tensor(labels, device=device)


def _cpu_batches(root: Path, batch_size: int, image_size: int, device: torch.device, workers: int,
                 rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """slimtune's own training loader (inception preprocessing in the workers); endless."""
    from slimtune.data.folder import ImageFolderSource
    from slimtune.data.loader import build_loader, set_loader_epoch
    from slimtune.preprocessing import get_preprocessing

    loader = build_loader(ImageFolderSource(root), get_preprocessing("inception", is_training=True),
                          (image_size, image_size), batch_size=batch_size, training=True, num_workers=workers,
                          rank=rank, world_size=world, pin_memory=device.type == "cuda", drop_last=True)
    epoch = 0
    while True:
        set_loader_epoch(loader, epoch)
        for batch in loader:
            images = batch.images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield images, batch.targets.to(device, non_blocking=True)
        epoch += 1


def measure(net: str, pipeline: str, args: argparse.Namespace, root: Path, device: torch.device,
            rank: int, world: int) -> dict[str, Any]:
    """Images/s of training steps of `net` fed by `pipeline` (summed over processes)."""
    from slimtune import create_model
    from slimtune.train.freeze import decay_groups
    from slimtune.train.losses import softmax_loss
    from slimtune.train.optimizers import build_optimizer

    torch.manual_seed(rank)
    model = create_model(net, num_classes=1000).to(device).to(memory_format=torch.channels_last).train()
    module: torch.nn.Module = model
    if world > 1:
        module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = build_optimizer("momentum", decay_groups(model, WEIGHT_DECAY), LEARNING_RATE, momentum=MOMENTUM)
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) // world)
    if pipeline == "synthetic":
        fixed = (torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
                 .contiguous(memory_format=torch.channels_last),
                 torch.randint(0, 1000, (args.batch_size,), device=device))
        batches: Iterator = iter(lambda: fixed, None)
    else:
        make: Callable = _cpu_batches if pipeline == "jpeg-cpu" else _gpu_batches
        batches = make(root, args.batch_size, args.image_size, device, workers, rank, world)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]

    def step() -> None:
        images, labels = next(batches)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = module(images)
        loss = softmax_loss(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for _ in range(args.warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    return {"net": net, "pipeline": pipeline, "images_per_sec": args.batch_size * args.steps * world / seconds,
            "seconds": seconds, "workers": workers if pipeline != "synthetic" else 0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", default="resnet_v1_50,mobilenet_v1")
    parser.add_argument("--pipelines", default="synthetic,jpeg-cpu,jpeg-gpu")
    parser.add_argument("--batch_size", type=int, default=256, help="per process")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--images", type=int, default=4096, help="JPEGs in the generated folder")
    parser.add_argument("--workers", type=int, default=None, help="loader workers per process (default: cores / processes)")
    parser.add_argument("--sharing_strategy", choices=("file_descriptor", "file_system"), default=None,
                        help="how loader workers hand tensors over (torch.multiprocessing); by default "
                             "file_descriptor unless a probe finds this system refuses them (as gVisor did)")
    parser.add_argument("--out", default=str(HERE / "results" / "train_gpu.md"))
    args = parser.parse_args(argv)
    if args.sharing_strategy:
        torch.multiprocessing.set_sharing_strategy(args.sharing_strategy)

    rank, world, local_rank = _distributed()
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory(prefix="slimtune_gpu_bench_") as tmp:
        root = Path(tmp) / "images"
        if rank == 0 and any(p != "synthetic" for p in args.pipelines.split(",")):
            make_jpeg_folder(root, args.images)
        if world > 1:
            torch.distributed.broadcast_object_list([str(root)], src=0)
            torch.distributed.barrier()
        rows = []
        for net in args.nets.split(","):
            for pipeline in args.pipelines.split(","):
                rows.append(measure(net, pipeline, args, root, device, rank, world))
                if rank == 0:  # as it comes: a later pipeline that fails leaves the earlier figures
                    print(f"{net} {pipeline}: {rows[-1]['images_per_sec']:.0f} images/s", flush=True)
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no CUDA: not a GPU figure)"
        lines = [f"# bench_train_gpu.py — {time.strftime('%Y-%m-%d %H:%M')}, {world} x {name}", "",
                 f"torch {torch.__version__}; batch {args.batch_size} per process; {args.precision} autocast; "
                 f"channels_last; {args.warmup} warm-up + {args.steps} timed steps", "",
                 "| net | pipeline | images/s | vs synthetic | loader workers/process |", "|---|---|---:|---:|---:|"]
        synthetic = {row["net"]: row["images_per_sec"] for row in rows if row["pipeline"] == "synthetic"}
        for row in rows:
            share = (f"{row['images_per_sec'] / synthetic[row['net']]:.0%}" if row["net"] in synthetic else "-")
            lines.append(f"| {row['net']} | {row['pipeline']} | {row['images_per_sec']:.0f} | {share} | "
                         f"{row['workers']} |")
        text = "\n".join(lines) + "\n"
        print(text)
        Path(args.out).write_text(text, encoding="utf-8")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
