"""The GPU training benchmark's code paths, run on the CPU at a tiny size (no GPU here).

It proves the three pipelines (synthetic, slimtune's JPEG loader, JPEG bytes decoded by
torchvision.io.decode_jpeg) feed real training steps and that the table is written; the figures
themselves mean nothing on a CPU and are not checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_every_pipeline_trains_and_the_table_is_written(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("bench_train_gpu", None)
    import bench_train_gpu

    out = tmp_path / "train_gpu.md"
    bench_train_gpu.main(["--nets", "mobilenet_v1_025", "--batch_size", "2", "--image_size", "64", "--steps", "1",
                          "--warmup", "1", "--images", "8", "--workers", "0", "--out", str(out)])
    table = out.read_text(encoding="utf-8")
    assert "CPU (no CUDA: not a GPU figure)" in table
    rows = [line for line in table.splitlines() if line.startswith("| mobilenet_v1_025 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["synthetic", "jpeg-cpu", "jpeg-gpu"]
    assert all(float(row.split("|")[3]) > 0 for row in rows)
