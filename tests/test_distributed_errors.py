"""Bad input under DDP: every rank stops with the same one line, none waits forever; a rank that
stops answering is named. The ranks are started the way torchrun (or srun) starts them, each with
its own stderr, and gloo on CPU."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ddp_support import launch_ranks

from slimtune.cli import main
from slimtune.errors import DataError, SlimtuneError
from slimtune.runtime import Runtime
from slimtune.train.distributed import (
    DistributedError,
    agree_on_setup,
    lost_ranks_error,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")

# A small net whose ranks misbehave on request: $FAIL_ON_RANK fails while the net is built (as a
# rank whose node holds other data would), $STALL_ON_RANK stops answering at step 2, $UNUSED_LAYER
# adds a trainable layer the loss never reaches.
MISBEHAVING_NET = '''
import os
import time

from torch import nn

from slimtune.errors import DataError


def _this_rank(variable):
    return os.environ.get(variable) is not None and os.environ.get(variable) == os.environ.get("RANK")


class Misbehaving(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, num_classes))
        if os.environ.get("UNUSED_LAYER"):
            self.unused = nn.Linear(8, 8)  # trainable, never reached by the loss
        self.step = 0

    def set_training_step(self, step):
        self.step = step

    def forward(self, images):
        if self.training and self.step == 2 and _this_rank("STALL_ON_RANK"):
            time.sleep(float(os.environ.get("STALL_SECONDS", "20")))
        return self.body(images)


def misbehaving(num_classes, **kwargs):
    if _this_rank("FAIL_ON_RANK"):
        raise DataError("labels.txt on this node lists 7 classes, the data 10: fix the dataset copy")
    return Misbehaving(num_classes)


misbehaving.default_image_size = 28
misbehaving.preprocessing = "lenet"
'''


def _args(net: Path, train_dir: Path, *extra: str) -> list[str]:
    return ["train", "--model_name", f"{net}:misbehaving", "--dataset_name", "digits", "--train_dir",
            str(train_dir), "--max_number_of_steps", "4", "--batch_size", "4", "--num_workers", "0",
            "--optimizer", "sgd", "--learning_rate", "0.01", "--save_summaries_secs", "1e9", *extra]


@pytest.fixture
def net_file(tmp_path: Path) -> Path:
    path = tmp_path / "misbehaving_net.py"
    path.write_text(MISBEHAVING_NET)
    return path


def _env(**extra: str) -> dict[str, str]:
    return {"PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def _last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_a_rank_failing_while_preparing_stops_every_rank_with_its_line(net_file, tmp_path):
    ranks = launch_ranks(_args(net_file, tmp_path / "run"), 3, _env(FAIL_ON_RANK="1"), timeout=300)
    expected = "slimtune: error: labels.txt on this node lists 7 classes, the data 10: fix the dataset copy"
    for code, _, stderr in ranks:
        assert code == 2, stderr[-2000:]  # exited (None: killed after waiting), as a user error
        assert _last_line(stderr) == expected
        assert "Traceback" not in stderr


@pytest.mark.slow
def test_a_train_dir_of_another_class_count_stops_every_rank_the_same(net_file, tmp_path):
    train_dir = tmp_path / "run"
    assert main(_args(net_file, train_dir, "--num_classes", "12", "--max_number_of_steps", "1")) == 0
    ranks = launch_ranks(_args(net_file, train_dir), 2, _env(), timeout=300)
    lines = {_last_line(stderr) for _, _, stderr in ranks}
    assert [code for code, _, _ in ranks] == [2, 2]
    assert lines == {(f"slimtune: error: train_dir {train_dir} holds a 12-class checkpoint but this run has 10 "
                      f"classes: use another --train_dir")}


@pytest.mark.slow
def test_a_rank_that_stops_responding_is_named(net_file, tmp_path):
    ranks = launch_ranks(_args(net_file, tmp_path / "run", "--distributed_timeout", "4"), 2,
                         _env(STALL_ON_RANK="1", STALL_SECONDS="25"), timeout=300)
    code, _, stderr = ranks[0]
    assert code == 2, stderr[-2000:]
    line = _last_line(stderr)
    assert line.startswith("slimtune: error: rank 1 stopped responding (rank 0 waited at step 2 for "
                           "--distributed_timeout 4 s)"), line
    assert "Traceback" not in stderr


def test_the_missing_rank_is_the_one_that_never_checks_in():
    # In a group of one standing in for a job of three: ranks 1 and 2 never reach the store.
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore(), timeout=timedelta(seconds=5))
    try:
        error = lost_ranks_error(RuntimeError("[gloo] Timed out waiting 4000ms for recv operation to complete"),
                                 Runtime(device=torch.device("cpu"), rank=0, world_size=3),
                                 timeout_secs=4, step=17, grace_secs=0.5)
    finally:
        dist.destroy_process_group()
    assert isinstance(error, DistributedError)
    assert str(error).startswith("ranks 1 and 2 stopped responding (rank 0 waited at step 17 for "
                                 "--distributed_timeout 4 s)")
    assert "\n" not in str(error)


def test_alone_an_error_stays_what_it_was():
    error = DataError("bad")
    runtime = Runtime(device=torch.device("cpu"))
    assert agree_on_setup(runtime, error) is error
    assert agree_on_setup(runtime, None) is None
    assert issubclass(DistributedError, SlimtuneError)  # the CLI prints it as one line, exit status 2


@pytest.mark.slow
def test_a_trainable_tensor_without_gradient_is_named_unless_find_unused_parameters(net_file, tmp_path):
    ranks = launch_ranks(_args(net_file, tmp_path / "refused"), 2, _env(UNUSED_LAYER="1"), timeout=300)
    assert [code for code, _, _ in ranks] == [2, 2]
    assert {_last_line(stderr) for _, _, stderr in ranks} == {
        "slimtune: error: 2 trainable tensors get no gradient from the loss (unused.weight, unused.bias): freeze "
        "them with --trainable_scopes, or pass --find_unused_parameters (slower: it searches the graph every step)"}
    ranks = launch_ranks(_args(net_file, tmp_path / "searched", "--find_unused_parameters"), 2,
                         _env(UNUSED_LAYER="1"), timeout=300)
    assert [code for code, _, _ in ranks] == [0, 0], ranks[0][2][-2000:]
