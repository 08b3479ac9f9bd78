"""Resuming a run at another world size: checkpointed by 4 processes, resumed by 2 and by 1.

The global batch (processes x --batch_size) and each epoch's images belong to the run: the same
command rerun with fewer processes scales --batch_size so the global batch stays, and continues at
the same global step and sample position. Checked against the uninterrupted 4-process run by the
images each step trained on (a net that records a hash of every training image it sees) and by
the final weights. The weights agree to float rounding, not bit for bit: the same gradient is
summed in another order (4 partial means averaged by all-reduce vs. 2, vs. one mean of 16).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtune.checkpoint.state_file import STATE_FILENAME, format_state
from slimtune.errors import ConfigError
from slimtune.train.distributed import (
    check_even_epoch,
    epoch_samples,
    resume_batch_size,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")

RECORDING_NET = '''
import hashlib
import os

from torch import nn


class Recording(nn.Module):
    """A small convnet without dropout or BatchNorm (nothing drawn per process) that appends
    'step image-hash' for every training image it sees to $SAMPLE_LOG_DIR/rank<RANK>.txt."""

    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
        self.step = 0

    def set_training_step(self, step):
        self.step = step

    def forward(self, images):
        if self.training and os.environ.get("SAMPLE_LOG_DIR"):
            path = os.path.join(os.environ["SAMPLE_LOG_DIR"], "rank" + os.environ.get("RANK", "0") + ".txt")
            with open(path, "a") as log:
                for image in images:
                    digest = hashlib.sha1(image.detach().contiguous().numpy().tobytes()).hexdigest()[:16]
                    log.write(f"{self.step} {digest}\\n")
        return self.body(images)


def recording(num_classes, **kwargs):
    return Recording(num_classes)


recording.default_image_size = 28
recording.preprocessing = "lenet"
'''

# digits' train split has 1442 images: 4 processes use 1440 per epoch, 90 steps of 16. One process
# alone would make an epoch of 1442 images (91 steps): the resumed run must keep the 4-process epoch.
CHECKPOINT_STEP, FINAL_STEP = 88, 94


def _command(net: Path, train_dir: Path, processes: int) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    return [*launcher, "-m", "slimtune.cli", "train", "--model_name", f"{net}:recording", "--dataset_name", "digits",
            "--train_dir", str(train_dir), "--max_number_of_steps", str(FINAL_STEP), "--batch_size", "4",
            "--num_workers", "0", "--optimizer", "sgd", "--learning_rate", "0.1", "--learning_rate_decay_type",
            "fixed", "--save_every_n_steps", str(CHECKPOINT_STEP), "--log_every_n_steps", "2", "--deterministic",
            "--nochannels_last", "--save_summaries_secs", "1e9"]


def _run(command: list[str], log_dir: Path) -> subprocess.CompletedProcess:
    log_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "SAMPLE_LOG_DIR": str(log_dir)}
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _images_by_step(log_dir: Path) -> dict[int, Counter]:
    steps: dict[int, Counter] = {}
    for path in log_dir.glob("rank*.txt"):
        for line in path.read_text().splitlines():
            step, digest = line.split()
            steps.setdefault(int(step), Counter())[digest] += 1
    return steps


def _checkpointed_copy(source: Path, target: Path, step: int) -> Path:
    """A train_dir as the 4-process run left it at `step` (as if it had stopped there)."""
    shutil.copytree(source, target)
    for path in target.glob("model.ckpt-*"):
        if not path.name.startswith(f"model.ckpt-{step}."):
            path.unlink()
    (target / STATE_FILENAME).write_text(format_state(f"model.ckpt-{step}.safetensors", []))
    return target


@pytest.mark.slow
def test_a_four_process_checkpoint_resumes_with_two_and_with_one(tmp_path):
    net = tmp_path / "recording_net.py"
    net.write_text(RECORDING_NET)
    _run(_command(net, tmp_path / "four", 4), tmp_path / "log_four")
    uninterrupted = _images_by_step(tmp_path / "log_four")
    assert sorted(uninterrupted) == list(range(FINAL_STEP))
    final = load_file(str(tmp_path / "four" / f"model.ckpt-{FINAL_STEP}.safetensors"))

    for processes in (2, 1):
        train_dir = _checkpointed_copy(tmp_path / "four", tmp_path / f"resumed_{processes}", CHECKPOINT_STEP)
        log_dir = tmp_path / f"log_{processes}"
        done = _run(_command(net, train_dir, processes), log_dir)
        assert "global batch of 16" in done.stderr and f"--batch_size {16 // processes} per process" in done.stderr
        summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
        assert summary["step"] == FINAL_STEP
        resumed = _images_by_step(log_dir)
        # The same global steps, each on the same 16 images (epoch 0's last two steps, then epoch 1's first).
        assert sorted(resumed) == list(range(CHECKPOINT_STEP, FINAL_STEP))
        for step in resumed:
            assert resumed[step] == uninterrupted[step], step
            assert sum(resumed[step].values()) == 16
        weights = load_file(str(train_dir / f"model.ckpt-{FINAL_STEP}.safetensors"))
        for name in final:
            torch.testing.assert_close(weights[name], final[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_same_command_with_fewer_processes_keeps_the_global_batch():
    assert resume_batch_size((4, 8, 1440), 8, 4, "run") == (8, None)
    assert resume_batch_size((4, 8, 1440), 8, 2, "run")[0] == 16      # the command rerun as it was
    assert resume_batch_size((4, 8, 1440), 32, 1, "run")[0] == 32     # or with the new share given
    batch, line = resume_batch_size((4, 8, 1440), 8, 1, "run")
    assert batch == 32 and "global batch of 32" in line
    assert resume_batch_size((2, 8, 1440), 8, 4, "run")[0] == 4       # more processes: a smaller share


def test_a_world_size_that_cannot_keep_the_global_batch_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"global batch of 32 \(4 processes x 8\), which 3 processes cannot "
                                          r"split evenly: resume with 1, 2, 4, 8, 16 or 32 processes") as caught:
        resume_batch_size((4, 8, 1440), 8, 3, "run")
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"--batch_size 5 with 2 processes would make it 10: pass --batch_size 16"):
        resume_batch_size((4, 8, 1440), 5, 2, "run")


def test_an_epoch_keeps_its_images_and_steps_across_world_sizes():
    from slimtune.data.loader import EpochSampler

    samples = epoch_samples(1442, 4)
    assert samples == 1440
    def global_batch(world_size: int, batch: int, step: int) -> list[int]:
        # What the ranks of `world_size` read at `step`: each skips `step` of its batches.
        taken = []
        for rank in range(world_size):
            sampler = EpochSampler(1442, shuffle=True, seed=3, rank=rank, world_size=world_size,
                                   drop_last=world_size > 1, epoch_size=samples)
            sampler.set_epoch(0, step * batch)
            taken += [index for _, index in sampler][:batch]
        return sorted(taken)

    for step in (0, 7, 89):
        assert global_batch(4, 4, step) == global_batch(2, 8, step) == global_batch(1, 16, step)
    assert len(EpochSampler(1442, True, 3, epoch_size=samples)) == 1440
    check_even_epoch(1440, 8, 2)
    with pytest.raises(ConfigError, match="does not split into equal steps over 4 processes"):
        check_even_epoch(1442, 2, 4)
