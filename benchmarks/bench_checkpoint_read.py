"""Read a ~500 MB TF checkpoint with slimtune and with TensorFlow; compare time and peak memory.

    /work/main/.venv/bin/python benchmarks/bench_checkpoint_read.py --tf_python /work/tfenv/bin/python

The checkpoint holds VGG-16's 32 tensors (138M float32 values, 528 MiB; fc6/weights alone is
392 MiB, the worst case for a reader). It is written by TensorFlow's own Saver (V2) when
--tf_python is given, else by slimtune's writer; with --v1 a V1 copy is added, written by slimtune
(TF 2.21 restores those files, see tools/tf_reference/make_checkpoint_fixtures.py).

Each measurement runs in a fresh subprocess, so peak RSS (VmHWM) is that reader's own:
  slimtune   read_checkpoint(path).load_all_torch()  -> dict of torch tensors
  tensorflow tf.train.load_checkpoint(path).get_tensor(name) for every name -> numpy arrays
             (torch.from_numpy on those would be free, so TF is not charged a conversion)
Reported: wall time of the read alone (imports excluded), peak RSS, and the growth of RSS over
the process's footprint just before reading, relative to the checkpoint's size. The files are
read once beforehand so both readers see a warm page cache; the runs alternate. Both children
fingerprint what they read (CRC32C of every tensor) and the run fails if they disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLIMTUNE_PYTHON = sys.executable

VGG16_SHAPES = {
    "vgg_16/conv1/conv1_1": (3, 3, 3, 64), "vgg_16/conv1/conv1_2": (3, 3, 64, 64),
    "vgg_16/conv2/conv2_1": (3, 3, 64, 128), "vgg_16/conv2/conv2_2": (3, 3, 128, 128),
    "vgg_16/conv3/conv3_1": (3, 3, 128, 256), "vgg_16/conv3/conv3_2": (3, 3, 256, 256),
    "vgg_16/conv3/conv3_3": (3, 3, 256, 256), "vgg_16/conv4/conv4_1": (3, 3, 256, 512),
    "vgg_16/conv4/conv4_2": (3, 3, 512, 512), "vgg_16/conv4/conv4_3": (3, 3, 512, 512),
    "vgg_16/conv5/conv5_1": (3, 3, 512, 512), "vgg_16/conv5/conv5_2": (3, 3, 512, 512),
    "vgg_16/conv5/conv5_3": (3, 3, 512, 512), "vgg_16/fc6": (7, 7, 512, 4096),
    "vgg_16/fc7": (1, 1, 4096, 4096), "vgg_16/fc8": (1, 1, 4096, 1000),
}

# Shared by both children: peak RSS, current RSS, a fingerprint of what was read.
_COMMON = r"""
import json, os, sys, time
import crc32c

def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def report(seconds, before, arrays):
    fingerprint = 0
    total = 0
    for name in sorted(arrays):
        data = memoryview(arrays[name]).cast("B")
        fingerprint ^= crc32c.crc32c(data, crc32c.crc32c(name.encode()))
        total += len(data)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would include the parent's.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print("RESULT " + json.dumps({"seconds": seconds, "rss_before": before, "peak_rss": peak,
                                  "tensors": len(arrays), "bytes": total, "fingerprint": fingerprint}))
"""

_SLIMTUNE_CHILD = _COMMON + r"""
import numpy as np
import torch
from slimtune.checkpoint import read_checkpoint
path = sys.argv[1]
before = rss_bytes()
start = time.perf_counter()
with read_checkpoint(path) as reader:
    tensors = reader.load_all_torch()
seconds = time.perf_counter() - start
report(seconds, before, {n: t.numpy() for n, t in tensors.items()})
"""

_TF_CHILD = _COMMON + r"""
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
path = sys.argv[1]
before = rss_bytes()
start = time.perf_counter()
reader = tf.train.load_checkpoint(path)
arrays = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
seconds = time.perf_counter() - start
report(seconds, before, {n: np.ascontiguousarray(a) for n, a in arrays.items()})
"""

_TF_WRITER = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import json
import tensorflow as tf
v1 = tf.compat.v1
v1.disable_eager_execution()
shapes = json.loads(sys.argv[2])
with tf.Graph().as_default():
    variables = {}
    for i, (scope, shape) in enumerate(sorted(shapes.items())):
        init = v1.random_normal_initializer(stddev=0.01, seed=i)
        variables[scope + "/weights"] = v1.get_variable(scope + "/weights", shape=shape, initializer=init)
        variables[scope + "/biases"] = v1.get_variable(scope + "/biases", shape=shape[-1:], initializer=init)
    saver = v1.train.Saver(var_list=variables)
    with v1.Session() as session:
        session.run(v1.global_variables_initializer())
        saver.save(session, sys.argv[1], write_meta_graph=False, write_state=False)
"""


def build_with_slimtune(prefix: Path, version: int) -> Path:
    """Write the VGG-16-shaped checkpoint with slimtune's writer (seeded random values)."""
    import numpy as np

    from slimtune.checkpoint import write_tf_checkpoint

    rng = np.random.default_rng(0)
    tensors = {}
    for scope, shape in VGG16_SHAPES.items():
        tensors[scope + "/weights"] = (rng.standard_normal(shape, dtype=np.float32) * 0.01)
        tensors[scope + "/biases"] = rng.standard_normal(shape[-1:], dtype=np.float32) * 0.01
    return write_tf_checkpoint(prefix, tensors, version=version)


def build_in_subprocess(prefix: Path, version: int) -> Path:
    """Run build_with_slimtune in a child, so this process stays small while readers are timed."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_checkpoint_read as b; "
            f"from pathlib import Path; b.build_with_slimtune(Path({str(prefix)!r}), {version})")
    subprocess.run([SLIMTUNE_PYTHON, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    return prefix


def build_with_tf(tf_python: str, prefix: Path) -> Path:
    """Write the checkpoint with TensorFlow's own Saver (V2)."""
    subprocess.run([tf_python, "-c", _TF_WRITER, str(prefix), json.dumps(VGG16_SHAPES)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return prefix


def checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(path.parent.glob(path.name + ".*"))


def warm(files: list[Path]) -> None:
    """Read every byte once so both readers start from the page cache."""
    for file in files:
        with open(file, "rb") as handle:
            while handle.read(64 << 20):
                pass


def run_child(python: str, code: str, path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([python, "-c", code, str(path)], capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{python} failed reading {path}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def measure(label: str, path: Path, readers: dict[str, tuple[str, str]], repeats: int) -> list[dict]:
    files = checkpoint_files(path)
    size = sum(f.stat().st_size for f in files)
    warm(files)
    runs: dict[str, list[dict]] = {name: [] for name in readers}
    for _ in range(repeats):
        for name, (python, code) in readers.items():
            runs[name].append(run_child(python, code, path))
    fingerprints = {name: {r["fingerprint"] for r in results} for name, results in runs.items()}
    if len({frozenset(f) for f in fingerprints.values()}) != 1 or any(len(f) != 1 for f in fingerprints.values()):
        raise SystemExit(f"{label}: readers disagree on the tensor contents: {fingerprints}")
    rows = []
    for name, results in runs.items():
        seconds = [r["seconds"] for r in results]
        growth = max(r["peak_rss"] - r["rss_before"] for r in results)
        rows.append({
            "checkpoint": label, "reader": name, "size": size, "median_s": statistics.median(seconds),
            "best_s": min(seconds), "peak_rss": max(r["peak_rss"] for r in results), "growth": growth,
            "tensors": results[0]["tensors"],
        })
    return rows


def print_table(rows: list[dict]) -> None:
    mib = 1 << 20
    header = f"{'checkpoint':<22} {'reader':<11} {'tensors':>7} {'size MiB':>9} {'median s':>9} {'best s':>7} " \
             f"{'MiB/s':>7} {'peak RSS MiB':>13} {'RSS growth MiB':>15} {'growth/size':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['checkpoint']:<22} {r['reader']:<11} {r['tensors']:>7} {r['size'] / mib:>9.1f} "
              f"{r['median_s']:>9.3f} "
              f"{r['best_s']:>7.3f} {r['size'] / mib / r['median_s']:>7.0f} {r['peak_rss'] / mib:>13.0f} "
              f"{r['growth'] / mib:>15.0f} {r['growth'] / r['size']:>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tf_python", help="python of a TensorFlow venv (enables the TF reader and TF writer)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--v1", action="store_true", help="also measure a V1 copy written by slimtune")
    parser.add_argument("--workdir", help="where to build the checkpoint (default: a temporary directory)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    workdir.mkdir(parents=True, exist_ok=True)
    readers = {"slimtune": (SLIMTUNE_PYTHON, _SLIMTUNE_CHILD)}
    if args.tf_python:
        readers["tensorflow"] = (args.tf_python, _TF_CHILD)
    try:
        rows = []
        if args.tf_python:
            v2 = build_with_tf(args.tf_python, workdir / "v2" / "vgg_16.ckpt")
            label = "V2 (TF-written)"
        else:
            v2 = build_in_subprocess(workdir / "v2" / "vgg_16.ckpt", 2)
            label = "V2 (slimtune-written)"
        rows += measure(label, v2, readers, args.repeats)
        if args.v1:
            v1 = build_in_subprocess(workdir / "v1" / "vgg_16.ckpt", 1)
            rows += measure("V1 (slimtune-written)", v1, readers, args.repeats)
        print_table(rows)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
