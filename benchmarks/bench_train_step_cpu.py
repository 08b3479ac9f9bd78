"""What --precision bf16 and --compile do to a training step on this CPU (issue 16, item 3).

    .venv/bin/python benchmarks/bench_train_step_cpu.py [--nets lenet,resnet_v1_50] [--threads N]
        [--compile_nets lenet] [--out benchmarks/results/precision_cpu.md]

For each net, one subprocess builds the net (channels-last, as `slimtune train` does) and times,
round-robin (see `worker`), the step `slimtune train` runs in each setting: forward_endpoints under torch.autocast(dtype) when bf16,
softmax cross-entropy on float32 logits, backward, momentum SGD with weight decay on the kernels
(slimtune's build_optimizer / decay_groups). Inputs are constant tensors in memory (no input
pipeline). With --compile the forward is torch.compile'd exactly as the trainer does
(`torch.compile(_EndpointsForward(model))`); its first step, which compiles, is reported apart.
Each worker reports the median of the timed steps and the loss of its first step on the same
seeded weights and images (dropout off), so the table also shows how far bf16 and compilation
move the loss from fp32 eager.
The processor's bfloat16 support (oneDNN's check: avx512_bf16 or AMX) and the load average are
recorded: on a 2-core machine anything else running moves the figures, so compare ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

# The CPU benchmarks of this directory name the machine the same way.
from bench_nets_cpu import cpu_model

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"lenet": {"batch": 32, "image_size": 28}, "resnet_v1_50": {"batch": 8, "image_size": 224}}


def worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time every (precision, compile) setting of one net in this process, round-robin.

    The machine this was written on is shared: its load moves by 2-10x within minutes. Settings
    timed one after another in separate processes would compare different loads; here each round
    times a few steps of every setting in turn, so a load change hits all settings alike, and
    the median over rounds is reported.
    """
    import torch

    from slimtune.malloc import reuse_freed_memory
    from slimtune.nets.registry import create_model, get_model_spec
    from slimtune.train.freeze import decay_groups
    from slimtune.train.loop import _EndpointsForward
    from slimtune.train.losses import softmax_loss
    from slimtune.train.mechanics import autocast_dtype, cpu_has_bf16
    from slimtune.train.optimizers import build_optimizer

    reuse_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = get_model_spec(args.net)
    classes = spec.checkpoint_num_classes
    model = create_model(args.net, num_classes=classes).to(memory_format=torch.channels_last)
    for module in model.modules():
        # A compiled dropout draws its masks from another generator than eager's; without dropout
        # the step-1 losses of all settings are comparable (resnet_v1_50 has none anyway).
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(args.batch, spec.in_channels, args.image_size, args.image_size,
                         generator=torch.Generator().manual_seed(1)).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (args.batch,), generator=torch.Generator().manual_seed(2))
    model.train()
    eager = _EndpointsForward(model)
    compiled = torch.compile(_EndpointsForward(model)) if args.compile else None
    optimizer = build_optimizer("momentum", decay_groups(model, 4e-5), 0.01, momentum=0.9)
    settings = [(precision, False) for precision in ("fp32", "bf16")]
    if compiled is not None:
        settings += [(precision, True) for precision in ("fp32", "bf16")]

    def step(precision: str, use_compiled: bool) -> float:
        dtype = autocast_dtype(precision, False, torch.device("cpu"))
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits, _ = (compiled if use_compiled else eager)(images)
            loss = softmax_loss(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    records = {}
    for precision, use_compiled in settings:
        # First step of each setting from the same weights: its loss compares the numerics, its
        # time includes compilation for the compiled ones.
        model.load_state_dict(initial)
        begin = time.perf_counter()
        first_loss = step(precision, use_compiled)
        records[(precision, use_compiled)] = {"first_step_s": time.perf_counter() - begin, "first_loss": first_loss,
                                              "times": []}
        for _ in range(args.warmup):
            step(precision, use_compiled)
    for _ in range(args.rounds):
        for key in settings:
            for _ in range(args.steps_per_round):
                begin = time.perf_counter()
                step(*key)
                records[key]["times"].append(time.perf_counter() - begin)
    rows = []
    for (precision, use_compiled), record in records.items():
        median = statistics.median(record["times"])
        rows.append({"net": args.net, "precision": precision, "compile": use_compiled, "batch": args.batch,
                     "median_step_s": median, "images_per_sec": args.batch / median,
                     "min_step_s": min(record["times"]), "steps": len(record["times"]),
                     "first_step_s": record["first_step_s"], "first_loss": record["first_loss"],
                     "threads": torch.get_num_threads(), "cpu_bf16": cpu_has_bf16(),
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__})
    return rows


def run_worker(args: argparse.Namespace, net: str, compile_: bool) -> list[dict]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--net", net,
               "--batch", str(SETTINGS[net]["batch"]), "--image_size", str(SETTINGS[net]["image_size"]),
               "--threads", str(args.threads), "--warmup", str(args.warmup), "--rounds", str(args.rounds),
               "--steps_per_round", str(args.steps_per_round)] + (["--compile"] if compile_ else [])
    environment = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                       PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("[")]
    if completed.returncode != 0 or not lines:
        print(f"{net} compile={compile_} failed:\n{completed.stderr[-2000:]}", file=sys.stderr)
        return []
    return json.loads(lines[-1])


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return [f for f in line.split(":", 1)[1].split() if "bf16" in f or f.startswith("amx")]
    except OSError:
        pass
    return []


def render(rows: list[dict], load_before: float, load_after: float, threads: int) -> str:
    lines = [f"# Training step on CPU: precision and compilation ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {cpu_model()}, {os.cpu_count()} cores, {threads} threads; bf16 flags: "
             f"{', '.join(cpu_flags()) or 'none'}; oneDNN bf16: {rows[0]['cpu_bf16'] if rows else '?'}; "
             f"torch {rows[0]['torch'] if rows else '?'} ({rows[0]['cpu_capability'] if rows else '?'}); "
             f"load average {load_before:.2f} before, {load_after:.2f} after.", "",
             "| net | batch | precision | compile | median step (s) | images/s | vs fp32 eager | first step (s) "
             "| step-1 loss | loss vs fp32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next((r for r in rows if r["net"] == row["net"] and r["precision"] == "fp32" and not r["compile"]),
                    None)
        speedup = base["median_step_s"] / row["median_step_s"] if base else float("nan")
        loss_diff = row["first_loss"] - base["first_loss"] if base else float("nan")
        lines.append(f"| {row['net']} | {row['batch']} | {row['precision']} | {'yes' if row['compile'] else 'no'} | "
                     f"{row['median_step_s']:.4f} | {row['images_per_sec']:.1f} | {speedup:.2f}x | "
                     f"{row['first_step_s']:.2f} | {row['first_loss']:.5f} | {loss_diff:+.2e} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--net", default="lenet")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=28)
    parser.add_argument("--nets", default="lenet,resnet_v1_50")
    parser.add_argument("--compile_nets", default="lenet,resnet_v1_50",
                        help="nets also timed compiled (compiling resnet_v1_50 takes minutes on 2 cores)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps_per_round", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "precision_cpu.md"))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    load_before = os.getloadavg()[0]
    rows = []
    compile_nets = set(filter(None, args.compile_nets.split(",")))
    for net in filter(None, args.nets.split(",")):
        for row in run_worker(args, net, net in compile_nets):
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = render(rows, load_before, os.getloadavg()[0], args.threads)
    print(text)
    Path(args.out).write_text(text, encoding="utf-8")
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
