"""Multi-node training through torchrun's c10d rendezvous, as 2 "nodes" x 2 processes on localhost (gloo).

The same 4-process job launched as one node must train to the same weights: the rendezvous only
decides which process is which rank, and sampling and seeds follow the global rank.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 6


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_args(train_dir: Path) -> list[str]:
    return ["-m", "slimtune.cli", "train", "--model_name", "lenet", "--dataset_name", "digits", "--train_dir",
            str(train_dir), "--max_number_of_steps", str(STEPS), "--batch_size", "8", "--num_workers", "0",
            "--optimizer", "sgd", "--learning_rate", "0.01", "--deterministic"]


@pytest.mark.slow
def test_two_nodes_of_two_processes_train_like_one_node_of_four(tmp_path):
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id",
                               "slimtune-test", *_train_args(tmp_path / "two_nodes")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for node in nodes:
        out, err = node.communicate(timeout=900)
        assert node.returncode == 0, err[-2000:]
    single = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                             *_train_args(tmp_path / "one_node")], capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-2000:]

    assert "world_size: 4" in (tmp_path / "two_nodes" / "config.yaml").read_text()
    two = load_file(str(tmp_path / "two_nodes" / f"model.ckpt-{STEPS}.safetensors"))
    one = load_file(str(tmp_path / "one_node" / f"model.ckpt-{STEPS}.safetensors"))
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6)
