"""Settings are checked when they are made: type, range, choices, unknown names; a run's saved
config.yaml is accepted back by --config; optimizers come from one registry."""

from __future__ import annotations

import dataclasses
import os
import stat

import pytest
import torch
import yaml

from slimtune.checkpoint import train_dir as ckpt
from slimtune.cli import main
from slimtune.config import TrainConfig, build_config, config_to_dict, dump_config
from slimtune.errors import ConfigError
from slimtune.train.optimizers import build_optimizer, optimizer_names


def test_a_string_setting_outside_its_choices_is_refused_from_yaml(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name: lenet\noptimizer: adamx\n")
    with pytest.raises(ConfigError, match=r"setting optimizer: 'adamx' is not one of .*; did you mean adam\?"):
        build_config(TrainConfig, {"config": str(recipe)})
    with pytest.raises(ConfigError, match="on_bad_image"):
        TrainConfig(on_bad_image="ignore")  # made in code: checked as well


def test_an_unknown_yaml_key_names_the_nearest_setting(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name: lenet\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'learning_rat'; did you mean learning_rate\?"):
        build_config(TrainConfig, {"config": str(recipe)})
    recipe.write_text("weight_decya: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean weight_decay"):
        build_config(TrainConfig, {"config": str(recipe)})


@pytest.mark.parametrize("given, message", [
    ({"learning_rate": 0}, "learning_rate: 0.0 is out of range (must be > 0)"),
    ({"learning_rate": -0.1}, "learning_rate: -0.1 is out of range"),
    ({"learning_rate": "nan"}, "learning_rate: nan is not a finite number"),
    ({"learning_rate": float("inf")}, "learning_rate: inf is not a finite number"),
    ({"max_number_of_steps": -3}, "max_number_of_steps: -3 is out of range (must be >= 1)"),
    ({"num_epochs": 0}, "num_epochs: 0.0 is out of range (must be > 0)"),
    ({"batch_size": 2.5}, "batch_size: 2.5 is not a valid int"),
    ({"batch_size": True}, "batch_size: True is not a valid int"),
    ({"label_smoothing": 1.0}, "label_smoothing: 1.0 is out of range (must be < 1)"),
    ({"momentum": 1.5}, "momentum: 1.5 is out of range (must be <= 1)"),
    ({"log_every_n_steps": 0}, "log_every_n_steps: 0 is out of range"),
    ({"learning_rate_decay_type": "step"}, "learning_rate_decay_type: 'step' is not one of"),
    ({"model_name": ["a", {"b": 1}], "deterministic": "maybe"}, "deterministic"),
])
def test_values_out_of_type_range_or_choices_are_one_line(given, message):
    with pytest.raises(ConfigError) as raised:
        build_config(TrainConfig, given)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_the_cli_refuses_a_bad_rate_in_one_line(capsys):
    assert main(["train", "--model_name", "lenet", "--learning_rate", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("slimtune: error: setting learning_rate: 0.0 is out of range "
                                               "(must be > 0)")


def test_whole_numbers_written_as_text_or_floats_are_accepted():
    config = build_config(TrainConfig, {"batch_size": "8", "max_number_of_steps": 10.0, "learning_rate": "1e-3"})
    assert (config.batch_size, config.max_number_of_steps, config.learning_rate) == (8, 10, 1e-3)
    assert build_config(TrainConfig, {"save_interval_secs": "inf"}).save_interval_secs == float("inf")


def test_a_saved_config_yaml_is_accepted_back_by_config(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name: lenet\noptimizer: momentum\ncheckpoint_name_map: ['a=b']\n")
    original = build_config(TrainConfig, {"config": str(recipe), "learning_rate": 0.05, "max_number_of_steps": 7,
                                          "trainable_scopes": "LeNet/fc4", "save_interval_secs": float("inf")})
    saved = dump_config(original, tmp_path / "config.yaml",
                        {"resolved": {"model": "lenet", "num_classes": 10}, "versions": {"torch": torch.__version__}})
    assert set(yaml.safe_load(saved.read_text())) == {"settings", "resolved", "versions"}
    again = build_config(TrainConfig, {"config": str(saved)})
    expected = {**config_to_dict(original), "config": str(saved)}
    assert config_to_dict(again) == expected
    # ...and flags still override it.
    assert build_config(TrainConfig, {"config": str(saved), "learning_rate": 0.2}).learning_rate == 0.2


def test_the_optimizer_registry_is_the_flag_choices_and_reads_the_settings():
    choices = dataclasses.fields(TrainConfig)
    optimizer_field = next(f for f in choices if f.name == "optimizer")
    assert optimizer_names() == tuple(sorted(optimizer_field.metadata["choices"]))
    parameter = torch.nn.Parameter(torch.zeros(2))
    config = TrainConfig(optimizer="momentum", momentum=0.25, adam_beta1=0.5, opt_epsilon=0.125)
    sgd = build_optimizer("momentum", [{"params": [parameter]}], 0.1, config)
    assert sgd.param_groups[0]["momentum"] == 0.25
    adam = build_optimizer("adam", [{"params": [parameter]}], 0.1, config)
    assert adam.param_groups[0]["betas"] == (0.5, 0.999) and adam.param_groups[0]["eps"] == 0.125
    with pytest.raises(ConfigError, match="unknown optimizer option"):
        build_optimizer("adam", [{"params": [parameter]}], 0.1, config, adam_beta=0.1)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoints_get_the_permissions_of_other_outputs(tmp_path, umask):
    previous = os.umask(umask)
    try:
        saved = ckpt.save_checkpoint(tmp_path, 1, torch.nn.Linear(2, 2), {"optimizer": {}}, {})
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(previous)
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == 0o666 & ~umask
    for path in (saved.weights, saved.state, tmp_path / "checkpoint"):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
