"""Rerunning in a train_dir: what is resumed, what starts fresh, what is said; runs that describe themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slimtune.checkpoint import train_dir as ckpt
from slimtune.cli import main
from slimtune.config import TrainConfig
from slimtune.errors import TrainingDiverged
from slimtune.train.loop import train


def _config(train_dir: Path, **overrides) -> TrainConfig:
    settings = dict(model_name="lenet", dataset_name="digits", train_dir=str(train_dir), batch_size=32,
                    optimizer="adam", learning_rate=1e-3, learning_rate_decay_type="fixed", weight_decay=0.0,
                    num_workers=0, log_every_n_steps=2, save_summaries_secs=1e9, save_interval_secs=1e9,
                    max_number_of_steps=4)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_phase_two_with_another_optimizer_and_scopes_resumes_weights_and_step(tmp_path, capsys):
    first = train(_config(tmp_path))
    phase1 = ckpt.load_state(ckpt.latest_checkpoint(tmp_path))
    assert phase1["optimizer_name"] == "adam" and len(phase1["trainable"]) == 8
    capsys.readouterr()
    second = train(_config(tmp_path, optimizer="momentum", trainable_scopes="LeNet/fc4", max_number_of_steps=6))
    err = capsys.readouterr().err
    assert second.step == 6
    assert ("Resumed from model.ckpt-4.safetensors at step 4; the optimizer state starts fresh "
            "(it was adam, now momentum)") in err
    assert "Settings changed since the run that saved this train_dir: optimizer 'adam' -> 'momentum', " \
           "trainable_scopes None -> 'LeNet/fc4'" in err
    # The weights went on from phase 1's: frozen layers are exactly phase 1's.
    a, b = (ckpt.load_state(ckpt.latest_checkpoint(tmp_path)), None)
    with safe_open(str(first.checkpoint), "pt") as old, safe_open(str(second.checkpoint), "pt") as new:
        assert torch.equal(old.get_tensor("LeNet.conv1.weight"), new.get_tensor("LeNet.conv1.weight"))
        assert not torch.equal(old.get_tensor("LeNet.fc4.weight"), new.get_tensor("LeNet.fc4.weight"))
    assert a["optimizer_name"] == "momentum" and a["trainable"] == ["LeNet.fc4.bias", "LeNet.fc4.weight"]
    # Same scopes, other trainable set again: phase 3 back to everything also starts fresh, no traceback.
    third = train(_config(tmp_path, optimizer="momentum", max_number_of_steps=7))
    assert third.step == 7 and "the trainable tensors changed: 2 before, 8 now" in capsys.readouterr().err


def test_a_failed_rerun_keeps_the_config_of_the_run_that_succeeded(tmp_path):
    train(_config(tmp_path))
    good = (tmp_path / "config.yaml").read_text()
    with pytest.raises(TrainingDiverged, match=r"the loss became NaN or infinite at step \d+ .*lower --learning_rate"):
        train(_config(tmp_path, learning_rate=1e30, optimizer="sgd", max_number_of_steps=8))
    assert (tmp_path / "config.yaml").read_text() == good
    assert ckpt.latest_checkpoint(tmp_path).step == 4  # nothing diverged was saved


def test_a_finished_run_rerun_says_it_is_at_its_last_step(tmp_path, capsys):
    train(_config(tmp_path))
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    result = train(_config(tmp_path))
    assert result.step == 4
    assert f"{tmp_path} is already at step 4, the last step of this run (of 4): nothing to train" in \
        capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # features needs only the run's checkpoint: net, classes, size and preprocessing are recorded.
    from PIL import Image
    import numpy as np

    image = tmp_path.parent / "digit.png"
    Image.fromarray((np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)).save(image)
    out = tmp_path.parent / "features.npy"
    assert main(["features", str(image), "--checkpoint_path", str(tmp_path), "--endpoint", "fc3",
                 "--output", str(out), "--device", "cpu"]) == 0
    assert np.load(out, allow_pickle=False).shape == (1, 1024)


def test_step_lines_reach_stderr_when_it_is_not_a_terminal(tmp_path, capsys):
    train(_config(tmp_path, max_number_of_steps=4))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2", "step 4"]
    assert all(" images/s, lr 0.001" in line and ", loss " not in line and "loss " in line for line in lines)


CUSTOM_NET = '''
import torch
from torch import nn

def tiny(num_classes, **kwargs):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

tiny.default_image_size = 32
tiny.preprocessing = "cifarnet"
'''


def test_a_custom_net_checkpoint_alone_is_enough_for_eval_and_predict(tmp_path, cats_vs_dogs, capsys, monkeypatch):
    net_file = tmp_path / "nets" / "my_net.py"
    net_file.parent.mkdir()
    net_file.write_text(CUSTOM_NET)
    monkeypatch.chdir(net_file.parent)  # a relative spec: the checkpoint must record the absolute path
    run = tmp_path / "run"
    assert main(["train", "--model_name", "my_net.py:tiny", "--dataset_dir", str(cats_vs_dogs), "--train_dir",
                 str(run), "--max_number_of_steps", "2", "--batch_size", "4", "--num_workers", "0"]) == 0
    with safe_open(str(run / "model.ckpt-2.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta["model"] == f"{net_file.resolve()}:tiny" and meta["num_classes"] == "2"
    assert json.loads(meta["class_names"]) == ["cat", "dog"] and meta["preprocessing"] == "cifarnet"
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["predict", "--checkpoint_path", str(run), str(cats_vs_dogs / "cat" / "cat_0.jpg"),
                 "--format", "json"]) == 0
    prediction = json.loads(capsys.readouterr().out.splitlines()[0])
    assert {label["name"] for label in prediction["labels"]} == {"cat", "dog"}
    assert main(["eval", "--checkpoint_path", str(run), "--dataset_dir", str(cats_vs_dogs),
                 "--dataset_split_name", "train", "--num_workers", "0", "--noreport"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_samples"] == 12


def test_a_wrong_checkpoint_path_says_not_found(tmp_path, capsys):
    assert main(["predict", "--checkpoint_path", str(tmp_path / "nope"), str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"slimtune: error: checkpoint not found: {tmp_path / 'nope'}"
