"""--moving_average_decay: TF's ExponentialMovingAverage of the weights, saved beside them, used by
eval / predict / export unless --no_moving_average, restored on resume (issue 16, item 2)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from slimtune.checkpoint import train_dir as ckpt
from slimtune.cli import main
from slimtune.config import EvalConfig
from slimtune.data import build_source
from slimtune.evaluate.run import evaluate_checkpoint, evaluate_model
from slimtune.export.prepare import load_source
from slimtune.nets.registry import get_model_spec
from slimtune.train.ema import WeightAverage, decay_at
from slimtune.train.loop import build_model, train
from test_train import lenet_config

DECAY = 0.9  # small, so that averages and raw weights differ clearly after a few steps


def _replay(start: dict[str, torch.Tensor], raw_after_step: list[dict[str, torch.Tensor]], first_step: int,
            names: list[str]) -> dict[str, torch.Tensor]:
    """The issue's formula, step by step in float64: shadow = d_t * shadow + (1 - d_t) * value."""
    shadow = {n: start[n].double() for n in names}
    for offset, raw in enumerate(raw_after_step):
        d = min(DECAY, (1 + first_step + offset) / (10 + first_step + offset))
        shadow = {n: d * shadow[n] + (1 - d) * raw[n].double() for n in names}
    return shadow


def test_decay_warm_up_is_tfs():
    assert decay_at(0.999, 0) == pytest.approx(0.1)
    assert decay_at(0.999, 10) == pytest.approx(11 / 20)
    assert decay_at(0.9, 10**6) == 0.9


def test_averages_are_the_formula_replayed_from_recorded_weights(tmp_path):
    """Every step's raw weights are saved (save_every_n_steps=1); replaying TF's formula over them
    from the initial weights gives the saved averages of every step."""
    config = lenet_config(tmp_path, max_number_of_steps=5, moving_average_decay=DECAY, save_every_n_steps=1,
                          keep_checkpoint_max=10, deterministic=True)
    train(config)
    initial = build_model(get_model_spec("lenet"), 10, config).state_dict()
    names = [n for n in initial if n.endswith(("weight", "bias"))]
    raw = [load_file(str(tmp_path / f"model.ckpt-{s}.safetensors")) for s in range(1, 6)]
    for step in (1, 3, 5):
        saved = load_file(str(tmp_path / f"model.ckpt-{step}.ema.safetensors"))
        expected = _replay(initial, raw[:step], 0, names)
        for name in names:
            torch.testing.assert_close(saved[name].double(), expected[name], rtol=1e-5, atol=1e-6)
    last = load_file(str(tmp_path / "model.ckpt-5.ema.safetensors"))
    assert any(not torch.allclose(last[n], raw[-1][n]) for n in names)  # the averages are not the weights


def test_batchnorm_statistics_are_averaged_and_frozen_weights_are_not_tracked():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1))
    model[0].requires_grad_(False)
    average = WeightAverage(model, DECAY)
    assert set(average.names) == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "2.weight", "2.bias"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(torch.randn(8, 1, 4, 4) * 3 + 1)  # moves the BN statistics
    with torch.no_grad():
        model[2].weight.add_(1.0)
    average.update(model, step=4)
    d = min(DECAY, 5 / 14)
    now = model.state_dict()
    for name in ("1.running_mean", "1.running_var", "2.weight"):
        torch.testing.assert_close(average.shadow[name], d * before[name] + (1 - d) * now[name])
    state = average.averaged_state(model)
    assert torch.equal(state["0.weight"], now["0.weight"])  # frozen: the weight itself
    assert torch.equal(state["1.num_batches_tracked"], now["1.num_batches_tracked"])


def test_eval_predict_export_use_the_averages_unless_no_moving_average(tmp_path, capsys):
    run = tmp_path / "run"
    train(lenet_config(run, max_number_of_steps=30, moving_average_decay=DECAY))
    latest = ckpt.latest_checkpoint(run)
    assert latest.averages == run / "model.ckpt-30.ema.safetensors"

    def cli_eval(*extra: str) -> dict:
        assert main(["eval", "--checkpoint_path", str(run), "--dataset_name", "digits", "--num_workers", "0",
                     "--report", "false", *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    averaged, raw = cli_eval(), cli_eval("--no_moving_average")
    assert averaged["results_file"] != raw["results_file"]  # both kept side by side

    # The same numbers from models loaded with the saved tensors by hand.
    spec = get_model_spec("lenet")
    source = build_source("digits", None, "test")

    def by_hand(path) -> dict:
        model = spec.build(10)
        model.load_state_dict(load_file(str(path)))
        return evaluate_model(model.eval(), source, spec)

    hand_averaged, hand_raw = by_hand(latest.averages), by_hand(latest.weights)
    assert averaged["Accuracy"] == pytest.approx(hand_averaged["Accuracy"], abs=1e-12)
    assert raw["Accuracy"] == pytest.approx(hand_raw["Accuracy"], abs=1e-12)
    assert averaged["Recall_5"] == pytest.approx(hand_averaged["Recall_5"], abs=1e-12)
    assert (averaged["Accuracy"], averaged["Recall_5"]) != (raw["Accuracy"], raw["Recall_5"])

    # export and predict load the same way.
    ema_tensors, raw_tensors = load_file(str(latest.averages)), load_file(str(latest.weights))
    exported = load_source(str(run)).model.state_dict()
    assert all(torch.equal(exported[k], ema_tensors[k]) for k in ema_tensors)
    exported_raw = load_source(str(run), moving_average=False).model.state_dict()
    assert all(torch.equal(exported_raw[k], raw_tensors[k]) for k in raw_tensors)
    image = tmp_path / "digit.png"
    Image.fromarray(source.read(0)[0].squeeze(-1)).save(image)
    outputs = []
    for extra in ([], ["--no_moving_average"]):
        assert main(["predict", "--checkpoint_path", str(run), "--format", "json", str(image), *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] != outputs[1]  # other weights, other probabilities


def test_resume_restores_the_averages(tmp_path):
    whole = train(lenet_config(tmp_path / "whole", max_number_of_steps=6, moving_average_decay=DECAY,
                               deterministic=True))
    train(lenet_config(tmp_path / "split", max_number_of_steps=3, moving_average_decay=DECAY, deterministic=True))
    resumed = train(lenet_config(tmp_path / "split", max_number_of_steps=6, moving_average_decay=DECAY,
                                 deterministic=True))
    a = load_file(str(ckpt.averages_path(whole.checkpoint)))
    b = load_file(str(ckpt.averages_path(resumed.checkpoint)))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_without_averages_still_load(tmp_path):
    """A run saved without averages (as every older run) evaluates with its weights; resuming it with
    --moving_average_decay starts averages from those weights."""
    train(lenet_config(tmp_path, max_number_of_steps=2))
    assert ckpt.latest_checkpoint(tmp_path).averages is None
    results = evaluate_checkpoint(EvalConfig(checkpoint_path=str(tmp_path), dataset_name="digits", num_workers=0,
                                             report=False, max_num_batches=1))
    assert results["weights"] == "raw"
    resumed = train(lenet_config(tmp_path, max_number_of_steps=3, moving_average_decay=DECAY))
    assert ckpt.averages_path(resumed.checkpoint).is_file()


def test_evaluation_while_training_uses_the_averages(tmp_path):
    train(lenet_config(tmp_path, max_number_of_steps=20, moving_average_decay=DECAY, eval_every_n_steps=20,
                       eval_split_name="test"))
    logged = json.loads((tmp_path / "eval_during_training.jsonl").read_text().splitlines()[-1])
    settings = dict(checkpoint_path=str(tmp_path), dataset_name="digits", dataset_split_name="test", num_workers=0,
                    report=False)
    averaged = evaluate_checkpoint(EvalConfig(**settings))
    raw = evaluate_checkpoint(EvalConfig(**settings, no_moving_average=True))
    assert logged["step"] == 20 and logged["Accuracy"] == round(averaged["Accuracy"], 4)
    assert raw["Accuracy"] != averaged["Accuracy"]
