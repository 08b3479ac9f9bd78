"""The network benchmark's lockstep protocol, run with two slimtune workers at a tiny size (the
TF-Slim side needs the separate TensorFlow venv, which CI does not have).

A lockstep worker warms up, reports ready, runs exactly one step per request and reports its time,
and on 'quit' prints the same summary record a sequential run prints: the driver's pair ratios
depend on all of that.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("mode,precision", [("train", "fp32"), ("forward", "bf16")])
def test_lockstep_workers_step_one_at_a_time_and_summarize(monkeypatch, mode, precision):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("bench_nets_cpu", None)
    import bench_nets_cpu

    args = bench_nets_cpu.parse_args(["--threads", "1", "--warmup", "1", "--image_size", "32",
                                      "--precision", precision])
    command = bench_nets_cpu.worker_command(sys.executable, "slimtune", "cifarnet", mode, 2, args)
    workers = [bench_nets_cpu.LockstepWorker(f"w{index}", command, bench_nets_cpu.worker_environment(args))
               for index in range(2)]
    try:
        for worker in workers:
            worker.wait_ready()
        times = [[worker.step() for worker in workers] for _ in range(3)]
        records = [worker.finish() for worker in workers]
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
    assert all(t > 0 for pair in times for t in pair)
    for index, record in enumerate(records):
        assert record["steps"] == 3  # the warm-up step is not counted, each request is one step
        assert record["framework"] == "slimtune" and record["threads"] == 1
        assert record["precision"] == precision
        assert record["median_step_s"] == statistics.median(pair[index] for pair in times)
