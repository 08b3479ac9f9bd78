"""Peak memory of one NASNet/PNASNet training step, with and without gradient checkpointing.

    .venv/bin/python benchmarks/bench_nasnet_memory.py [--nets nasnet_large,pnasnet_large]
        [--image_size 331] [--batch_size 8] [--out benchmarks/results/nasnet_memory.md]

Each (net, mode) runs in its own subprocess (peak RSS is per process): build the net with 1001
classes (aux head included), one SGD step on a random batch in train mode (BN batch statistics,
drop path, aux loss with weight 0.4), then report the process's peak RSS (ru_maxrss), the RSS
after building (weights + optimizer-free baseline) and the step's wall time. The difference is
what the step's activations and gradients cost; gradient checkpointing keeps only each cell's
inputs and recomputes the cell in backward.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _child(name: str, checkpointing: bool, image_size: int, batch_size: int, threads: int) -> dict:
    import torch

    from slimtune.nets import create_model
    from slimtune.train.losses import softmax_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(name, num_classes=1001, image_size=image_size, gradient_checkpointing=checkpointing)
    model.train()
    model.set_training_step(model.config.total_training_steps // 2)
    images = torch.randn(batch_size, 3, image_size, image_size)
    labels = torch.randint(0, 1001, (batch_size,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    built = _rss_mib()
    started = time.time()
    logits, end_points = model(images, with_end_points=True)
    loss = softmax_loss(logits, labels, aux_logits=end_points["AuxLogits"])
    loss.backward()
    optimizer.step()
    seconds = time.time() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"net": name, "checkpointing": checkpointing, "image_size": image_size, "batch_size": batch_size,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "built_mib": built,
            "peak_mib": peak, "step_s": seconds, "loss": float(loss)}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default="nasnet_large,pnasnet_large")
    parser.add_argument("--image_size", type=int, default=331)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="plain,checkpointing")
    parser.add_argument("--out", default=str(_REPO / "benchmarks" / "results" / "nasnet_memory.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, mode = args.child.split(":")
        print(json.dumps(_child(name, mode == "checkpointing", args.image_size, args.batch_size, args.threads)))
        return 0
    rows = []
    for name in args.nets.split(","):
        for mode in args.modes.split(","):
            command = [sys.executable, __file__, "--child", f"{name}:{mode}", "--image_size", str(args.image_size),
                       "--batch_size", str(args.batch_size), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ,
                                  "PYTHONPATH": str(_REPO / "src")})
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(row, flush=True)
    lines = [f"# NASNet / PNASNet training-step memory (batch {args.batch_size}, {args.image_size}x{args.image_size}, "
             f"{args.threads} threads, load average {os.getloadavg()[0]:.1f})", "",
             "| net | gradient checkpointing | params (M) | RSS after build (MiB) | peak RSS (MiB) | "
             "step peak - build (MiB) | step time (s) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['net']} | {'yes' if row['checkpointing'] else 'no'} | {row['params_m']:.1f} | "
                     f"{row['built_mib']:.0f} | {row['peak_mib']:.0f} | {row['peak_mib'] - row['built_mib']:.0f} | "
                     f"{row['step_s']:.0f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
