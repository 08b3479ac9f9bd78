"""Stop signals during training: a real signal, a checkpoint at a step boundary, a bit-identical resume."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtune.checkpoint import train_dir as ckpt
from slimtune.config import TrainConfig
from slimtune.train.loop import train
from slimtune.train.signals import TrainingInterrupted


def _config(train_dir: Path, **overrides) -> TrainConfig:
    settings = dict(model_name="lenet", dataset_name="digits", train_dir=str(train_dir), batch_size=32,
                    optimizer="adam", learning_rate=1e-3, learning_rate_decay_type="fixed", weight_decay=0.0,
                    num_workers=0, log_every_n_steps=5, save_summaries_secs=1e9, save_interval_secs=1e9,
                    deterministic=True, max_number_of_steps=12)
    settings.update(overrides)
    return TrainConfig(**settings)


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


class _SignalWhenLogged(logging.Handler):
    """Sends a real signal to this process when the trainer logs a given step line."""

    def __init__(self, prefix: str, signum: int) -> None:
        super().__init__()
        self.prefix, self.signum = prefix, signum

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            os.kill(os.getpid(), self.signum)


def test_sigterm_saves_the_step_boundary_and_the_resumed_run_is_bit_identical(tmp_path):
    straight = train(_config(tmp_path / "straight"))
    handler = _SignalWhenLogged("step 5:", signal.SIGTERM)
    logger = logging.getLogger("slimtune.train")
    logger.addHandler(handler)
    try:
        with pytest.raises(TrainingInterrupted) as raised:
            train(_config(tmp_path / "resumed"))
    finally:
        logger.removeHandler(handler)
    assert raised.value.signum == signal.SIGTERM and not raised.value.immediate
    saved = ckpt.latest_checkpoint(tmp_path / "resumed")
    assert saved.step == 5 and ckpt.load_state(saved)["step"] == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer put the handler back
    resumed = train(_config(tmp_path / "resumed"))
    assert resumed.step == 12
    assert _same_weights(straight.checkpoint, resumed.checkpoint)


class _TwoSignalsWhenLogged(_SignalWhenLogged):
    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            os.kill(os.getpid(), self.signum)
            os.kill(os.getpid(), self.signum)


def test_a_second_signal_stops_at_once_without_saving(tmp_path, capsys):
    train(_config(tmp_path, max_number_of_steps=4, log_every_n_steps=2, save_every_n_steps=2))
    handler = _TwoSignalsWhenLogged("step 6:", signal.SIGHUP)
    logger = logging.getLogger("slimtune.train")
    logger.addHandler(handler)
    try:
        with pytest.raises(TrainingInterrupted) as raised:
            train(_config(tmp_path, max_number_of_steps=12, log_every_n_steps=2, save_every_n_steps=8))
    finally:
        logger.removeHandler(handler)
    assert raised.value.immediate and raised.value.signum == signal.SIGHUP
    assert ckpt.latest_checkpoint(tmp_path).step == 4  # nothing saved at step 6
    assert ("Stopped by a second SIGHUP without saving; the last checkpoint (model.ckpt-4.safetensors) is intact"
            in capsys.readouterr().err)


# ---- real processes, signalled from outside at an arbitrary moment (slow: three runs each) ----

def _command(train_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "slimtune.cli", "train", "--model_name", "lenet", "--dataset_name", "digits",
            "--train_dir", str(train_dir), "--max_number_of_steps", str(steps), "--num_workers", "0",
            "--optimizer", "adam", "--learning_rate", "0.001", "--learning_rate_decay_type", "fixed",
            "--log_every_n_steps", "5", "--save_interval_secs", "1e9", "--save_summaries_secs", "1e9",
            "--deterministic"]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


STEPS = 60


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    train_dir = tmp_path_factory.mktemp("straight")
    finished = subprocess.run(_command(train_dir, STEPS), capture_output=True, text=True, env=_env(), timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    return train_dir / f"model.ckpt-{STEPS}.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signalled_cli_run_resumes_to_the_same_weights(tmp_path, straight_run, signum):
    process = subprocess.Popen(_command(tmp_path, STEPS), stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env=_env())
    seen = []
    for line in process.stderr:  # step lines reach stderr because it is not a terminal
        seen.append(line)
        if line.startswith("step 10:"):
            process.send_signal(signum)
            break
    _, rest = process.communicate(timeout=600)
    stderr = "".join(seen) + rest
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr
    name = signal.Signals(signum).name
    assert f"Interrupted by {name}: saved model.ckpt-" in stderr
    saved = ckpt.latest_checkpoint(tmp_path)
    assert 10 <= saved.step < STEPS  # stopped mid-run, at the boundary after the signal
    assert f"saved model.ckpt-{saved.step}.safetensors at step {saved.step}" in stderr
    again = subprocess.run(_command(tmp_path, STEPS), capture_output=True, text=True, env=_env(), timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"Resumed from model.ckpt-{saved.step}.safetensors at step {saved.step}" in again.stderr
    assert _same_weights(straight_run, tmp_path / f"model.ckpt-{STEPS}.safetensors")


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_saves_and_resumes(tmp_path, straight_run):
    # SLURM's SIGTERM (and a terminal's Ctrl-C) reaches the DataLoader workers too; only the main
    # process acts on it (workers killed by SIGTERM failed the next batch before the save). The loader's per-sample seeding makes worker count irrelevant to the result.
    command = [*_command(tmp_path, STEPS)]
    command[command.index("--num_workers") + 1] = "2"
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(),
                               start_new_session=True)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("step 10:"):
            os.killpg(process.pid, signal.SIGTERM)
            break
    _, rest = process.communicate(timeout=600)
    stderr = "".join(seen) + rest
    assert process.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    saved = ckpt.latest_checkpoint(tmp_path)
    assert 10 <= saved.step < STEPS
    again = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _same_weights(straight_run, tmp_path / f"model.ckpt-{STEPS}.safetensors")
