"""Auxiliary heads in training (slim's train_image_classifier: 0.4 x the AuxLogits loss, same label
smoothing, sigmoid for multi-label), --aux_loss_weight, heads in restore plans, and eval/predict
never using the aux head."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slimtune.checkpoint.restore import plan_restore
from slimtune.cli import main
from slimtune.config import EvalConfig
from slimtune.errors import ConfigError
from slimtune.evaluate.run import evaluate_checkpoint
from slimtune.nets import create_model
from slimtune.testing import load_golden, seeded_slim_weights
from slimtune.train.losses import aux_logits_of, sigmoid_loss, softmax_loss

GOLDEN_DIR = Path(__file__).parent / "golden"


def _numpy_softmax_ce(logits: np.ndarray, labels: np.ndarray, smoothing: float) -> float:
    """slim's softmax_cross_entropy with label_smoothing, written out in float64."""
    classes = logits.shape[1]
    onehot = np.eye(classes)[labels]
    smoothed = onehot * (1 - smoothing) + smoothing / classes
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(np.mean(-(smoothed * log_probs).sum(axis=1)))


def _numpy_sigmoid_ce(logits: np.ndarray, targets: np.ndarray) -> float:
    mask = targets >= 0
    t = np.clip(targets, 0, None)
    per = np.maximum(logits, 0) - logits * t + np.log1p(np.exp(-np.abs(logits)))
    return float((per * mask).sum() / mask.sum())


def test_aux_loss_is_slims_weighted_sum_with_the_same_smoothing():
    rng = np.random.default_rng(0)
    logits, aux = rng.normal(size=(6, 5)) * 3, rng.normal(size=(6, 5)) * 3
    labels = rng.integers(0, 5, size=6)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    for weight in (0.4, 1.3):
        expected = _numpy_softmax_ce(logits, labels, 0.1) + weight * _numpy_softmax_ce(aux, labels, 0.1)
        actual = softmax_loss(t(logits), torch.tensor(labels), 0.1, t(aux), weight).item()
        assert actual == pytest.approx(expected, rel=1e-12)
    assert softmax_loss(t(logits), torch.tensor(labels), 0.1, t(aux), 0.0).item() == pytest.approx(
        _numpy_softmax_ce(logits, labels, 0.1), rel=1e-12)
    targets = rng.integers(-1, 2, size=(6, 5)).astype(np.float64)
    expected = _numpy_sigmoid_ce(logits, targets) + 0.4 * _numpy_sigmoid_ce(aux, targets)
    assert sigmoid_loss(t(logits), t(targets), None, t(aux)).item() == pytest.approx(expected, rel=1e-12)


def test_aux_logits_are_found_by_their_end_point_name():
    aux = torch.randn(2, 3)
    assert aux_logits_of({"AuxLogits": aux}, 0.4) is aux
    assert aux_logits_of({"AuxLogits": aux}, 0.0) is None          # 0 disables the aux loss
    assert aux_logits_of({"Logits": aux}, 0.4) is None
    assert aux_logits_of({"AuxLogits": aux[:, :, None, None]}, 0.4).shape == (2, 3)
    with pytest.raises(ConfigError, match="aux_loss_weight"):
        aux_logits_of({"AuxLogits": aux}, -1.0)


THIN_V3 = '''
from slimtune.nets.inception import InceptionV3


def thin_v3(num_classes=1001, image_size=299, **kwargs):
    """slim's Inception v3 at a tenth of its width: cheap, but every layer and both heads are there.
    image_size sizes the aux head (slimtune passes the training size)."""
    return InceptionV3(num_classes, depth_multiplier=0.1, min_depth=8, image_size=image_size, **kwargs)
'''

FLAGS = ["--train_image_size", "107", "--batch_size", "4", "--max_number_of_steps", "2", "--num_workers", "0",
         "--optimizer", "sgd", "--learning_rate", "0.1", "--weight_decay", "0", "--save_summaries_secs", "1e9",
         "--learning_rate_decay_type", "fixed", "--preprocessing_name", "inception"]


@pytest.fixture(scope="module")
def thin_v3_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("my_nets") / "thin_v3.py"
    path.write_text(textwrap.dedent(THIN_V3))
    return path


@pytest.mark.parametrize("weight", ["0.4", "0"])
def test_training_trains_the_aux_head_only_when_weighted(weight, thin_v3_file, cats_vs_dogs, tmp_path):
    """With --aux_loss_weight 0.4 the AuxLogits head learns; with 0 it gets no gradient and stays as built."""
    code = main(["train", "--model_name", f"{thin_v3_file}:thin_v3", "--dataset_dir", str(cats_vs_dogs),
                 "--train_dir", str(tmp_path), "--aux_loss_weight", weight, *FLAGS])
    assert code == 0
    trained = load_file(str(tmp_path / "model.ckpt-2.safetensors"))
    torch.manual_seed(0)  # the trainer seeds (--seed 0) right before building the net
    from slimtune.nets.registry import get_model_spec
    fresh = get_model_spec(f"{thin_v3_file}:thin_v3").build(2, image_size=107).state_dict()
    aux_key = "InceptionV3.AuxLogits.Conv2d_2b_1x1.weight"
    main_key = "InceptionV3.Logits.Conv2d_1c_1x1.weight"
    assert not torch.equal(trained[main_key], fresh[main_key])
    assert torch.equal(trained[aux_key], fresh[aux_key]) == (weight == "0")


def test_eval_never_uses_the_aux_head(thin_v3_file, cats_vs_dogs, tmp_path):
    """Evaluation gives the same results when the aux head's weights are NaN."""
    assert main(["train", "--model_name", f"{thin_v3_file}:thin_v3", "--dataset_dir", str(cats_vs_dogs),
                 "--train_dir", str(tmp_path / "run"), *FLAGS]) == 0
    config = dict(dataset_dir=str(cats_vs_dogs), dataset_split_name="train", num_workers=0, report=False,
                  model_name=f"{thin_v3_file}:thin_v3")
    clean = evaluate_checkpoint(EvalConfig(checkpoint_path=str(tmp_path / "run"), **config))
    weights_file = tmp_path / "run" / "model.ckpt-2.safetensors"
    weights = load_file(str(weights_file))
    with safe_open(str(weights_file), "pt") as handle:
        metadata = handle.metadata()
    for key in weights:
        if ".AuxLogits." in key and weights[key].is_floating_point():
            weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(weights_file), metadata=metadata)
    poisoned = evaluate_checkpoint(EvalConfig(checkpoint_path=str(tmp_path / "run"), **config))
    assert np.isfinite(poisoned["Accuracy"]) and poisoned["Accuracy"] == clean["Accuracy"]
    assert poisoned["num_samples"] == clean["num_samples"]


# ------------------------------------------------------------------------------------------------
# Heads in restore plans (slim README's fine-tuning recipe for Inception v3).

@pytest.fixture(scope="module")
def v3_1001_weights():
    golden = load_golden(GOLDEN_DIR / "inception_v3_dm025.npz")
    return seeded_slim_weights(golden.variables, golden.seed)


def test_plan_names_every_mismatched_head_in_one_flag_value(v3_1001_weights):
    model = create_model("inception_v3", num_classes=5, depth_multiplier=0.25)
    plan, _, _ = plan_restore(model, v3_1001_weights)
    assert not plan.ok
    flag, value = plan.fix().split("=")
    assert flag == "--checkpoint_exclude_scopes" and " " not in value
    assert sorted(value.split(",")) == ["InceptionV3/AuxLogits", "InceptionV3/Logits"]


def test_exclude_scopes_heads_excludes_the_registrys_heads(v3_1001_weights):
    model = create_model("inception_v3", num_classes=5, depth_multiplier=0.25)
    plan, _, _ = plan_restore(model, v3_1001_weights, exclude_scopes="heads")
    assert plan.ok and not plan.missing and not plan.mismatched
    assert {f.model_name.split(".")[1] for f in plan.excluded} == {"Logits", "AuxLogits"}
    assert plan.exclude_scopes_display() == ["InceptionV3/Logits", "InceptionV3/AuxLogits"]
    without_aux = create_model("inception_v3", num_classes=5, depth_multiplier=0.25, create_aux_logits=False)
    plan, _, _ = plan_restore(without_aux, v3_1001_weights, exclude_scopes="heads")
    assert plan.ok and {f.model_name.split(".")[1] for f in plan.excluded} == {"Logits"}


def test_eval_at_another_size_leaves_the_aux_head_out_and_training_refuses():
    """A v3 built for 299 evaluates at 224 (no AuxLogits end point, same logits as a net built for
    224); training at a size its aux head was not built for is a one-line error."""
    built_299 = create_model("inception_v3", num_classes=3, depth_multiplier=0.1, min_depth=8).eval()
    built_224 = create_model("inception_v3", num_classes=3, depth_multiplier=0.1, min_depth=8,
                             image_size=224, create_aux_logits=False).eval()
    built_224.load_state_dict({k: v for k, v in built_299.state_dict().items() if ".AuxLogits." not in k})
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        logits, end_points = built_299.forward_endpoints(x)
        assert "AuxLogits" not in end_points
        torch.testing.assert_close(logits, built_224(x))
    with pytest.raises(ConfigError, match="image_size") as error:
        built_299.train()(x)
    assert "\n" not in str(error.value)
