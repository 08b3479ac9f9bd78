"""`slimtune train`: learning on real data, resuming, determinism, summaries, configs and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimtune import create_model
from slimtune.cli import main
from slimtune.config import TrainConfig, build_config
from slimtune.errors import ConfigError
from slimtune.config import EvalConfig
from slimtune.evaluate.run import evaluate_checkpoint
from slimtune.train.loop import train


def lenet_config(train_dir: Path, **overrides) -> TrainConfig:
    settings = dict(model_name="lenet", dataset_name="digits", train_dir=str(train_dir), batch_size=32,
                    optimizer="adam", learning_rate=1e-3, learning_rate_decay_type="fixed", weight_decay=0.0,
                    num_workers=0, log_every_n_steps=5, save_summaries_secs=1e9, save_interval_secs=1e9)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_lenet_on_bundled_digits_reaches_95_percent(tmp_path):
    result = train(lenet_config(tmp_path, max_number_of_steps=150))
    assert result.step == 150 and result.checkpoint.name == "model.ckpt-150.safetensors"
    results = evaluate_checkpoint(EvalConfig(checkpoint_path=str(tmp_path), dataset_name="digits",
                                             dataset_split_name="test", num_workers=0, report=False))
    assert results["num_samples"] == 355
    assert results["Accuracy"] >= 0.95
    written = json.loads(Path(results["results_file"]).read_text())
    assert written["Accuracy"] == pytest.approx(results["Accuracy"])
    assert Path(results["results_file"]).parent == tmp_path  # beside the checkpoint


def test_deterministic_cpu_runs_repeat_bit_for_bit(tmp_path):
    runs = [train(lenet_config(tmp_path / f"run{i}", max_number_of_steps=6, deterministic=True, seed=7))
            for i in range(2)]
    a, b = (load_file(str(r.checkpoint)) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train(lenet_config(tmp_path / "other", max_number_of_steps=6, deterministic=True, seed=8))
    c = load_file(str(other.checkpoint))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_train_dir_of_another_network_is_refused(tmp_path):
    train(lenet_config(tmp_path, max_number_of_steps=2))
    with pytest.raises(ConfigError, match="holds a checkpoint of lenet"):
        train(lenet_config(tmp_path, model_name="cifarnet", max_number_of_steps=2))


def test_trainable_scopes_freeze_everything_else(tmp_path):
    result = train(lenet_config(tmp_path, max_number_of_steps=3, trainable_scopes="LeNet/fc4", seed=1))
    weights = load_file(str(result.checkpoint))
    torch.manual_seed(1)  # the trainer builds the net right after seeding with --seed
    fresh = create_model("lenet", num_classes=10).state_dict()
    assert torch.equal(weights["LeNet.conv1.weight"], fresh["LeNet.conv1.weight"])
    assert torch.equal(weights["LeNet.fc3.weight"], fresh["LeNet.fc3.weight"])
    assert not torch.equal(weights["LeNet.fc4.weight"], fresh["LeNet.fc4.weight"])
    with pytest.raises(ConfigError, match="LeNet/fc5"):  # a scope that matches nothing names the nearest
        train(lenet_config(tmp_path / "typo", max_number_of_steps=1, trainable_scopes="LeNet/fc5"))


def test_summaries_config_and_labels_are_written(tmp_path):
    train(lenet_config(tmp_path, max_number_of_steps=5, save_summaries_secs=0.0))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "images": 0}).Reload()
    assert {"losses/total_loss", "learning_rate", "train/accuracy"} <= set(events.Tags()["scalars"])
    assert "inputs" in events.Tags()["images"]
    assert any(tag.startswith("weights/LeNet.conv1") for tag in events.Tags()["histograms"])
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["settings"]["optimizer"] == "adam" and saved["settings"]["label_smoothing"] == 0.0
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["resolved"]["num_samples"] == 1442
    assert (tmp_path / "labels.txt").read_text().splitlines()[:2] == ["0:0", "1:1"]


def test_yaml_recipe_with_flags_overriding(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name: lenet\ndataset_name: digits\nbatch-size: 16\noptimizer: sgd\n"
                      "learning_rate: 0.05\nnum_workers: 0\n")
    config = build_config(TrainConfig, {"config": str(recipe), "optimizer": "momentum"})
    assert (config.batch_size, config.optimizer, config.learning_rate) == (16, "momentum", 0.05)
    assert main(["train", "--config", str(recipe), "--train_dir", str(tmp_path / "run"),
                 "--max-number-of-steps", "3", "--learning_rate", "0.01"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["settings"]
    assert saved["batch_size"] == 16 and saved["learning_rate"] == 0.01
    recipe.write_text("model_name: lenet\nbatch_sise: 16\n")
    with pytest.raises(ConfigError, match="unknown setting 'batch_sise'"):
        build_config(TrainConfig, {"config": str(recipe)})


def test_too_small_dataset_and_missing_model_are_one_line_errors(tmp_path, cats_vs_dogs, capsys):
    assert main(["train", "--model_name", "lenet", "--dataset_dir", str(cats_vs_dogs), "--batch_size", "64",
                 "--train_dir", str(tmp_path / "r")]) == 2
    assert "fewer than one batch" in capsys.readouterr().err
    assert main(["train", "--dataset_name", "digits", "--train_dir", str(tmp_path / "r2")]) == 2
    assert "--model_name is required" in capsys.readouterr().err


def test_freeze_batch_norm_keeps_moving_statistics(tmp_path, cats_vs_dogs):
    result = train(TrainConfig(model_name="mobilenet_v1_025", dataset_dir=str(cats_vs_dogs), train_dir=str(tmp_path),
                               train_image_size=64, batch_size=4, max_number_of_steps=2, num_workers=0,
                               optimizer="sgd", learning_rate=0.1, freeze_batch_norm=True,
                               save_summaries_secs=1e9))
    weights = load_file(str(result.checkpoint))
    torch.manual_seed(0)
    fresh = create_model("mobilenet_v1_025", num_classes=2).state_dict()
    statistics = [name for name in fresh if name.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(weights[name], fresh[name]) for name in statistics)
    assert not torch.equal(weights["MobilenetV1.Conv2d_0.weight"], fresh["MobilenetV1.Conv2d_0.weight"])


def test_a_misspelt_split_is_refused_before_anything_is_written(tmp_path, cats_vs_dogs, capsys):
    import shutil
    for split in ("train", "validation"):
        shutil.copytree(cats_vs_dogs, tmp_path / "pets" / split)
    train_dir = tmp_path / "run"
    assert main(["train", "--model_name", "lenet", "--dataset_dir", str(tmp_path / "pets"), "--dataset_split_name",
                 "trian", "--train_dir", str(train_dir), "--max_number_of_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "no split 'trian' (did you mean train?); its splits are train, validation" in err
    assert "Traceback" not in err and not (train_dir / "labels.txt").exists()


def test_amp_runs_in_bfloat16_on_cpu_and_still_trains(tmp_path):
    plain = train(lenet_config(tmp_path / "fp32", max_number_of_steps=3, deterministic=True))
    mixed = train(lenet_config(tmp_path / "amp", max_number_of_steps=3, deterministic=True, amp=True))
    a, b = load_file(str(plain.checkpoint)), load_file(str(mixed.checkpoint))
    assert all(t.dtype == torch.float32 for t in b.values())  # master weights stay float32
    # Autocast really ran (bfloat16 matmuls change the numbers) and the run still trained sensibly.
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=5e-2) for k in a)
    assert math.isfinite(mixed.last_loss)
