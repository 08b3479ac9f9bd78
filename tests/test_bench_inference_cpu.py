"""The inference benchmark's lockstep driver, run with two real runtimes (slimtune eager and
onnxruntime) on a tiny net: every worker is alive at once, each round steps each one once, a worker
that cannot start is left out (here the TF-Slim one: CI has no TensorFlow), and the summary and the
paired ratios are computed from exactly the step times the rounds reported."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_lockstep_rounds_step_every_runtime_and_drop_one_that_fails(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("bench_inference_cpu", None)
    import bench_inference_cpu as bench

    from slimtune.export import export
    from slimtune.nets import create_model

    torch.manual_seed(0)
    model = create_model("cifarnet", num_classes=10)
    weights = tmp_path / "model.ckpt-1.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"model_name": "cifarnet", "num_classes": "10", "format": "slimtune", "step": "1",
                        "image_size": "32"})
    onnx_file = export(str(weights), "onnx", str(tmp_path / "m.onnx"), quiet=True).path
    np.save(tmp_path / "input.npy", np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    args = argparse.Namespace(input=str(tmp_path / "input.npy"), threads=1, min_steps=1, min_seconds=0.01,
                              min_rounds=3, slim_src=str(tmp_path / "no_slim_here"))
    commands = {"eager": bench.worker_command(sys.executable, "eager", str(weights), 2, args),
                "ort-fp32": bench.worker_command(sys.executable, "ort-fp32", str(onnx_file), 2, args),
                "tf-slim": bench.worker_command(sys.executable, "tf-slim", str(tmp_path / "missing.json"), 2, args)}
    records, rounds = bench.run_lockstep(commands, args)

    assert "tf-slim: failed" in capsys.readouterr().out
    assert set(records) == {"eager", "ort-fp32"}
    assert len(rounds) == 3 and all(set(r) == {"eager", "ort-fp32"} for r in rounds)
    for runtime, record in records.items():
        assert record["steps"] == 3 and record["repeats"] >= 1
        assert record["images_per_sec"] == 2 / statistics.median(r[runtime] for r in rounds)
    assert bench.paired_ratio(rounds, "ort-fp32", "eager") == statistics.median(
        r["eager"] / r["ort-fp32"] for r in rounds)
    assert bench.paired_ratio(rounds, "ort-int8", "eager") is None
