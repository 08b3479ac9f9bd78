"""Multi-process training with torchrun (DDP on the gloo backend, CPU) against a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtune.train.loop import _EndpointsForward, _forward

SRC = str(Path(__file__).resolve().parents[1] / "src")

# No dropout and no BatchNorm: with them each process draws its own masks / batch statistics, and
# the two runs could not be compared. What is compared is the gradient averaging itself.
PLAIN_NET = '''
from torch import nn

def plain(num_classes, **kwargs):
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

plain.default_image_size = 28
plain.preprocessing = "lenet"
'''


def _train_command(net: Path, train_dir: Path, batch_size: int, processes: int) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                 "--master_port", str(29500 + os.getpid() % 1000)] if processes > 1 else [sys.executable])
    return [*launcher, "-m", "slimtune.cli", "train", "--model_name", f"{net}:plain", "--dataset_name", "digits",
            "--train_dir", str(train_dir), "--max_number_of_steps", "6", "--batch_size", str(batch_size),
            "--num_workers", "0", "--optimizer", "sgd", "--learning_rate", "0.5", "--weight_decay", "0",
            "--learning_rate_decay_type", "fixed", "--log_every_n_steps", "3", "--deterministic",
            "--nochannels_last"]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    net = tmp_path / "plain_net.py"
    net.write_text(PLAIN_NET)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    two = subprocess.run(_train_command(net, tmp_path / "two", 16, 2), capture_output=True, text=True, env=env,
                         timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    summaries = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["step"] == 6  # printed by rank 0 only
    assert "world_size: 2" in (tmp_path / "two" / "config.yaml").read_text()
    one = subprocess.run(_train_command(net, tmp_path / "one", 32, 1), capture_output=True, text=True, env=env,
                         timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(str(tmp_path / "two" / "model.ckpt-6.safetensors"))
    b = load_file(str(tmp_path / "one" / "model.ckpt-6.safetensors"))
    assert a.keys() == b.keys() and not any(k.startswith("module.") for k in a)  # saved unwrapped
    # Without gradient averaging rank 0 would have stepped on its half batch only (lr 0.5, 6 steps):
    # far outside this tolerance.
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), (name, (a[name] - b[name]).abs().max())


def test_ddp_runs_the_same_forward_as_one_process():
    # End points (aux heads) come through the wrapper DDP gets, exactly as without it.
    from slimtune import create_model

    torch.manual_seed(0)
    model = create_model("lenet", num_classes=10).eval()
    images = torch.randn(2, 1, 28, 28)
    logits, end_points = _forward(model, images)
    wrapped_logits, wrapped_points = _EndpointsForward(model)(images)
    assert torch.equal(logits, wrapped_logits) and list(end_points) == list(wrapped_points)
    assert "Logits" in wrapped_points
