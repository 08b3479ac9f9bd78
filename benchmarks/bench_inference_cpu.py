"""Inference images/s on CPU: slimtune eager vs its exports vs TF-Slim's frozen graph, same threads.

    .venv/bin/python benchmarks/bench_inference_cpu.py --tf_python /work/tfenv/bin/python \
        [--tflite_python /path/with/litert-torch/bin/python] [--nets resnet_v1_50,mobilenet_v1]

For each net (resnet_v1_50, mobilenet_v1, and inception_v3 once registered) the driver writes a
slimtune checkpoint (seeded weights), exports it with `slimtune export` (torchscript, onnx fp32,
onnx int8 calibrated on real-photo crops, tflite int8 when a python with litert-torch is given),
then times each runtime in its own subprocess at batch 1 and 16 on the same preprocessed input.
All runtimes' workers of one net and batch are alive at once and step in rotation (lockstep, as
bench_nets_cpu.py): this cloud machine's speed drifts 15-40% from minute to minute, so runtimes
timed minutes apart (`--sequential`, the old way) gave ratios that moved by 2-4x between runs.
A ratio column is the median over rounds of that round's ratio.

  eager        slimtune net as `slimtune predict` runs it: torch.no_grad, channels-last, BN folded
               into the kernels once (slimtune's layers)
  torchscript  torch.jit.load of the export
  ort-fp32     onnxruntime CPU, the fp32 ONNX export
  ort-int8     onnxruntime CPU, the int8 QDQ export
  tflite-int8  LiteRT interpreter (batch 1 only: a .tflite has a static batch)
  tf-slim      research/slim's net in TF graph mode, variables frozen to constants (freeze_graph)

Targets (issue 15): ort-fp32 >= 1.3x tf-slim; ort-int8 >= 1.8x ort-fp32 with >= 99% top-1 agreement.
Weights are seeded, not trained: top-1 agreement of int8 on a random net measures little (its
logits are nearly tied), so the agreement printed is the export's own report on the photos.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

# The lockstep worker protocol and ratio helpers of the network benchmark (this script's folder is on
# sys.path when it runs, and tests put it there).
from bench_nets_cpu import LockstepWorker, paired_ratio, ratio, step_in_rotation

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_NETS = ("resnet_v1_50", "mobilenet_v1", "inception_v3")
RUNTIMES = ("eager", "torchscript", "ort-fp32", "ort-int8", "tflite-int8", "tf-slim")
#: Idle seconds before each lockstep request: the previous worker's threads stop spinning.
LOCKSTEP_GAP_S = 0.2


def _time(step, batch: int, min_steps: int, min_seconds: float) -> dict[str, Any]:
    step()
    step()
    times = []
    started = time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    median = statistics.median(times)
    return {"images_per_sec": batch / median, "steps": len(times)}


#: Seconds of work per lockstep request (a batch-1 step is a few ms: one request runs it repeatedly).
REQUEST_SECONDS = 0.25


def serve(step, batch: int) -> dict[str, Any]:
    """Lockstep worker loop: warm up, print a ready line, then for each 'step' line on stdin run
    `step` enough times for ~REQUEST_SECONDS and print the median step time; 'quit' (or end of
    input) ends it and returns the summary record."""
    step()
    step()
    begin = time.perf_counter()
    step()
    repeats = max(1, math.ceil(REQUEST_SECONDS / max(time.perf_counter() - begin, 1e-6)))
    print(json.dumps({"ready": True, "repeats": repeats}), flush=True)
    times: list[float] = []
    for line in sys.stdin:
        if line.strip() != "step":
            break
        runs = []
        for _ in range(repeats):
            begin = time.perf_counter()
            step()
            runs.append(time.perf_counter() - begin)
        times.append(statistics.median(runs))
        print(json.dumps({"step_s": times[-1]}), flush=True)
    if not times:
        raise SystemExit("lockstep worker: no step was requested")
    return {"images_per_sec": batch / statistics.median(times), "steps": len(times), "repeats": repeats}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time one runtime on one file (runs in its own interpreter)."""
    import numpy as np

    x = np.load(args.input)[: args.batch]
    if len(x) < args.batch:
        x = np.concatenate([x] * (args.batch // len(x) + 1))[: args.batch]
    x = np.ascontiguousarray(x, dtype=np.float32)
    if args.worker in ("eager", "torchscript"):
        import torch

        sys.path.insert(0, str(REPO / "src"))
        torch.set_num_threads(args.threads)
        tensor = torch.from_numpy(x)
        if args.worker == "eager":
            # As `slimtune predict` runs it: the CLI's allocator setting, the channels-last layout.
            from slimtune.export.prepare import load_source
            from slimtune.malloc import reuse_freed_memory
            from slimtune.runtime import inference_layout

            reuse_freed_memory()
            model = load_source(args.file).model.eval()
            tensor = inference_layout(model)(tensor)
        else:
            model = torch.jit.load(args.file).eval()

        def step() -> None:
            with torch.no_grad():
                model(tensor)
    elif args.worker.startswith("ort"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(args.file, options, providers=["CPUExecutionProvider"])

        def step() -> None:
            session.run(None, {"input": x})
    elif args.worker == "tflite-int8":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=args.file, num_threads=args.threads)
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        scale, zero = detail["quantization"]
        value = x[:1]
        if detail["dtype"] != np.float32:
            value = np.clip(np.round(value / scale) + zero, -128, 127).astype(detail["dtype"])

        def step() -> None:
            interpreter.set_tensor(detail["index"], value)
            interpreter.invoke()
    else:  # tf-slim frozen graph
        sys.path.insert(0, str(REPO / "tools" / "tf_reference"))
        from slim_env import load_slim

        env = load_slim(args.slim_src)
        tf = env.tf
        info = json.loads(Path(args.file).read_text())
        graph = tf.Graph()
        with graph.as_default():
            images = tf.placeholder(tf.float32, [None, info["image_size"], info["image_size"], 3], name="input")
            network_fn = env.nets_factory.get_network_fn(info["model_name"], num_classes=info["num_classes"],
                                                         is_training=False)
            logits, _ = network_fn(images)
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                frozen = tf.graph_util.convert_variables_to_constants(sess, graph.as_graph_def(), [logits.op.name])
        frozen_graph = tf.Graph()
        with frozen_graph.as_default():
            tf.import_graph_def(frozen, name="")
        config = tf.ConfigProto(intra_op_parallelism_threads=args.threads, inter_op_parallelism_threads=1)
        sess = tf.Session(graph=frozen_graph, config=config)
        output = frozen_graph.get_tensor_by_name(logits.name)
        feed = {frozen_graph.get_tensor_by_name("input:0"): x.transpose(0, 2, 3, 1).copy()}

        def step() -> None:
            sess.run(output, feed)
    if args.serve:
        return serve(step, args.batch)
    return _time(step, args.batch, args.min_steps, args.min_seconds)


def worker_command(python: str, runtime: str, file: str, batch: int, args: argparse.Namespace) -> list[str]:
    """The command line of one runtime's measurement worker."""
    return [python, str(Path(__file__).resolve()), "--worker", runtime, "--file", file, "--input", args.input,
            "--batch", str(batch), "--threads", str(args.threads), "--min_steps", str(args.min_steps),
            "--min_seconds", str(args.min_seconds), "--slim_src", args.slim_src]


def worker_environment(args: argparse.Namespace) -> dict[str, str]:
    """Every runtime's thread count; TF quiet; slimtune from this checkout."""
    return dict(os.environ, OMP_NUM_THREADS=str(args.threads), TF_CPP_MIN_LOG_LEVEL="2",
                PYTHONPATH=str(REPO / "src"))


def run_lockstep(commands: dict[str, list[str]], args: argparse.Namespace) -> tuple[dict[str, dict], list[dict]]:
    """Start every runtime's worker at once, then step them in rotation (the first of each round
    rotating too, 0.2 s idle before each request) for >= --min_rounds rounds and >= --min_seconds
    per runtime. Returns each runtime's summary record and the per-round step times; a runtime whose
    worker fails to start is reported and left out."""
    workers = {runtime: LockstepWorker(runtime, command, worker_environment(args))
               for runtime, command in commands.items()}
    try:
        for runtime in list(workers):
            try:
                workers[runtime].wait_ready()
            except RuntimeError as failure:
                print(f"  {runtime}: failed ({str(failure).strip().splitlines()[-1:]})", flush=True)
                workers.pop(runtime).process.kill()
        records, rounds = step_in_rotation(workers, args.min_rounds, args.min_seconds * len(workers),
                                           LOCKSTEP_GAP_S)
    finally:
        for worker in workers.values():
            if worker.process.poll() is None:
                worker.process.kill()
    return records, rounds


def run_worker(python: str, runtime: str, file: str, batch: int, args: argparse.Namespace) -> Optional[float]:
    """images/s of one runtime in a fresh interpreter, or None when it fails (printed)."""
    command = worker_command(python, runtime, file, batch, args)
    completed = subprocess.run(command, capture_output=True, text=True, env=worker_environment(args), cwd=REPO)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        print(f"  {runtime} batch {batch}: failed ({completed.stderr.strip().splitlines()[-1:]})", flush=True)
        return None
    return json.loads(lines[-1])["images_per_sec"]


def prepare(net: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Seeded checkpoint + every export of it; returns file paths and the int8 reports."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO / "src"))
    from slimtune.export import export
    from slimtune.export.verify import load_verification_images
    from slimtune.nets.registry import get_model_spec

    spec = get_model_spec(net)
    classes = spec.checkpoint_num_classes
    torch.manual_seed(0)
    model = spec.build(classes)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.ckpt-1.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"model_name": net, "num_classes": str(classes), "format": "slimtune", "step": "1",
                        "image_size": str(spec.default_image_size)})
    calibration = folder / "calibration"
    calibration.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for index, photo in enumerate(load_verification_images(None, 3).arrays):
        height, width = photo.shape[:2]
        for crop in range(args.calibration_images // 4):
            top, left = int(rng.integers(0, height // 3)), int(rng.integers(0, width // 3))
            Image.fromarray(photo[top:top + 2 * height // 3, left:left + 2 * width // 3]).save(
                calibration / f"{index}_{crop}.jpg")
    files = {"eager": str(weights)}
    files["torchscript"] = str(export(str(weights), "torchscript", str(folder / "m.pt"), quiet=True).path)
    files["ort-fp32"] = str(export(str(weights), "onnx", str(folder / "m.onnx"), quiet=True).path)
    int8 = export(str(weights), "onnx", str(folder / "m_int8.onnx"), quantize="int8",
                  calibration_dataset_dir=str(calibration), calibration_images=args.calibration_images,
                  min_agreement=0.0, quiet=True)
    files["ort-int8"] = str(int8.path)
    if args.tflite_python:
        script = (f"from slimtune.export import export; r = export({str(weights)!r}, 'tflite', "
                  f"{str(folder / 'm_int8.tflite')!r}, quantize='int8', calibration_dataset_dir={str(calibration)!r}, "
                  f"calibration_images={args.calibration_images}, min_agreement=0.0, quiet=True); "
                  "print(r.comparison.top1_agreement)")
        done = subprocess.run([args.tflite_python, "-c", script], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
        if done.returncode == 0:
            files["tflite-int8"] = str(folder / "m_int8.tflite")
        else:
            print(f"  tflite export failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
    info = folder / "tf.json"
    info.write_text(json.dumps({"model_name": net, "num_classes": classes, "image_size": spec.default_image_size}))
    files["tf-slim"] = str(info)
    from slimtune.export.verify import preprocess_batch

    batch = preprocess_batch(load_verification_images(None, 3), spec.preprocessing, spec.default_image_size)
    np.save(folder / "input.npy", batch.numpy())
    return {"files": files, "input": str(folder / "input.npy"), "int8_report": int8.report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", default=",".join(DEFAULT_NETS))
    parser.add_argument("--tf_python", default=None)
    parser.add_argument("--tflite_python", default=None)
    parser.add_argument("--slim_src", default="/work/slim_src")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--min_steps", type=int, default=5, help="--sequential: timed steps per runtime")
    parser.add_argument("--min_seconds", type=float, default=3.0,
                        help="seconds of timing per runtime (lockstep: per runtime, summed over rounds)")
    parser.add_argument("--min_rounds", type=int, default=8, help="lockstep: rounds over all runtimes")
    parser.add_argument("--sequential", action="store_true",
                        help="time the runtimes one after another (the pre-2026-12-03 way) instead of in lockstep")
    parser.add_argument("--calibration_images", type=int, default=32)
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--worker", default=None)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--file", default=None)
    parser.add_argument("--input", default=None)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    sys.path.insert(0, str(REPO / "src"))
    from slimtune.nets.registry import list_models

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_inference_"))
    batches = [int(b) for b in args.batches.split(",")]
    mode = "sequential" if args.sequential else "lockstep"
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} threads, {mode}, work dir {work}", flush=True)
    rows = []
    for net in args.nets.split(","):
        if net not in list_models():
            print(f"{net}: not registered, skipped", flush=True)
            continue
        prepared = prepare(net, work / net, args)
        args.input = prepared["input"]
        speeds: dict[tuple[str, int], Optional[float]] = {}
        ratios: dict[tuple[str, int], Optional[float]] = {}
        for batch in batches:
            sources = {}  # runtime -> (interpreter, file)
            for runtime in RUNTIMES:
                file = prepared["files"].get(runtime)
                python = {"tf-slim": args.tf_python, "tflite-int8": args.tflite_python}.get(runtime, sys.executable)
                if file is not None and python is not None and (runtime != "tflite-int8" or batch == 1):
                    sources[runtime] = (python, file)
            if args.sequential:
                for runtime, (python, file) in sources.items():
                    speeds[runtime, batch] = run_worker(python, runtime, file, batch, args)
                ratios["fp32/tf", batch] = ratio(speeds.get(("ort-fp32", batch)), speeds.get(("tf-slim", batch)))
                ratios["int8/fp32", batch] = ratio(speeds.get(("ort-int8", batch)), speeds.get(("ort-fp32", batch)))
            else:
                records, rounds = run_lockstep({runtime: worker_command(python, runtime, file, batch, args)
                                                for runtime, (python, file) in sources.items()}, args)
                for runtime, record in records.items():
                    speeds[runtime, batch] = record["images_per_sec"]
                ratios["fp32/tf", batch] = paired_ratio(rounds, "ort-fp32", "tf-slim")
                ratios["int8/fp32", batch] = paired_ratio(rounds, "ort-int8", "ort-fp32")
                print(f"  {net} batch {batch}: {len(rounds)} lockstep rounds", flush=True)
            for runtime in sources:
                print(f"  {net} {runtime} batch {batch}: {speeds.get((runtime, batch))}", flush=True)
        rows.append((net, speeds, ratios, prepared["int8_report"]))
    print()
    header = "| net | batch | " + " | ".join(RUNTIMES) + " | ort-fp32 / tf-slim | ort-int8 / ort-fp32 |"
    print(header)
    print("|" + "---|" * (len(RUNTIMES) + 4))
    for net, speeds, ratios, report in rows:
        for batch in batches:
            cells = [f"{speeds[r, batch]:.1f}" if speeds.get((r, batch)) else "-" for r in RUNTIMES]
            r1, r2 = (f"{ratios[key, batch]:.2f}x" if ratios.get((key, batch)) else "-"
                      for key in ("fp32/tf", "int8/fp32"))
            print(f"| {net} | {batch} | " + " | ".join(cells) + f" | {r1} | {r2} |")
    for net, _, _, report in rows:
        print(f"{net} int8 ONNX: {report.get('int8_bytes', 0) / 1e6:.1f} MB vs fp32 {report.get('fp32_bytes', 0) / 1e6:.1f} MB, "
              f"top-1 agreement with fp32 {report.get('top1_agreement')} on {report.get('calibration_images')} photo crops")


if __name__ == "__main__":
    main()
