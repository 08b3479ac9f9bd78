"""Parity of slimtune's MobileNet v3 / EdgeTPU with TF-Slim's research/slim
(nets/mobilenet/mobilenet_v3.py: upstream 0ba83cf0 for V3_*, 03cdc5fe for V3_EDGETPU; each golden
records its tree's revision), plus their options, sizes and training behaviour.

Goldens (tests/golden/<config>.npz) come from tools/tf_reference/make_parity_fixtures.py (its
MOBILENET_V3 block). Seeded weights depend only on (seed, variable name, shape), so configs with
the same variables share one TF checkpoint, written once per family while that family's tests run.
"""

from __future__ import annotations

import pytest
import torch

from slimtune.errors import ConfigError
from slimtune.nets import create_model, get_model_spec
from slimtune.nets.mobilenet_v3 import HARD_SIGMOID_SCALE, hard_sigmoid, hard_swish
from slimtune.testing import assert_matches_golden

from parity_support import GOLDEN_DIR, FamilyCheckpoints, check_headless_matches_pooled_end_point, sgd_losses, \
    slim_to_torch_name_and_shape
from parity_support import golden as _golden
from parity_support import nchw as _nchw
from parity_support import net_kwargs as _net_kwargs

# Configs sharing one checkpoint: each family's configs have exactly the same variables.
FAMILIES = {
    "mobilenet_v3_large": ("mobilenet_v3_large",),
    "mobilenet_v3_small": ("mobilenet_v3_small", "mobilenet_v3_small_250x300"),
    "mobilenet_v3_large_minimalistic": ("mobilenet_v3_large_minimalistic",),
    "mobilenet_v3_small_minimalistic": ("mobilenet_v3_small_minimalistic",),
    "mobilenet_edgetpu": ("mobilenet_edgetpu",),
    "mobilenet_edgetpu_075": ("mobilenet_edgetpu_075", "mobilenet_edgetpu_075_os4"),
    "mobilenet_v3_large_075_97": ("mobilenet_v3_large_075_97",),
    "mobilenet_v3_small_minimalistic_050_finegrain": ("mobilenet_v3_small_minimalistic_050_finegrain",),
}
FAMILY_OF = {config: family for family, configs in FAMILIES.items() for config in configs}
ALL_CONFIGS = [config for configs in FAMILIES.values() for config in configs]
# The TF-written checkpoints: (config, TF format).
CHECKPOINT_CONFIGS = [("mobilenet_v3_large_025_ckpt", "v2"), ("mobilenet_edgetpu_025_ckpt", "v1")]
NAMES = ("mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v3_large_minimalistic",
         "mobilenet_v3_small_minimalistic", "mobilenet_edgetpu", "mobilenet_edgetpu_075")





@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    store = FamilyCheckpoints(tmp_path_factory.mktemp("mobilenet_v3_family_ckpt"))
    yield store
    store.release()


def _model(name: str, num_classes: int, **kwargs):
    return create_model(name, num_classes=num_classes, **kwargs).eval()


def _meta_model(name: str, num_classes: int, **kwargs):
    """A net built on the meta device: shapes and structure only, no initialization cost."""
    with torch.device("meta"):
        return create_model(name, num_classes=num_classes, **kwargs)


# ------------------------------------------------------------------------------------------------
# Parity with TF-Slim.

@pytest.mark.parametrize("config", ALL_CONFIGS + [config for config, _ in CHECKPOINT_CONFIGS])
def test_state_dict_matches_slim_variables(config):
    """Every torch tensor is a slim variable (names and converted shapes) and none is missing:
    squeeze-excite convs with biases, Conv_2 with biases and no BN, fused blocks without depthwise."""
    golden = _golden(config)
    model = _model(golden.model_name, golden.num_classes, **_net_kwargs(golden))
    expected = dict(slim_to_torch_name_and_shape(name, shape) for name, shape in golden.variables)
    actual = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert actual == expected
    assert model.classifier_scope.replace("/", ".") + ".weight" in actual


def test_goldens_record_the_slim_revision():
    """v3 goldens come from upstream 0ba83cf0, EdgeTPU ones from 03cdc5fe (the first has no V3_EDGETPU)."""
    for config in ALL_CONFIGS + [config for config, _ in CHECKPOINT_CONFIGS]:
        golden = _golden(config)
        revision = golden.versions["slim_src_revision"]
        expected = "03cdc5fe" if "edgetpu" in config else "0ba83cf0"
        assert revision.startswith(expected), (config, revision)


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_matches_tf_slim(config, checkpoints):
    """Logits and every slim end point (names, order, shapes, values) match TF-Slim within 1e-4 of
    their largest magnitude."""
    golden = _golden(config)
    path, stored = checkpoints.get(FAMILY_OF[config])
    assert stored == dict(golden.variables)  # the shared checkpoint holds exactly this config's weights
    model = create_model(golden.model_name, num_classes=golden.num_classes, checkpoint_path=str(path),
                         **_net_kwargs(golden)).eval()
    with torch.no_grad():
        logits, end_points = model.forward_endpoints(_nchw(golden))
    assert list(end_points) == list(golden.end_points)
    assert_matches_golden(logits, end_points, golden, rtol_of_max=1e-4, end_point_rtol_of_max=1e-4)
    assert end_points["Logits"] is logits


@pytest.mark.parametrize("config, version", CHECKPOINT_CONFIGS)
def test_tf_written_checkpoint_reproduces_tf(config, version):
    """A checkpoint written by TensorFlow's own Saver (V2: prefix + index/data; V1: one file)
    loads through create_model and reproduces TF's outputs."""
    golden = _golden(config)
    prefix = GOLDEN_DIR / f"{config}.ckpt"
    if version == "v2":
        assert prefix.with_name(prefix.name + ".index").is_file()
    else:
        assert prefix.is_file()
    model = create_model(golden.model_name, num_classes=golden.num_classes, checkpoint_path=str(prefix),
                         **_net_kwargs(golden)).eval()
    with torch.no_grad():
        logits, end_points = model.forward_endpoints(_nchw(golden))
    assert logits.shape == (2, 10)
    assert list(end_points) == list(golden.end_points)
    assert_matches_golden(logits, end_points, golden)


@pytest.mark.parametrize("config", ["mobilenet_v3_small_minimalistic_050_finegrain", "mobilenet_edgetpu_075_os4"])
def test_headless_returns_slims_pooled_features(config):
    """num_classes=0: no Logits variables; model(x) is slim's global_pool [N, C, 1, 1] as [N, C]."""
    check_headless_matches_pooled_end_point(config, "global_pool")


@pytest.mark.parametrize("name, kwargs", [("mobilenet_v3_small", {}),
                                          ("mobilenet_edgetpu", {"depth_multiplier": 0.5, "output_stride": 8})])
def test_channels_last_input_gives_the_same_logits(name, kwargs):
    """A channels_last batch (and model) flows through squeeze-excite, fused and atrous blocks to the
    same logits as a contiguous one."""
    torch.manual_seed(0)
    model = _model(name, 10, **kwargs)
    images = torch.randn(2, 3, 67, 67)
    with torch.no_grad():
        expected = model(images)
        actual = model(images.contiguous(memory_format=torch.channels_last))
        model_cl = model.to(memory_format=torch.channels_last)
        both = model_cl(images.contiguous(memory_format=torch.channels_last))
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------------------
# Registration, activations and depth arithmetic.

PUBLISHED = {
    "mobilenet_v3_large": ("v3-large_224_1.0_float.tgz", 75.2, "MobilenetV3"),
    "mobilenet_v3_small": ("v3-small_224_1.0_float.tgz", 67.5, "MobilenetV3"),
    "mobilenet_v3_large_minimalistic": ("v3-large-minimalistic_224_1.0_float.tgz", 72.3, "MobilenetV3"),
    "mobilenet_v3_small_minimalistic": ("v3-small-minimalistic_224_1.0_float.tgz", 61.9, "MobilenetV3"),
    "mobilenet_edgetpu": ("mobilenet_edgetpu_224_1.0.tgz", 75.6, "MobilenetEdgeTPU"),
    "mobilenet_edgetpu_075": ("mobilenet_edgetpu_224_0.75.tgz", 73.5, "MobilenetEdgeTPU"),
}


@pytest.mark.parametrize("name", NAMES)
def test_registration(name):
    """Factory metadata: 224 px, inception preprocessing, 1001 classes, scope, published checkpoint
    and slim README top-1; `slimtune models` lists it."""
    from slimtune.nets.summary import format_model_table

    spec = get_model_spec(name)
    tarball, top1, scope = PUBLISHED[name]
    assert (spec.default_image_size, spec.preprocessing, spec.checkpoint_num_classes) == (224, "inception", 1001)
    assert (spec.scope, spec.published_checkpoint, spec.published_top1) == (scope, tarball, top1)
    assert spec.classifier_scopes == (f"{scope}/Logits",)
    model = _meta_model(name, 1001)
    assert model.scope == scope and model.classifier_scope == f"{scope}/Logits/Conv2d_1c_1x1"
    assert spec.first_conv.replace("/", ".") + ".weight" in model.state_dict()
    assert not any(key.endswith("num_batches_tracked") for key in model.state_dict())
    row = next(line for line in format_model_table(name).splitlines() if line.startswith(name + " "))
    assert row.split() == [name, "224", "inception", "1001", f"{top1:.1f}", "-", tarball]


def test_models_command_lists_the_v3_family(capsys):
    """`slimtune models 'mobilenet_[ve]*'` shows all six with their checkpoints."""
    from slimtune.cli import main

    assert main(["models", "mobilenet_[ve][3d]*"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert sorted(row.split()[0] for row in rows) == sorted(NAMES)


@pytest.mark.parametrize("name, num_features", [
    ("mobilenet_v3_large", 1280), ("mobilenet_v3_small", 1024), ("mobilenet_v3_large_minimalistic", 1280),
    ("mobilenet_v3_small_minimalistic", 1024), ("mobilenet_edgetpu", 1280), ("mobilenet_edgetpu_075", 1280),
])
def test_feature_widths(name, num_features):
    """The classifier's input width; edgetpu_075 keeps 1280 through finegrain mode."""
    assert _meta_model(name, 1001).num_features == num_features
    assert _meta_model(name, 0).num_features == num_features


def test_finegrain_mode_keeps_the_last_layer_at_any_multiplier():
    """slim's v3 finegrain mode drops the multiplier of the last conv, below and above 1.0."""
    assert _meta_model("mobilenet_v3_large", 10, depth_multiplier=0.5).num_features == 640
    assert _meta_model("mobilenet_v3_large", 10, depth_multiplier=0.5,
                       finegrain_classification_mode=True).num_features == 1280
    assert _meta_model("mobilenet_v3_large", 10, depth_multiplier=1.5).num_features == 1920
    assert _meta_model("mobilenet_v3_large", 10, depth_multiplier=1.5,
                       finegrain_classification_mode=True).num_features == 1280
    assert _meta_model("mobilenet_edgetpu_075", 10, finegrain_classification_mode=False).num_features == 960


def test_activations_are_slims():
    """hard-swish is x * relu6(x + 3) / 6; the squeeze-excite gate multiplies by slim's 0.16667."""
    x = torch.tensor([-4.0, -3.0, -1.5, 0.0, 1.0, 3.0, 5.0])
    expected_swish = x * torch.clamp(x + 3, 0, 6) / 6
    torch.testing.assert_close(hard_swish(x.clone()), expected_swish)
    gate = hard_sigmoid(x.clone())
    assert HARD_SIGMOID_SCALE == 0.16667
    torch.testing.assert_close(gate, torch.clamp(x + 3, 0, 6) * 0.16667, rtol=0, atol=0)
    assert gate[-1].item() == pytest.approx(6 * 0.16667, abs=1e-7)   # 1.00002, not 1
    grad_x = x.clone().requires_grad_()
    hard_swish(grad_x * 1).sum().backward()   # out of place while recording: the input survives
    assert grad_x.grad is not None


# ------------------------------------------------------------------------------------------------
# Sizes, strides and options slim cannot build.

@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_edgetpu"])
@pytest.mark.parametrize("height, width", [(97, 97), (40, 97), (1, 1)])
@torch.no_grad()
def test_any_input_size(name, height, width):
    """Square inputs of any size and non-square ones whose last map is at least 7x7 (v3) or any (EdgeTPU)."""
    images = torch.zeros(2, 3, height, width)
    model = _model(name, 7, depth_multiplier=0.5, finegrain_classification_mode=True)
    if name == "mobilenet_v3_small" and height != width:
        with pytest.raises(ConfigError, match="reduce_to_1x1"):
            model(images)
        return
    logits, end_points = model.forward_endpoints(images)
    assert logits.shape == (2, 7)
    features = 1024 if name == "mobilenet_v3_small" else 1280
    assert end_points["global_pool"].shape == (2, features, 1, 1)
    headless = _model(name, 0, depth_multiplier=0.5, finegrain_classification_mode=True)
    assert headless(images).shape == (2, features)


def test_options_slim_cannot_build_are_config_errors():
    """use_explicit_padding (TypeError / shape mismatch in slim), an output_stride that would give
    reduce_to_1x1 an atrous rate (TypeError in slim), bad multipliers and keep probabilities."""
    with pytest.raises(ConfigError, match="use_explicit_padding"):
        _meta_model("mobilenet_v3_large", 10, use_explicit_padding=True)
    with pytest.raises(ConfigError, match="use_explicit_padding"):
        _meta_model("mobilenet_edgetpu", 10, use_explicit_padding=True)
    with pytest.raises(ConfigError, match="output_stride=16"):
        _meta_model("mobilenet_v3_large", 10, output_stride=16)
    assert _meta_model("mobilenet_v3_small", 10, output_stride=32) is not None   # reached at the last stride
    with pytest.raises(ConfigError, match="output_stride"):
        _meta_model("mobilenet_edgetpu", 10, output_stride=3)
    with pytest.raises(ConfigError, match="depth_multiplier"):
        _meta_model("mobilenet_v3_small", 10, depth_multiplier=0)
    with pytest.raises(ConfigError, match="dropout_keep_prob"):
        _meta_model("mobilenet_v3_small", 10, dropout_keep_prob=0.0)


@torch.no_grad()
def test_edgetpu_output_stride_keeps_fused_strides():
    """Past output_stride slim's fused blocks keep their stride (a functools.partial holds it): at
    output_stride 4 the map still shrinks to 1/8, and the later depthwise convs turn atrous."""
    model = _model("mobilenet_edgetpu", 3, output_stride=4, depth_multiplier=0.5)
    _, end_points = model.forward_endpoints(torch.zeros(1, 3, 96, 96))
    assert end_points["layer_7"].shape[-2:] == (12, 12)
    assert end_points["layer_24"].shape[-2:] == (12, 12)
    body = model.MobilenetEdgeTPU
    assert body.expanded_conv_5.expand.stride == (2, 2)
    assert body.expanded_conv_9.depthwise.rate == (2, 2)
    assert body.expanded_conv_21.depthwise.rate == (8, 8)
    # At 0.35 the strided fused block keeps its depth (16 -> 16): slim adds a 12x12 residual to a
    # 6x6 map and fails to build; so does slimtune, at construction.
    with pytest.raises(ConfigError, match="fused conv keeps stride 2"):
        _meta_model("mobilenet_edgetpu", 3, output_stride=4, depth_multiplier=0.35)


# ------------------------------------------------------------------------------------------------
# Training behaviour.

@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_edgetpu"])
def test_trains_end_to_end(name):
    """Gradients reach every parameter through hard-swish, squeeze-excite, fused blocks and the
    in-place ReLUs; steps lower the loss; training mode updates BN with slim's decay 0.997."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, dropout_keep_prob=1.0, depth_multiplier=0.35).train()
    images, labels = torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 1])
    first_bn = next(m for m in model.modules() if type(m).__name__ == "BatchNorm")
    assert first_bn.decay == 0.997 and first_bn.eps == 0.001 and first_bn.weight is not None
    before = first_bn.running_mean.clone()
    losses = sgd_losses(model, images, labels, steps=3)
    assert losses[-1] < losses[0]
    assert not torch.equal(first_bn.running_mean, before)
