"""Everyday mistakes end in one line (exit 2), never a traceback; evaluation never silently uses training images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimtune.cli import main
from slimtune.config import TrainConfig
from slimtune.errors import ConfigError
from slimtune.train.loop import train

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("slimtune: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0][len("slimtune: error: "):]


def test_eval_during_training_without_a_validation_split_is_refused(tmp_path, cats_vs_dogs, capsys):
    args = ["train", "--model_name", "lenet", "--dataset_dir", str(cats_vs_dogs), "--train_dir", str(tmp_path / "r"),
            "--max_number_of_steps", "2", "--batch_size", "4", "--num_workers", "0", "--eval_every_n_steps", "1"]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert line.startswith("--eval_every_n_steps: the dataset has no split besides the training split 'train'")
    assert "--validation_fraction" in line
    assert not list((tmp_path / "r").glob("model.ckpt-*"))  # refused before training


def test_validation_fraction_holds_out_images_and_names_them(tmp_path, cats_vs_dogs, capsys):
    config = TrainConfig(model_name="lenet", dataset_dir=str(cats_vs_dogs), train_dir=str(tmp_path), batch_size=3,
                         max_number_of_steps=2, num_workers=0, eval_every_n_steps=2, validation_fraction=0.25,
                         save_summaries_secs=1e9)
    train(config)
    err = capsys.readouterr().err
    assert "on 9 images of split 'train'" in err  # 12 - 3 held out
    records = [json.loads(line) for line in (tmp_path / "eval_during_training.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["step"] == 2 and records[0]["num_samples"] == 3
    assert records[0]["images"] == ("3 images held out of split 'train' by --validation_fraction 0.25 "
                                    "(seed 0; not trained on)")
    assert f"eval at step 2 on {records[0]['images']}" in err
    with pytest.raises(ConfigError, match="validation_fraction: 1.0 is out of range"):
        TrainConfig(validation_fraction=1.0)


def test_a_single_class_dataset_is_one_line(tmp_path, cats_vs_dogs, capsys):
    only = tmp_path / "only"
    (only / "cat").mkdir(parents=True)
    for image in (cats_vs_dogs / "cat").iterdir():
        (only / "cat" / image.name).write_bytes(image.read_bytes())
    assert main(["train", "--model_name", "lenet", "--dataset_dir", str(only), "--train_dir", str(tmp_path / "r"),
                 "--max_number_of_steps", "1", "--batch_size", "2", "--num_workers", "0"]) == 2
    assert _one_error_line(capsys).startswith("the dataset has one class (cat): a single-label classifier needs "
                                              "at least two")


@pytest.mark.parametrize("args, message", [
    (["--learning_rate", "-0.5"], "setting learning_rate: -0.5 is out of range (must be > 0)"),
    (["--learning_rate", "nan"], "setting learning_rate: nan is not a finite number"),
    (["--max_number_of_steps", "-3"], "setting max_number_of_steps: -3 is out of range (must be >= 1)"),
])
def test_bad_rates_and_step_counts_are_one_line(capsys, args, message):
    assert main(["train", "--model_name", "lenet", *args]) == 2
    assert _one_error_line(capsys) == message


@pytest.mark.parametrize("workers", [0, 2])
def test_on_bad_image_fail_names_the_file_and_says_empty(tmp_path, cats_vs_dogs, capsys, workers):
    (cats_vs_dogs / "cat" / "empty.jpg").write_bytes(b"")
    assert main(["train", "--model_name", "lenet", "--dataset_dir", str(cats_vs_dogs), "--train_dir",
                 str(tmp_path / "r"), "--max_number_of_steps", "4", "--batch_size", "13", "--num_workers",
                 str(workers), "--on_bad_image", "fail"]) == 2
    assert _one_error_line(capsys) == f"{cats_vs_dogs / 'cat' / 'empty.jpg'}: empty file (0 bytes)"


def test_a_closed_pipe_is_no_traceback():
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "slimtune.cli", "models"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    process.stdout.close()  # the reader goes away before the first line (`| head -0`)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141 and err == b"", err.decode()[-2000:]
