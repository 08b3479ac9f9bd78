"""Parity of slimtune's Inception v1-v4 and Inception-ResNet-v2 with TF-Slim (research/slim nets/
inception_v{1,2,3,4}.py, inception_resnet_v2.py), their options, sizes and heads.

Goldens (tests/golden/inception*.npz) come from tools/tf_reference/make_parity_fixtures.py (the
'inception configs' block). The default run checks thin (depth_multiplier 0.25) v2/v3, v1 at a
non-default size with global_pool, v4 and Inception-ResNet-v2 at their smallest input (107 px),
Inception-ResNet-v2 with align_feature_maps and output_stride 8, the base networks, and two
TF-written checkpoints; the full nets at their published sizes run with `-m slow`. Every net's
full default architecture (names and shapes of every variable) is checked against TF's variable
list without computing anything (meta tensors).
"""

from __future__ import annotations

import pytest
import torch

from slimtune.checkpoint.restore import plan_restore, restore
from slimtune.errors import ConfigError
from slimtune.nets import create_model, get_model_spec
from slimtune.testing import assert_matches_golden, seeded_slim_weights

from parity_support import GOLDEN_DIR, slim_to_torch_name_and_shape
from parity_support import golden as _golden
from parity_support import nchw as _nchw

FULL_CONFIGS = ["inception_v1", "inception_v2", "inception_v3", "inception_v4", "inception_resnet_v2"]
CHEAP_CONFIGS = ["inception_v1_gp160", "inception_v2_dm025", "inception_v2_dm025_gp97",
                 "inception_v2_dm025_noseparable", "inception_v3_dm025", "inception_v3_dm025_224",
                 "inception_v3_dm025_gp331", "inception_v3_dm025_headless", "inception_v3_dm025_base_6a",
                 "inception_v4_107", "inception_resnet_v2_107", "inception_resnet_v2_aligned_99",
                 "inception_resnet_v2_relu6_noaux75", "inception_resnet_v2_base_os8"]
ALL_CONFIGS = FULL_CONFIGS + CHEAP_CONFIGS





def _build_args(golden) -> tuple[str, int, dict]:
    """(slimtune model name, num_classes, keyword arguments) of a golden's slim net."""
    kwargs = {k: v for k, v in golden.model_kwargs.items() if k != "num_classes"}
    name = golden.model_name
    kwargs["image_size"] = golden.image_size[0]
    return name, golden.num_classes or 0, kwargs


def _is_base(golden) -> bool:
    return "final_endpoint" in golden.model_kwargs


def _param(config: str, slow: bool = False):
    return pytest.param(config, marks=[pytest.mark.slow] if slow else [], id=config)


@pytest.mark.parametrize("config", ALL_CONFIGS + ["inception_v2_ckpt", "inception_v3_ckpt"])
def test_state_dict_matches_slim_variables(config):
    """Every torch tensor is a slim variable (names and converted shapes) and none is missing;
    built on the meta device, so the full nets cost nothing here."""
    golden = _golden(config)
    name, classes, kwargs = _build_args(golden)
    with torch.device("meta"):
        model = create_model(name, num_classes=classes, **kwargs)
    expected = dict(slim_to_torch_name_and_shape(n, s) for n, s in golden.variables)
    actual = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert sorted(set(expected) - set(actual)) == [] and sorted(set(actual) - set(expected)) == []
    assert actual == expected
    if classes:
        assert model.classifier_scope.replace("/", ".") + ".weight" in actual


def _run(config: str, channels_last: bool = False):
    golden = _golden(config)
    name, classes, kwargs = _build_args(golden)
    # Built on the meta device and given storage without initializing: restore fills every tensor.
    with torch.device("meta"):
        model = create_model(name, num_classes=classes, **kwargs)
    model = model.to_empty(device="cpu").eval()
    plan = restore(model, seeded_slim_weights(golden.variables, golden.seed))
    assert len(plan.loaded) == len(model.state_dict())
    images = _nchw(golden)
    with torch.no_grad():
        if _is_base(golden):
            end_points = {}
            out = model._forward_features(images, end_points)
        else:
            out, end_points = model.forward_endpoints(images)
    return golden, model, out, end_points


# Covered in the default run by cheaper configs of the same code paths (IRv2's blocks and aux head:
# aligned_99, relu6_noaux75, base_os8; v3's global_pool: v1/v2's).
SLOW_CONFIGS = set(FULL_CONFIGS) | {"inception_resnet_v2_107", "inception_v3_dm025_gp331"}


@pytest.mark.parametrize("config", [_param(c, slow=c in SLOW_CONFIGS) for c in ALL_CONFIGS])
def test_matches_tf_slim(config):
    """Logits, AuxLogits and every slim end point (names, order, shapes, values) match TF-Slim
    within 1e-4 of their largest value."""
    golden, model, out, end_points = _run(config)
    assert list(end_points) == list(golden.end_points)
    if not golden.num_classes and not _is_base(golden):
        # Headless: slimtune returns slim's pooled [N, 1, 1, C] map as [N, C] features.
        assert out.shape == (golden.batch, model.num_features)
        out = out[:, :, None, None]
    assert_matches_golden(out, end_points, golden, rtol_of_max=1e-4)
    if golden.num_classes and not _is_base(golden):
        assert end_points["Logits"] is out
        assert ("AuxLogits" in end_points) == model.has_aux == (model.scope not in ("InceptionV1", "InceptionV2")
                                                                and golden.model_kwargs.get("create_aux_logits", True))


@pytest.mark.parametrize("config, version", [("inception_v2_ckpt", "V1"), ("inception_v3_ckpt", "V2")])
def test_tf_written_checkpoint_reproduces_tf(config, version):
    """A checkpoint written by TensorFlow's own Saver (V1 single file / V2 index+data) loads through
    create_model and reproduces TF's logits and end points (AuxLogits included for v3)."""
    golden = _golden(config)
    prefix = GOLDEN_DIR / f"{config}.ckpt"
    assert (prefix.is_file() if version == "V1" else prefix.with_name(prefix.name + ".index").is_file())
    name, classes, kwargs = _build_args(golden)
    model = create_model(name, num_classes=classes, checkpoint_path=str(prefix), **kwargs).eval()
    with torch.no_grad():
        logits, end_points = model.forward_endpoints(_nchw(golden))
    assert logits.shape == (2, 10)
    assert_matches_golden(logits, end_points, golden)


# ------------------------------------------------------------------------------------------------
# Input sizes, the aux conv's name, and bad input.

def test_v3_aux_conv_is_named_after_its_kernel():
    """slim's _reduced_kernel_size_for_small_input: 5x5 at 299, 3x3 at 224 (golden variable names)."""
    assert any(n == "InceptionV3/AuxLogits/Conv2d_2a_5x5/weights" for n, _ in _golden("inception_v3_dm025").variables)
    assert any(n == "InceptionV3/AuxLogits/Conv2d_2a_3x3/weights" for n, _ in _golden("inception_v3_dm025_224").variables)
    with torch.device("meta"):
        small = create_model("inception_v3", depth_multiplier=0.25, image_size=224)
    assert small.InceptionV3.AuxLogits.Conv2d_2a_3x3.weight.shape[-2:] == (3, 3)


def test_smaller_input_renames_a_variable_and_the_plan_says_so():
    """Restoring a 299-trained v3 into a net built for 224: the plan explains the renamed aux conv in
    plain words instead of reporting a missing tensor."""
    golden = _golden("inception_v3_dm025")
    weights = seeded_slim_weights(golden.variables, golden.seed)
    model = create_model("inception_v3", depth_multiplier=0.25, image_size=224)
    plan, _, _ = plan_restore(model, weights)
    report = str(plan)
    assert "AuxLogits/Conv2d_2a_3x3" in report and "Conv2d_2a_5x5" in report
    assert "input size" in report and "299" in report and "224" in report
    assert "--checkpoint_exclude_scopes=InceptionV3/AuxLogits" in plan.fix()


@pytest.mark.parametrize("name, smallest", [("inception_v3", 107), ("inception_v4", 107),
                                            ("inception_resnet_v2", 107), ("inception_v1", 193)])
def test_too_small_input_names_the_smallest_size(name, smallest):
    """One line naming the smallest input; the registry knows the same number."""
    assert get_model_spec(name).min_image_size == smallest
    with torch.device("meta"):
        model = create_model(name)
    assert model.smallest_input_size() == smallest
    with pytest.raises(ConfigError, match=f"at least {smallest}x{smallest}") as error:
        model(torch.zeros(1, 3, smallest - 1, smallest - 1, device="meta"))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=f"at least {smallest}x{smallest}"), torch.device("meta"):
        create_model(name, image_size=smallest - 1)


def test_v3_base_without_aux_accepts_75():
    """slim's inception_v3_base runs down to 75x75 (its test's minimum); the aux head needs 107."""
    with torch.device("meta"):
        model = create_model("inception_v3", create_aux_logits=False, image_size=75)
    assert model.smallest_input_size() == 75


def test_unknown_keyword_is_refused_with_the_accepted_list():
    with pytest.raises(ConfigError, match="accepted: .*depth_multiplier"):
        create_model("inception_v3", depth_multiplier=0.5, output_stride=8)
    with pytest.raises(ConfigError, match="unknown final_endpoint"):
        create_model("inception_v4", num_classes=0, final_endpoint="Mixed_9z")


# ------------------------------------------------------------------------------------------------
# Registry and contract.

@pytest.mark.parametrize("name, size, top1, top5, tarball", [
    ("inception_v1", 224, 69.8, 89.6, "inception_v1_2016_08_28.tar.gz"),
    ("inception_v2", 224, 73.9, 91.8, "inception_v2_2016_08_28.tar.gz"),
    ("inception_v3", 299, 78.0, 93.9, "inception_v3_2016_08_28.tar.gz"),
    ("inception_v4", 299, 80.2, 95.2, "inception_v4_2016_09_09.tar.gz"),
    ("inception_resnet_v2", 299, 80.4, 95.3, "inception_resnet_v2_2016_08_30.tar.gz"),
])
def test_registration(name, size, top1, top5, tarball):
    spec = get_model_spec(name)
    assert (spec.default_image_size, spec.preprocessing, spec.checkpoint_num_classes) == (size, "inception", 1001)
    assert (spec.published_top1, spec.published_top5, spec.published_checkpoint) == (top1, top5, tarball)
    with torch.device("meta"):
        model = create_model(name)
    assert model.scope == spec.scope
    assert model.classifier_scopes == spec.classifier_scopes
    keys = model.state_dict()
    for scope in spec.classifier_scopes:
        assert any(k.startswith(scope.replace("/", ".") + ".") for k in keys)
    first = [k for k in keys if k.startswith(spec.first_conv.replace("/", ".") + ".")]
    assert first and keys[first[0]].shape[1] in (3, 1)   # reads the image (v2's separable: depthwise)


def test_headless_and_reset_classifier():
    """num_classes=0 removes both heads; reset_classifier(N) rebuilds Logits and AuxLogits."""
    model = create_model("inception_v3", num_classes=0, depth_multiplier=0.25, image_size=150).eval()
    assert not any("Logits" in k for k in model.state_dict())
    x = torch.randn(1, 3, 150, 150)
    with torch.no_grad():
        features = model(x)
    assert features.shape == (1, model.num_features)
    model.reset_classifier(7)
    assert model.InceptionV3.AuxLogits.Conv2d_2b_1x1.weight.shape[0] == 7
    assert model.get_classifier() is model.InceptionV3.Logits.Conv2d_1c_1x1
    with torch.no_grad():
        logits, end_points = model.forward_endpoints(x)
    assert logits.shape == (1, 7) and end_points["AuxLogits"].shape == (1, 7)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)
