"""`slimtune eval` refuses a checkpoint whose label set is not the data's, before reading an image,
and results of one dataset never overwrite another's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slimtune.cli import main
from slimtune.config import EvalConfig
from slimtune.errors import ConfigError
from slimtune.evaluate import run as eval_run
from slimtune.nets.registry import get_model_spec
from slimtune.checkpoint import train_dir as ckpt

TEN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _checkpoint(train_dir: Path, names: list[str], multi_label: bool = False) -> Path:
    """A lenet checkpoint (untrained weights) recording its label set as training does."""
    model = get_model_spec("lenet").build(len(names))
    metadata = {"model_name": "lenet", "num_classes": str(len(names)), "multi_label": str(multi_label).lower(),
                "class_names": ckpt.metadata_json(names), "image_size": "28", "preprocessing": "lenet"}
    return ckpt.save_checkpoint(train_dir, 3, model, {}, metadata).weights


def _folder(root: Path, classes: list[str], labels_txt: list[str] | None = None) -> Path:
    """dir/<class>/x.png, one small real image per class (pixels from a fixed generator)."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / name / "x.png")
    if labels_txt:
        (root / "labels.txt").write_text("".join(f"{i}:{n}\n" for i, n in enumerate(labels_txt)))
    return root


@pytest.fixture()
def no_evaluation(monkeypatch):
    """Fail the test if evaluation starts: the refusal must come before any image is read."""
    def refuse(*args, **kwargs):
        raise AssertionError("evaluation ran")
    monkeypatch.setattr(eval_run, "evaluate_model", refuse)


def _eval(train_dir: Path, data: Path, **extra) -> dict:
    return eval_run.evaluate_checkpoint(EvalConfig(checkpoint_path=str(train_dir), dataset_dir=str(data),
                                                   dataset_split_name="all", num_workers=0, report=False,
                                                   **extra))


def test_other_class_names_are_refused_naming_both_sets(tmp_path, no_evaluation):
    _checkpoint(tmp_path / "run", TEN)
    data = _folder(tmp_path / "letters", list("abcdefghij"))
    with pytest.raises(ConfigError) as error:
        _eval(tmp_path / "run", data)
    message = str(error.value)
    assert "\n" not in message and "class names differ" in message
    assert "zero, one, two" in message and "a, b, c" in message and "letters" in message
    assert not list((tmp_path / "run").glob("*.eval-*"))


def test_same_names_in_another_order_are_refused(tmp_path, no_evaluation):
    _checkpoint(tmp_path / "run", TEN)
    data = _folder(tmp_path / "shuffled", TEN, labels_txt=TEN[1:] + TEN[:1])
    with pytest.raises(ConfigError, match="class order differs"):
        _eval(tmp_path / "run", data)


def test_another_class_count_is_refused(tmp_path, no_evaluation):
    _checkpoint(tmp_path / "run", TEN)
    data = _folder(tmp_path / "three", ["zero", "one", "two"])
    with pytest.raises(ConfigError, match=r"class count differs.*single-label, 10 classes.*single-label, 3 classes"):
        _eval(tmp_path / "run", data)


def test_multi_label_checkpoint_on_single_label_data_is_refused(tmp_path, no_evaluation, capsys):
    _checkpoint(tmp_path / "run", TEN, multi_label=True)
    data = _folder(tmp_path / "same", TEN)
    with pytest.raises(ConfigError, match=r"task type differs.*trained multi-label.*data is single-label"):
        _eval(tmp_path / "run", data)
    # On the command line: one line, exit status 2.
    status = main(["eval", "--checkpoint_path", str(tmp_path / "run"), "--dataset_dir", str(data),
                             "--dataset_split_name", "all", "--num_workers", "0", "--noreport"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "task type differs" in err


def test_a_manifest_is_read_in_the_checkpoints_task_type(tmp_path, no_evaluation):
    """A single-label checkpoint on a manifest with a several-label line: the line is named."""
    _checkpoint(tmp_path / "run", TEN)
    data = _folder(tmp_path / "m", TEN)
    manifest = data / "list.csv"
    manifest.write_text("path,label\nzero/x.png,zero\none/x.png,one;two\n")
    with pytest.raises(Exception, match=r"list.csv:3: expected one label, found 2"):
        _eval(tmp_path / "run", manifest)


def test_matching_data_evaluates_and_results_of_two_datasets_never_collide(tmp_path):
    _checkpoint(tmp_path / "run", TEN)
    first = _eval(tmp_path / "run", _folder(tmp_path / "a" / "data", TEN, TEN))
    second = _eval(tmp_path / "run", _folder(tmp_path / "b" / "data", TEN, TEN))  # same folder name, other data
    other = _eval(tmp_path / "run", _folder(tmp_path / "digits_again", TEN, TEN))
    files = {Path(r["results_file"]) for r in (first, second, other)}
    assert len(files) == 3 and all(f.is_file() for f in files)
    assert Path(first["results_file"]).name == "model.ckpt-3.eval-data-all.json"
    assert Path(other["results_file"]).name == "model.ckpt-3.eval-digits_again-all.json"
    saved = json.loads(Path(first["results_file"]).read_text())
    assert saved["dataset"]["dir"] == str((tmp_path / "a" / "data").resolve()) and saved["num_samples"] == 10
    # The same dataset again replaces its own results, not another's.
    again = _eval(tmp_path / "run", tmp_path / "a" / "data")
    assert again["results_file"] == first["results_file"]
