"""Elastic restarts: under `torchrun --max_restarts`, a worker killed mid-run makes torchrun restart the
job, which resumes from the last checkpoint and finishes (CPU, gloo). Slow: it runs real jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 40


def _children(pid: int) -> list[int]:
    """Direct children of a process, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _slimtune_workers(agent: int) -> list[int]:
    workers = []
    for child in _children(agent):
        try:
            if b"slimtune.cli" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
        except OSError:
            continue
    return workers


def _command(train_dir: Path, max_restarts: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--max_restarts", str(max_restarts), "-m", "slimtune.cli", "train", "--model_name", "lenet",
            "--dataset_name", "digits", "--train_dir", str(train_dir), "--max_number_of_steps", str(STEPS),
            "--batch_size", "8", "--num_workers", "0", "--optimizer", "sgd", "--learning_rate", "0.01",
            "--save_every_n_steps", "5", "--log_every_n_steps", "5"]


@pytest.mark.slow
def test_a_killed_worker_restarts_the_job_from_the_last_checkpoint(tmp_path):
    train_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(_command(train_dir, max_restarts=3), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env)
    try:
        deadline = time.monotonic() + 600
        while not list(train_dir.glob("model.ckpt-1[05].safetensors")):
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint at step 10 or 15 in time"
            time.sleep(0.2)
        saved_before_kill = max(int(p.name.split("-")[1].split(".")[0]) for p in train_dir.glob("model.ckpt-*.safetensors"))
        assert saved_before_kill < STEPS
        workers = _slimtune_workers(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)  # rank 1 dies without a word, as an OOM kill would
        out, err = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err[-3000:]
    assert "Resumed from model.ckpt-" in err  # the restarted workers picked up the last checkpoint
    final = load_file(str(train_dir / f"model.ckpt-{STEPS}.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())


@pytest.mark.slow
def test_without_restarts_a_killed_worker_fails_the_job(tmp_path):
    train_dir = tmp_path / "run"
    job = subprocess.Popen(_command(train_dir, max_restarts=0), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.monotonic() + 600
        while not list(train_dir.glob("model.ckpt-*.safetensors")):
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(_slimtune_workers(job.pid)[1], signal.SIGKILL)
        job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert not (train_dir / f"model.ckpt-{STEPS}.safetensors").exists()
