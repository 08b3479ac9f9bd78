"""Multi-process training with torchrun (DDP on the gloo backend, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file


@pytest.mark.slow
def test_torchrun_two_processes_train_and_save_one_checkpoint(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "slimtune.cli", "train",
               "--model_name", "lenet", "--dataset_name", "digits", "--train_dir", str(tmp_path),
               "--max_number_of_steps", "8", "--num_workers", "0", "--optimizer", "adam", "--learning_rate", "0.001",
               "--log_every_n_steps", "4"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    summaries = [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["step"] == 8  # printed by rank 0 only
    weights = load_file(str(tmp_path / "model.ckpt-8.safetensors"))
    assert "LeNet.fc4.weight" in weights  # saved unwrapped: no 'module.' prefix
    config = (tmp_path / "config.yaml").read_text()
    assert "world_size: 2" in config
