"""Network speed on this CPU: slimtune vs the TF-Slim reference, forward and training step.

    .venv/bin/python benchmarks/bench_nets_cpu.py --tf_python /work/tfenv/bin/python
        [--nets resnet_v1_50,mobilenet_v1,vgg_16] [--batch_size 16] [--vgg_batch_size 8]
        [--threads N] [--rounds 1] [--max_load 1.5] [--max_wait_min 40]

For each net, at the same batch size and a 224x224 input, four measurements run one after another,
each in its own subprocess (so the frameworks never share a thread pool):
  slimtune forward   eval mode, torch.no_grad, channels-last (slimtune's training default)
  slimtune train     train mode: forward, softmax cross-entropy, backward, momentum SGD with weight
                     decay on the kernels -- the optimizer, param groups and loss slimtune's trainer
                     builds (build_optimizer('momentum', decay_groups(...)), softmax_loss)
  TF-Slim forward    graph mode, nets_factory's network fn in its arg scope, is_training=False
  TF-Slim train      is_training=True, softmax_cross_entropy + the arg scope's L2 regularization
                     losses, UPDATE_OPS as control dependencies, MomentumOptimizer (as slim's
                     train_image_classifier.py does)
Inputs are constants already in memory (a torch tensor; a non-trainable TF variable), so neither
side times an input pipeline. Both get the same thread count (torch.set_num_threads; TF's
intra_op_parallelism_threads, inter_op_parallelism_threads=1 unless --tf_inter_op says otherwise)
and the same allocator setting: glibc told to reuse freed blocks, as the slimtune CLI does
(slimtune/malloc.py; TF gains from it too), or left as it is for both with --system_malloc.
By default the two frameworks' workers for a net and mode run at the same time and step in
alternation (lockstep: the driver asks one, then the other, for one step, with a short idle gap),
so that drift of a shared cloud machine's speed over minutes (measured here: one convolution took
55 ms or 95 ms depending on the minute) slows both alike; the ratio reported is the median over
step pairs of TF-Slim's step time / slimtune's. --sequential times each framework in its own run
instead (warm-up steps, then timed steps: at least --min_steps and --min_seconds). The img/s
figures are batch / median step time either way. With --rounds > 1 the whole set repeats and the
median over rounds is reported. The markdown table (machine, load average, versions) is printed
and written to --out.

Before measuring, the script waits (checking every 2 minutes, up to --max_wait_min) for the
1-minute load average to drop below --max_load, then measures anyway, recording the load.

This file must import without torch: the TF-Slim worker runs it under the TensorFlow venv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_NETS = ("resnet_v1_50", "mobilenet_v1", "vgg_16", "inception_v3", "inception_resnet_v2")
#: Nets measured at their own default size instead of --image_size (slim's 299 for these).
NET_IMAGE_SIZE = {"inception_v3": 299, "inception_v4": 299, "inception_resnet_v2": 299}
#: train_image_classifier.py's weight on the AuxLogits loss (both sides train the aux head).
AUX_LOSS_WEIGHT = 0.4
TARGET_TRAIN_RATIO = 1.25
# MobileNet v3 / EdgeTPU are not in /work/slim_src's nets_factory: the TF worker builds them from
# research/slim's nets/mobilenet/mobilenet_v3.py of --slim_src_v3 (see tools/tf_reference/README.md,
# section 5), as upstream's later nets_factory does: inside training_scope(weight_decay=...).
MOBILENET_V3_FUNCTIONS = {"mobilenet_v3_large": "large", "mobilenet_v3_small": "small",
                          "mobilenet_v3_large_minimalistic": "large_minimalistic",
                          "mobilenet_v3_small_minimalistic": "small_minimalistic",
                          "mobilenet_edgetpu": "edge_tpu", "mobilenet_edgetpu_075": "edge_tpu_075"}
WEIGHT_DECAY = 4e-5        # train_image_classifier.py's --weight_decay default
LEARNING_RATE = 0.01
MOMENTUM = 0.9


# ------------------------------------------------------------------------------------------------
# Timing shared by both workers.

def time_steps(step: Any, warmup: int, min_steps: int, min_seconds: float) -> list[float]:
    """Run `step` warm-up times, then time it at least min_steps times and min_seconds in total."""
    for _ in range(warmup):
        step()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    return times


def measure(step: Any, args: argparse.Namespace) -> list[float]:
    """Time `step` on its own (time_steps), or, with --serve, in lockstep with the other framework:
    after the warm-up, print a ready line, then run one step per 'step' line the driver writes and
    report its time, until 'quit'. Returns the step times either way."""
    if not args.serve:
        return time_steps(step, args.warmup, args.min_steps, args.min_seconds)
    for _ in range(args.warmup):
        step()
    print(json.dumps({"ready": True}), flush=True)
    times: list[float] = []
    for line in sys.stdin:
        if line.strip() != "step":
            break
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
        print(json.dumps({"step_s": times[-1]}), flush=True)
    return times


def summarize(times: list[float], batch: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Median images/s plus the spread, as one JSON-able record."""
    median = statistics.median(times)
    return {"images_per_sec": batch / median, "median_step_s": median, "min_step_s": min(times),
            "max_step_s": max(times), "steps": len(times), **extra}


# ------------------------------------------------------------------------------------------------
# slimtune worker (the project venv).

def torch_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build the slimtune net and time its forward or training step."""
    import torch

    from slimtune.compiled_inference import CompiledInference
    from slimtune.malloc import reuse_freed_memory
    from slimtune.nets.registry import create_model, get_model_spec
    from slimtune.train.freeze import decay_groups
    from slimtune.train.mechanics import autocast_dtype
    from slimtune.train.losses import softmax_loss
    from slimtune.train.optimizers import build_optimizer

    # What the slimtune CLI does in every process (see slimtune/malloc.py); --system_malloc skips it.
    allocator_tuned = not args.system_malloc and reuse_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    spec = get_model_spec(args.net)
    num_classes = spec.checkpoint_num_classes
    # Only builders whose shapes follow the input (Inception's aux head, lenet) take image_size.
    import inspect

    sized = "image_size" in inspect.signature(spec.builder).parameters
    model = create_model(args.net, num_classes=num_classes, **({"image_size": args.image_size} if sized else {}))
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size).contiguous(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (args.batch,))
    # --compile: forward as `slimtune eval/predict --compile` runs it (frozen weights, checked against
    # eager on the first warm-up step), training as `slimtune train --compile`.
    if not args.compile:
        runner = model
    elif args.mode == "forward":
        runner = CompiledInference(model.eval(), args.batch)
    else:
        runner = torch.compile(model)
    # --precision bf16: the autocast `slimtune train --precision bf16` runs under.
    precision = autocast_dtype(args.precision, False, torch.device("cpu"))

    def autocast() -> torch.autocast:
        return torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None)

    if args.mode == "forward":
        model.eval()

        def step() -> None:
            with torch.no_grad(), autocast():
                runner(images)
    else:
        model.train()
        optimizer = build_optimizer("momentum", decay_groups(model, WEIGHT_DECAY), LEARNING_RATE,
                                    momentum=MOMENTUM)

        def step() -> None:
            with autocast():
                logits, end_points = runner(images, with_end_points=True)
            aux = end_points.get("AuxLogits")
            loss = softmax_loss(logits.float(), labels, aux_logits=aux.float() if aux is not None else None,
                                aux_weight=AUX_LOSS_WEIGHT)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    times = measure(step, args)
    return summarize(times, args.batch, {"framework": "slimtune", "torch": torch.__version__,
                                         "memory_format": args.memory_format, "compile": args.compile,
                                         "precision": args.precision,
                                         # "compiled", or "eager: why" when the first-batch check fell back
                                         "compiled_forward": getattr(runner, "status", None),
                                         "mkldnn": torch.backends.mkldnn.enabled,
                                         "malloc_reuse": allocator_tuned,
                                         "threads": torch.get_num_threads()})


# ------------------------------------------------------------------------------------------------
# TF-Slim worker (the TensorFlow venv).

def tf_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build research/slim's net in graph mode and time its forward or training step."""
    sys.path.insert(0, str(REPO / "tools" / "tf_reference"))
    from slim_env import load_slim

    sys.path.insert(0, str(REPO / "src"))
    from slimtune.malloc import reuse_freed_memory  # torch-free; both sides get the same allocator

    allocator_tuned = not args.system_malloc and reuse_freed_memory()
    v3_function = MOBILENET_V3_FUNCTIONS.get(args.net)
    if v3_function is not None:
        import numpy as np

        if "int" not in np.__dict__:
            np.int = int  # late-2019 mobilenet_v3.py uses np.int at import (gone in numpy 2)
    env = load_slim(args.slim_src_v3 if v3_function else args.slim_src)
    tf = env.tf
    # slim's factory defaults (and the published checkpoints): 1001 classes for MobileNet, 1000 else.
    num_classes = 1001 if args.net.startswith(("mobilenet", "inception")) else 1000
    is_training = args.mode == "train"
    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(0)
        # Constant input already in memory: a non-trainable variable, so no feed or copy per step
        # and nothing the graph optimizer could constant-fold.
        images = tf.Variable(tf.random.normal([args.batch, args.image_size, args.image_size, 3]),
                             trainable=False, name="bench_images")
        labels = tf.Variable(tf.random.uniform([args.batch], 0, num_classes, dtype=tf.int32),
                             trainable=False, name="bench_labels")
        if v3_function is not None:
            v3 = env.import_module("nets.mobilenet.mobilenet_v3")
            with env.slim.arg_scope(v3.training_scope(weight_decay=WEIGHT_DECAY, is_training=is_training)):
                logits, end_points = getattr(v3, v3_function)(images, num_classes=num_classes,
                                                              is_training=is_training)
        else:
            network_fn = env.nets_factory.get_network_fn(args.net, num_classes=num_classes,
                                                         weight_decay=WEIGHT_DECAY, is_training=is_training)
            logits, end_points = network_fn(images)
        if is_training:
            if "AuxLogits" in end_points:  # as train_image_classifier.py
                tf.losses.softmax_cross_entropy(tf.one_hot(labels, num_classes), end_points["AuxLogits"],
                                                weights=AUX_LOSS_WEIGHT)
            tf.losses.softmax_cross_entropy(tf.one_hot(labels, num_classes), logits)
            total_loss = tf.losses.get_total_loss(add_regularization_losses=True)
            optimizer = tf.train.MomentumOptimizer(LEARNING_RATE, MOMENTUM)
            with tf.control_dependencies(tf.get_collection(tf.GraphKeys.UPDATE_OPS)):
                target = optimizer.minimize(total_loss)
        else:
            target = logits
        init = tf.global_variables_initializer()
    config = tf.ConfigProto(intra_op_parallelism_threads=args.threads,
                            inter_op_parallelism_threads=args.tf_inter_op)
    if args.precision == "bf16":
        # TF's own CPU mixed precision: grappler rewrites the graph to run oneDNN's bfloat16 kernels
        # where numerically safe (the TF counterpart of torch.autocast on CPU).
        from tensorflow.core.protobuf import rewriter_config_pb2

        config.graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 = \
            rewriter_config_pb2.RewriterConfig.ON
    with tf.Session(graph=graph, config=config) as sess:
        sess.run(init)
        times = measure(lambda: sess.run(target), args)
    return summarize(times, args.batch, {"framework": "tf-slim", **env.versions,
                                         "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
                                         "threads": args.threads, "inter_op": args.tf_inter_op,
                                         "precision": args.precision,
                                         "malloc_reuse": allocator_tuned})


# ------------------------------------------------------------------------------------------------
# Driver.

def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, max_wait_min: float) -> tuple[float, float]:
    """Sleep in 2-minute steps until the load drops below max_load or max_wait_min passes.

    Returns (load when measuring starts, minutes waited)."""
    started = time.time()
    load = load_average()
    while load > max_load and (time.time() - started) / 60 < max_wait_min:
        print(f"load average {load:.2f} > {max_load}: waiting 2 min "
              f"({(time.time() - started) / 60:.0f}/{max_wait_min:.0f} min waited)", flush=True)
        time.sleep(120)
        load = load_average()
    return load, (time.time() - started) / 60


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_worker(python: str, framework: str, net: str, mode: str, batch: int, args: argparse.Namespace) -> dict:
    """Run one measurement in a fresh interpreter and parse its JSON line."""
    command = worker_command(python, framework, net, mode, batch, args)
    completed = subprocess.run(command, capture_output=True, text=True, env=worker_environment(args), cwd=REPO)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{framework} {net} {mode} failed (exit {completed.returncode}):\n"
                           f"{completed.stderr[-3000:]}")
    return json.loads(lines[-1])


def worker_command(python: str, framework: str, net: str, mode: str, batch: int, args: argparse.Namespace) -> list[str]:
    """The command line of one measurement worker."""
    command = [python, str(Path(__file__).resolve()), "--worker", framework, "--net", net, "--mode", mode,
               "--batch", str(batch), "--image_size", str(NET_IMAGE_SIZE.get(net, args.image_size)),
               "--threads", str(args.threads), "--warmup", str(args.warmup), "--min_steps", str(args.min_steps),
               "--min_seconds", str(args.min_seconds), "--slim_src", args.slim_src,
               "--slim_src_v3", args.slim_src_v3,
               "--tf_inter_op", str(args.tf_inter_op), "--memory_format", args.memory_format,
               "--precision", args.precision]
    for flag in ("compile", "no_mkldnn", "system_malloc"):
        if getattr(args, flag):
            command.append(f"--{flag}")
    return command


def framework_python(framework: str, args: argparse.Namespace) -> str:
    """The interpreter a framework's worker runs under: this one for slimtune, the TF venv's for TF-Slim."""
    return sys.executable if framework == "slimtune" else args.tf_python


def worker_environment(args: argparse.Namespace) -> dict[str, str]:
    """Both frameworks' thread count, TF's log level quiet."""
    return dict(os.environ, OMP_NUM_THREADS=str(args.threads), TF_CPP_MIN_LOG_LEVEL="2")


class LockstepWorker:
    """A measurement worker started with --serve: it warms up, then runs one step per request."""

    def __init__(self, framework: str, command: list[str], environment: dict[str, str]) -> None:
        import tempfile

        self.framework = framework
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(command + ["--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, env=environment, cwd=REPO)

    def _json_line(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.stderr.seek(0)
        raise RuntimeError(f"{self.framework} worker stopped (exit {self.process.wait()}):\n"
                           f"{self.stderr.read()[-3000:]}")

    def wait_ready(self) -> None:
        """Block until the worker has built the net and run its warm-up steps."""
        self._json_line()

    def step(self) -> float:
        """Run one step in the worker; its duration in seconds."""
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        return self._json_line()["step_s"]

    def finish(self) -> dict:
        """Stop the worker and return its summary record."""
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        record = self._json_line()
        self.process.wait()
        self.stderr.close()
        return record


def step_in_rotation(workers: dict[str, LockstepWorker], min_rounds: int, min_seconds: float,
                     gap: float) -> tuple[dict[str, dict], list[dict[str, float]]]:
    """Step every ready worker once per round, the first of each round rotating, after `gap` idle
    seconds (the previous worker's threads stop spinning), for >= min_rounds rounds and >=
    min_seconds; then finish them. Returns each worker's summary record and the rounds' step times."""
    rounds: list[dict[str, float]] = []
    started = time.perf_counter()
    while workers and (len(rounds) < min_rounds or time.perf_counter() - started < min_seconds):
        names = list(workers)
        shift = len(rounds) % len(names)
        step_times = {}
        for name in names[shift:] + names[:shift]:
            time.sleep(gap)
            step_times[name] = workers[name].step()
        rounds.append(step_times)
    return {name: worker.finish() for name, worker in workers.items()}, rounds


def run_lockstep(net: str, mode: str, batch: int, args: argparse.Namespace) -> dict[str, dict]:
    """Both frameworks' workers alive at once, stepping in alternation (the first of each pair
    alternating too), so that a machine whose speed drifts over minutes (shared cloud cores) slows
    both alike. Records per framework, plus the median over pairs of the per-pair speed ratio."""
    workers = {framework: LockstepWorker(framework, worker_command(
        framework_python(framework, args), framework, net, mode, batch, args),
        worker_environment(args)) for framework in ("slimtune", "tf-slim")}
    try:
        for worker in workers.values():
            worker.wait_ready()
        records, pairs = step_in_rotation(workers, args.min_steps, 2 * args.min_seconds, args.lockstep_gap)
    finally:
        for worker in workers.values():
            if worker.process.poll() is None:
                worker.process.kill()
    records["slimtune"]["paired_ratio"] = paired_ratio(pairs, "slimtune", "tf-slim")
    return records


def paired_ratio(rounds: list[dict[str, float]], faster: str, slower: str) -> Optional[float]:
    """Median over lockstep rounds of (step time of `slower`) / (step time of `faster`): how many
    times faster `faster` ran than `slower`, each round's steps taken seconds apart."""
    pairs = [r[slower] / r[faster] for r in rounds if faster in r and slower in r]
    return statistics.median(pairs) if pairs else None


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    """numerator / denominator, or None when either is missing."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def fmt(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    """A number for the table, or a dash."""
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def render(results: dict, args: argparse.Namespace, machine: dict[str, Any]) -> str:
    """The markdown report: machine line, settings, the table, and the per-step spread."""
    lines = ["# Network speed on CPU: slimtune vs TF-Slim", "",
             f"- date: {machine['date']}",
             f"- CPU: {machine['cpu']}, {machine['cores']} logical cores; threads per framework: {args.threads}",
             f"- load average (1 min) at start / end: {machine['load_start']:.2f} / {machine['load_end']:.2f}"
             f" (waited {machine['waited_min']:.0f} min for < {args.max_load})",
             f"- slimtune: torch {machine.get('torch', '?')}, {args.memory_format}"
             f"{', torch.compile' if args.compile else ''}{', mkldnn off' if args.no_mkldnn else ''}"
             f"{', glibc malloc as is' if args.system_malloc else ', freed memory reused (slimtune.malloc)'}; "
             f"Python {platform.python_version()}",
             f"- TF-Slim: tensorflow {machine.get('tensorflow', '?')}, tf_slim {machine.get('tf_slim', '?')}, "
             f"research/slim {machine.get('slim_src_revision', '?')}, inter_op threads {args.tf_inter_op}, "
             f"TF_ENABLE_ONEDNN_OPTS {machine.get('onednn_opts', '?')}",
             f"- input {args.image_size}x{args.image_size}x3 float32, compute {args.precision} (Inception nets at their "
             f"{NET_IMAGE_SIZE['inception_v3']}), constant in memory; train step = forward + "
             f"softmax CE + backward + momentum {MOMENTUM} SGD, weight decay {WEIGHT_DECAY} on kernels",
             f"- {args.warmup} warm-up steps, then >= {args.min_steps} steps and >= {args.min_seconds:.0f} s; "
             f"median step; {args.rounds} round(s); "
             + ("frameworks one after the other, ratio of the median img/s" if args.sequential else
                "both frameworks' workers alive and stepping in alternation (lockstep), ratio = median over "
                "step pairs of TF-Slim step time / slimtune step time"), "",
             "| net | batch | slimtune fwd img/s | TF-Slim fwd img/s | fwd ratio | slimtune train img/s "
             "| TF-Slim train img/s | train ratio | train >= 1.25x? |",
             "|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for net, entry in results.items():
        fwd = entry.get("paired/forward") or ratio(entry.get("slimtune/forward"), entry.get("tf-slim/forward"))
        train = entry.get("paired/train") or ratio(entry.get("slimtune/train"), entry.get("tf-slim/train"))
        verdict = "-" if train is None else ("yes" if train >= TARGET_TRAIN_RATIO else "no")
        lines.append(f"| {net} | {entry['batch']} | {fmt(entry.get('slimtune/forward'))} | "
                     f"{fmt(entry.get('tf-slim/forward'))} | {fmt(fwd, 2, 'x')} | {fmt(entry.get('slimtune/train'))} | "
                     f"{fmt(entry.get('tf-slim/train'))} | {fmt(train, 2, 'x')} | {verdict} |")
    lines += ["", "Step times (s), median [min, max] over rounds' timed steps:", ""]
    for net, entry in results.items():
        for key, record in entry["records"].items():
            lines.append(f"- {net} {key}: {record['median_step_s']:.3f} [{record['min_step_s']:.3f}, "
                         f"{record['max_step_s']:.3f}] over {record['steps']} steps"
                         + (f" ({record['compiled_forward']})" if record.get("compiled_forward") else ""))
    return "\n".join(lines) + "\n"


def drive(args: argparse.Namespace) -> None:
    """Wait for a quiet machine, run every worker, print and write the table."""
    nets = [name.strip() for name in args.nets.split(",") if name.strip()]
    frameworks = [name.strip() for name in args.frameworks.split(",")]
    modes = [name.strip() for name in args.modes.split(",")]
    if "tf-slim" in frameworks and not args.tf_python:
        raise SystemExit("--tf_python is required to measure TF-Slim (or pass --frameworks slimtune)")
    load_start, waited = wait_for_quiet(args.max_load, args.max_wait_min)
    machine: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(),
                               "cores": os.cpu_count(), "load_start": load_start, "waited_min": waited}
    results: dict[str, dict] = {}
    for net in nets:
        batch = args.vgg_batch_size if net.startswith("vgg") else args.batch_size
        per_key: dict[str, list[dict]] = {}
        lockstep = not args.sequential and set(frameworks) == {"slimtune", "tf-slim"}
        for _ in range(args.rounds):
            for mode in modes:
                if lockstep:
                    measured = run_lockstep(net, mode, batch, args)
                else:
                    measured = {framework: run_worker(framework_python(framework, args), framework, net, mode,
                                                      batch, args)
                                for framework in frameworks}
                for framework, record in measured.items():
                    per_key.setdefault(f"{framework}/{mode}", []).append(record)
                    for field in ("torch", "tensorflow", "tf_slim", "slim_src_revision", "onednn_opts"):
                        if field in record:
                            machine[field] = record[field]
                    print(f"{net:14s} {framework:8s} {mode:7s} {record['images_per_sec']:8.2f} img/s "
                          f"(median step {record['median_step_s']:.3f} s, {record['steps']} steps, "
                          f"load {load_average():.2f})"
                          + (f", paired ratio {record['paired_ratio']:.3f}x" if "paired_ratio" in record else "")
                          + (f", {record['compiled_forward']}" if record.get("compiled_forward") else ""),
                          flush=True)
        entry: dict[str, Any] = {"batch": batch, "records": {}}
        for key, records in per_key.items():
            entry[key] = statistics.median(r["images_per_sec"] for r in records)
            paired = [r["paired_ratio"] for r in records if "paired_ratio" in r]
            if paired:
                entry[key.replace("slimtune/", "paired/")] = statistics.median(paired)
            steps = [r["median_step_s"] for r in records]
            entry["records"][key] = {"median_step_s": statistics.median(steps),
                                     "min_step_s": min(r["min_step_s"] for r in records),
                                     "max_step_s": max(r["max_step_s"] for r in records),
                                     "steps": sum(r["steps"] for r in records)}
            statuses = sorted({r["compiled_forward"] for r in records if r.get("compiled_forward")})
            if statuses:  # what --compile ran: "compiled, frozen weights", "compiled" or "eager: why"
                entry["records"][key]["compiled_forward"] = "; ".join(statuses)
        results[net] = entry
    machine["load_end"] = load_average()
    report = render(results, args, machine)
    print()
    print(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"written to {out}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": machine, "results": results}, indent=2))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Driver flags, plus the --worker flags the driver passes to its subprocesses."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tf_python", default=None, help="python of the TensorFlow venv")
    parser.add_argument("--slim_src", default="/work/slim_src", help="research/slim checkout")
    parser.add_argument("--slim_src_v3", default="/work/slim_src_edgetpu",
                        help="research/slim tree with nets/mobilenet/mobilenet_v3.py (MobileNet v3 / EdgeTPU)")
    parser.add_argument("--nets", default=",".join(DEFAULT_NETS))
    parser.add_argument("--frameworks", default="slimtune,tf-slim", help="comma list of slimtune, tf-slim")
    parser.add_argument("--modes", default="forward,train", help="comma list of forward, train")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--vgg_batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tf_inter_op", type=int, default=1, help="TF inter_op_parallelism_threads")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min_steps", type=int, default=8)
    parser.add_argument("--min_seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sequential", action="store_true",
                        help="time each framework in its own run, one after the other (default: lockstep)")
    parser.add_argument("--lockstep_gap", type=float, default=0.2,
                        help="seconds of idle before each lockstep step (lets spinning pool threads sleep)")
    parser.add_argument("--memory_format", choices=("channels_last", "nchw"), default="channels_last",
                        help="slimtune's memory format (its trainer's default is channels_last)")
    parser.add_argument("--compile", action="store_true", help="run slimtune under torch.compile")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: slimtune under CPU autocast (as --precision bf16), TF-Slim with grappler's "
                             "auto_mixed_precision_onednn_bfloat16; both sides the same precision")
    parser.add_argument("--no_mkldnn", action="store_true", help="torch.backends.mkldnn.enabled = False")
    parser.add_argument("--system_malloc", action="store_true",
                        help="leave glibc's malloc as it is (the CLI's SLIMTUNE_MALLOC=system)")
    parser.add_argument("--max_load", type=float, default=1.5)
    parser.add_argument("--max_wait_min", type=float, default=40.0)
    parser.add_argument("--out", default=str(HERE / "results" / "nets_cpu.md"),
                        help="markdown output ('' to skip)")
    parser.add_argument("--json_out", default="", help="also write the raw results as JSON here")
    # Worker-only flags.
    parser.add_argument("--worker", choices=("slimtune", "tf-slim"), help=argparse.SUPPRESS)
    parser.add_argument("--net", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("forward", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    """Driver by default; a single measurement with --worker."""
    args = parse_args()
    if args.worker:
        worker = torch_worker if args.worker == "slimtune" else tf_worker
        print(json.dumps(worker(args)), flush=True)
    else:
        drive(args)


if __name__ == "__main__":
    main()
