"""Per-scope learning rates: --learning_rate_multipliers, --layer_decay and the depth order behind it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import lenet_config

from slimtune import create_model
from slimtune.checkpoint import train_dir as ckpt
from slimtune.checkpoint.scopes import classifier_scopes_of, in_scope
from slimtune.cli import main
from slimtune.config import TrainConfig
from slimtune.errors import ConfigError
from slimtune.nets import get_model_spec, list_models
from slimtune.nets.depth import parameter_depths
from slimtune.train.loop import train
from slimtune.train.rates import resolve_rates

# ---- the depth order, over the whole registry (meta device: no storage, no cost) ----


@pytest.mark.parametrize("name", list_models())
def test_every_net_has_a_depth_order_monotone_in_blocks_with_heads_deepest(name):
    with torch.device("meta"):
        model = create_model(name)
    depths = parameter_depths(model)
    names = [n for n, _ in model.named_parameters()]
    assert list(depths) == names  # every parameter covered, nothing else
    heads = classifier_scopes_of(model)
    assert heads
    deepest = max(depths.values())
    is_head = {n: any(in_scope(n, scope, getattr(model, "scope", None) or None) for scope in heads) for n in names}
    assert all(depths[n] == deepest for n in names if is_head[n])
    body = [depths[n] for n in names if not is_head[n]]
    assert body[0] == 0 and all(a <= b for a, b in zip(body, body[1:], strict=False)), "depth must follow block order"
    assert max(body) == deepest - 1 and len(set(body)) == deepest  # no depth skipped, heads one deeper
    assert deepest >= 3


def test_depth_groups_split_sequential_units_not_parallel_branches():
    with torch.device("meta"):
        resnet = create_model("resnet_v1_50")
        inception = create_model("inception_v3")
    d = parameter_depths(resnet)
    unit = "resnet_v1_50.block1.unit_{}.bottleneck_v1.conv1.weight"
    assert d["resnet_v1_50.conv1.weight"] == 0 and d[unit.format(1)] == 1 and d[unit.format(2)] == 2
    d = parameter_depths(inception)
    branches = [n for n in d if n.startswith("InceptionV3.Mixed_5b.")]
    assert len({d[n] for n in branches}) == 1  # Branch_0..3 run side by side: one depth


def test_a_registry_depth_order_overrides_the_generic_rule():
    spec = get_model_spec("lenet")
    own = dataclasses.replace(spec, layer_depths=lambda model: {n: 0 for n, _ in model.named_parameters()})
    model = own.build(10)
    assert set(parameter_depths(model).values()) == {0}
    assert set(parameter_depths(model, spec).values()) == {0, 1, 2, 3}  # the generic rule, for comparison
    partial = dataclasses.replace(spec, layer_depths=lambda model: {"LeNet.conv1.weight": 0})
    with pytest.raises(ConfigError, match=r"lenet's layer_depths gives no depth for 7 parameter\(s\), e.g. LeNet.conv1.bias"):
        parameter_depths(partial.build(10))


# ---- the rates themselves: one SGD step moves each parameter by rate x multiplier x gradient ----


def _one_sgd_step(train_dir, **overrides) -> dict[str, torch.Tensor]:
    result = train(lenet_config(train_dir, optimizer="sgd", learning_rate=0.1, max_number_of_steps=1,
                                deterministic=True, **overrides))
    return load_file(str(result.checkpoint))


@pytest.fixture(scope="module")
def plain_step(tmp_path_factory):
    """(fresh weights, weights after one plain SGD step): the reference each multiplier scales."""
    after = _one_sgd_step(tmp_path_factory.mktemp("plain"))
    torch.manual_seed(0)  # the trainer builds the net right after seeding with --seed (0)
    return create_model("lenet", num_classes=10).state_dict(), after


LENET_LAYERS = ("conv1", "conv2", "fc3", "fc4")


@pytest.mark.parametrize("flags, expected", [
    # first match wins: fc4 takes 10 although the regex fc[0-9] selects it too
    (dict(learning_rate_multipliers="LeNet/fc4=10,fc[0-9]=3,conv2=0.5"),
     dict(conv1=1.0, conv2=0.5, fc3=3.0, fc4=10.0)),
    # timm's layer decay over depths 0..3 (heads 3): 0.5^3, 0.5^2, 0.5, 1; a multiplier multiplies it
    (dict(layer_decay=0.5, learning_rate_multipliers={"LeNet.conv1": 4}),
     dict(conv1=4 * 0.125, conv2=0.25, fc3=0.5, fc4=1.0)),
])
def test_each_scope_steps_at_its_multiple_of_the_rate(tmp_path, plain_step, flags, expected):
    fresh, plain = plain_step
    scaled = _one_sgd_step(tmp_path, **flags)
    for layer, multiplier in expected.items():
        for leaf in ("weight", "bias"):
            key = f"LeNet.{layer}.{leaf}"
            reference = (plain[key] - fresh[key]) * multiplier
            assert reference.abs().max() > 0
            torch.testing.assert_close(scaled[key] - fresh[key], reference, rtol=1e-4, atol=3e-7)  # float32 rounding of w - step


def test_a_frozen_by_multiplier_scope_keeps_its_weights_and_bn_statistics_bit_for_bit(tmp_path, cats_vs_dogs):
    result = train(TrainConfig(model_name="mobilenet_v1_025", dataset_dir=str(cats_vs_dogs), train_dir=str(tmp_path),
                               train_image_size=64, batch_size=4, max_number_of_steps=2, num_workers=0,
                               optimizer="sgd", learning_rate=0.1, weight_decay=0.1, save_summaries_secs=1e9,
                               learning_rate_multipliers="MobilenetV1/Conv2d_0=0,Conv2d_1_.*=0,Logits=2"))
    weights = load_file(str(result.checkpoint))
    torch.manual_seed(0)
    fresh = create_model("mobilenet_v1_025", num_classes=2).state_dict()
    frozen = [k for k in fresh if k.startswith(("MobilenetV1.Conv2d_0.", "MobilenetV1.Conv2d_1_"))]
    assert any(k.endswith("running_mean") for k in frozen) and any(k.endswith(".weight") for k in frozen)
    assert all(torch.equal(weights[k], fresh[k]) for k in frozen)  # weights, gamma/beta, moving statistics
    # the rest trained, statistics included
    assert not torch.equal(weights["MobilenetV1.Conv2d_2_depthwise.BatchNorm.running_mean"],
                           fresh["MobilenetV1.Conv2d_2_depthwise.BatchNorm.running_mean"])
    assert not torch.equal(weights["MobilenetV1.Conv2d_2_pointwise.weight"], fresh["MobilenetV1.Conv2d_2_pointwise.weight"])
    # frozen as --trainable_scopes freezes: out of the optimizer, so no weight decay and no state
    trainable = ckpt.load_state(ckpt.latest_checkpoint(tmp_path))["trainable"]
    assert not any(name.startswith(("MobilenetV1.Conv2d_0.", "MobilenetV1.Conv2d_1_")) for name in trainable)


def test_the_resolved_table_is_printed_saved_in_the_plan_and_config(tmp_path, capsys):
    start = tmp_path / "start"
    assert main(["train", "--model_name", "lenet", "--dataset_name", "digits", "--train_dir", str(start),
                 "--max_number_of_steps", "1", "--num_workers", "0"]) == 0
    recipe = tmp_path / "recipe.yaml"  # in YAML the multipliers are a mapping
    recipe.write_text("model_name: lenet\ndataset_name: digits\nnum_workers: 0\nlearning_rate: 0.01\n"
                      "learning_rate_multipliers:\n  LeNet/fc4: 10\n  'conv[1]': 0\n")
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--config", str(recipe), "--train_dir", str(run), "--checkpoint_path", str(start),
                 "--max_number_of_steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "Learning rates (3 scopes)" in err
    rows = yaml.safe_load((run / "config.yaml").read_text())["resolved"]["learning_rates"]
    table = {row["scope"]: (row["rule"], row["multiplier"], row["rate"], row["frozen"], row["parameters"])
             for row in rows}
    assert table == {"LeNet/conv1": ("conv[1]", 0.0, 0.0, True, 5 * 5 * 32 + 32),
                     "LeNet": ("-", 1.0, 0.01, False, 5 * 5 * 32 * 64 + 64 + 7 * 7 * 64 * 1024 + 1024),
                     "LeNet/fc4": ("LeNet/fc4", 10.0, 0.1, False, 1024 * 10 + 10)}
    plan = (run / "restore_plan.txt").read_text()
    assert "Learning rates (3 scopes)" in plan and "frozen" in plan.split("Learning rates")[1]
    # a dry run resolves and prints the same table, writing nothing
    assert main(["train", "--config", str(recipe), "--train_dir", str(tmp_path / "dry"), "--dry_run"]) == 0
    err = capsys.readouterr().err
    assert "Learning rates (3 scopes)" in err and "learning_rates:" in err and not (tmp_path / "dry").exists()
    # the same mapping in flag form resolves to the same multipliers
    model = create_model("lenet", num_classes=10)
    mapping = resolve_rates(model, {"LeNet/fc4": 10, "conv[1]": 0}, None, 0.01)
    text = resolve_rates(model, "LeNet/fc4=10, conv[1]=0", None, 0.01)
    assert mapping.multipliers == text.multipliers
    # 'heads' names the classifier heads; a pattern whose every match an earlier one took is pointed out
    both = resolve_rates(model, "heads=10,LeNet/fc4=3", None, 0.01)
    assert both.multipliers["LeNet.fc4.weight"] == 10 and both.multipliers["LeNet.fc3.weight"] == 1
    assert "pattern 'LeNet/fc4' sets no rate: earlier patterns take every parameter it selects" in both.format()


@pytest.mark.parametrize("flags, message", [
    (["--learning_rate_multipliers", "LeNet/fc9=10"],
     "--learning_rate_multipliers: scope 'LeNet/fc9' matches no variable of the net; nearest scopes: LeNet/fc"),
    (["--learning_rate_multipliers", "LeNet/fcx[0-9]=2"],
     "--learning_rate_multipliers: pattern 'LeNet/fcx[0-9]' matches no variable of the net; nearest scopes: "),
    (["--learning_rate_multipliers", "LeNet/fc4=fast"], "LeNet/fc4='fast': the multiplier is not a number"),
    (["--learning_rate_multipliers", "LeNet/fc4"], "'LeNet/fc4' is not SCOPE=MULTIPLIER"),
    (["--learning_rate_multipliers", "fc4=-1"], "a multiplier must be a finite number >= 0"),
    (["--layer_decay", "1.5"], "setting layer_decay: 1.5 is out of range (must be <= 1)"),
    (["--learning_rate_multipliers", "LeNet=0"], "leave nothing to train"),
    (["--learning_rate_multipliers", "LeNet=0", "--head_epochs", "1"], "leave nothing to train"),  # up front
])
def test_bad_multipliers_are_one_line_naming_the_choices(tmp_path, capsys, flags, message):
    assert main(["train", "--model_name", "lenet", "--dataset_name", "digits", "--train_dir", str(tmp_path / "r"),
                 "--max_number_of_steps", "1", "--num_workers", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("slimtune: error")]) == 1
    assert not list((tmp_path / "r").glob("model.ckpt-*"))
