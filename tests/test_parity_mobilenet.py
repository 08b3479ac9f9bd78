"""Parity of slimtune's MobileNet v1 / v2 with TF-Slim's research/slim (nets/mobilenet_v1.py,
nets/mobilenet/mobilenet_v2.py), plus their options, sizes and training behaviour.

Goldens (tests/golden/<config>.npz) come from tools/tf_reference/make_parity_fixtures.py. Seeded
weights depend only on (seed, variable name, shape), so configs with the same variables share
one TF checkpoint, written once per family while that family's tests run.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from slimtune.checkpoint.restore import restore
from slimtune.errors import ConfigError
from slimtune.nets import create_model, get_model_spec
from slimtune.nets.mobilenet_common import make_divisible
from slimtune.testing import assert_matches_golden, seeded_slim_weights

from parity_support import GOLDEN_DIR, FamilyCheckpoints, check_headless_matches_pooled_end_point, sgd_losses
from parity_support import golden as _golden
from parity_support import nchw as _nchw
from parity_support import net_kwargs as _net_kwargs

# Configs sharing one checkpoint: each family's configs have exactly the same variables.
FAMILIES = {
    "mobilenet_v1": ("mobilenet_v1", "mobilenet_v1_160"),
    "mobilenet_v1_075": ("mobilenet_v1_075",),
    "mobilenet_v1_050": ("mobilenet_v1_050", "mobilenet_v1_050_160"),
    "mobilenet_v1_025": ("mobilenet_v1_025", "mobilenet_v1_025_128", "mobilenet_v1_025_gp193",
                         "mobilenet_v1_025_dense320"),
    "mobilenet_v2": ("mobilenet_v2",),
    "mobilenet_v2_140": ("mobilenet_v2_140",),
    "mobilenet_v2_035": ("mobilenet_v2_035", "mobilenet_v2_035_os16", "mobilenet_v2_035_explicit150"),
}
# Widths and sizes that the default run covers through another config (the published 1.0 nets,
# 0.5 at 160 and 160 px): they run with `-m slow`.
SLOW_CONFIGS = {"mobilenet_v1_075", "mobilenet_v1_050", "mobilenet_v1_160", "mobilenet_v2_140"}
FAMILY_OF = {config: family for family, configs in FAMILIES.items() for config in configs}
ALL_CONFIGS = [config for configs in FAMILIES.values() for config in configs]
V1_NAMES = ("mobilenet_v1", "mobilenet_v1_075", "mobilenet_v1_050", "mobilenet_v1_025")
V2_NAMES = ("mobilenet_v2", "mobilenet_v2_140", "mobilenet_v2_035")
# What slim's headless net returns (before squeezing): the pooled map feeding the classifier.
HEADLESS_END_POINT = {"MobilenetV1": "AvgPool_1a", "MobilenetV2": "global_pool"}





def _end_point_tolerance(golden) -> float:
    """Logits are held to 1e-4 of the largest |logit| everywhere. v2's end points get 3e-4 of
    their own largest value: its 52 layers of random weights amplify float32 rounding, and in
    mobilenet_v2's layer_19 a float64 run of this net is 1.4e-4 from TF's own float32 result (so
    TF itself is that far off) and 1.2e-4 from the float32 run, which is 1.8e-4 from TF."""
    return 3e-4 if golden.model_name.startswith("mobilenet_v2") else 1e-4





@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    store = FamilyCheckpoints(tmp_path_factory.mktemp("mobilenet_family_ckpt"))
    yield store
    store.release()


def _model(name: str, num_classes: int, **kwargs):
    """A freshly initialized net in eval mode (MobileNets build in well under a second; meta
    tensors would be slower here)."""
    return create_model(name, num_classes=num_classes, **kwargs).eval()


# ------------------------------------------------------------------------------------------------
# Parity with TF-Slim.

def _param(config: str):
    return pytest.param(config, marks=[pytest.mark.slow] if config in SLOW_CONFIGS else [], id=config)


@pytest.mark.parametrize("config", [_param(config) for config in ALL_CONFIGS])
def test_matches_tf_slim(config, checkpoints):
    """Logits and every slim end point (names, order, shapes, values) match TF-Slim."""
    golden = _golden(config)
    path, stored = checkpoints.get(FAMILY_OF[config])
    assert stored == dict(golden.variables)  # the shared checkpoint holds exactly this config's weights
    model = create_model(golden.model_name, num_classes=golden.num_classes, checkpoint_path=str(path),
                         **_net_kwargs(golden)).eval()
    images = _nchw(golden)
    with torch.no_grad():
        logits, end_points = model.forward_endpoints(images)
    assert list(end_points) == list(golden.end_points)
    assert_matches_golden(logits, end_points, golden, rtol_of_max=1e-4,
                          end_point_rtol_of_max=_end_point_tolerance(golden))
    assert end_points["Logits"] is logits


def test_tf_written_checkpoint_reproduces_tf():
    """A V2 checkpoint written by TensorFlow's own Saver (prefix path, 10 classes) loads through
    create_model and reproduces TF's outputs: the real-world path for slim's published .ckpt files."""
    golden = _golden("mobilenet_v1_025_ckpt")
    prefix = GOLDEN_DIR / "mobilenet_v1_025_ckpt.ckpt"
    assert prefix.with_name(prefix.name + ".index").is_file()
    model = create_model(golden.model_name, num_classes=golden.num_classes, checkpoint_path=str(prefix),
                         **_net_kwargs(golden)).eval()
    with torch.no_grad():
        logits, end_points = model.forward_endpoints(_nchw(golden))
    assert logits.shape == (2, 10)
    assert_matches_golden(logits, end_points, golden)


@pytest.mark.parametrize("config", ["mobilenet_v1_025", "mobilenet_v2_035"])
def test_headless_returns_slims_pooled_features(config):
    """num_classes=0: no Logits variables; model(x) is slim's pooled map [N, C, 1, 1] as [N, C]."""
    scope = "MobilenetV1" if config.startswith("mobilenet_v1") else "MobilenetV2"
    check_headless_matches_pooled_end_point(config, HEADLESS_END_POINT[scope])


@pytest.mark.parametrize("config", ["mobilenet_v1_025", "mobilenet_v2_035"])
def test_channels_last_input_gives_the_same_logits(config, checkpoints):
    """A channels_last batch flows through (depthwise convs, asymmetric pads) to the same logits."""
    golden = _golden(config)
    path, _ = checkpoints.get(FAMILY_OF[config])
    model = create_model(golden.model_name, num_classes=golden.num_classes, checkpoint_path=str(path),
                         **_net_kwargs(golden)).eval()
    images = _nchw(golden)
    with torch.no_grad():
        expected = model(images)
        actual = model(images.contiguous(memory_format=torch.channels_last))
        model_cl = model.to(memory_format=torch.channels_last)
        both = model_cl(images.contiguous(memory_format=torch.channels_last))
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------------------
# Registration and depth arithmetic.

@pytest.mark.parametrize("name", V1_NAMES + V2_NAMES)
def test_registration(name):
    """Factory metadata: 224 px, inception preprocessing, 1001 classes, scope, published checkpoint."""
    spec = get_model_spec(name)
    version = "V1" if name.startswith("mobilenet_v1") else "V2"
    multiplier = {"075": "0.75", "050": "0.5", "025": "0.25", "140": "1.4", "035": "0.35"}.get(name[-3:], "1.0")
    assert spec.default_image_size == 224
    assert spec.preprocessing == "inception"
    assert spec.checkpoint_num_classes == 1001
    assert spec.scope == f"Mobilenet{version}"
    assert spec.published_checkpoint == f"mobilenet_{version.lower()}_{multiplier}_224.tgz"
    model = _model(name, 1001)  # names and heads: tests/test_models.py
    assert not any(key.endswith("num_batches_tracked") for key in model.state_dict())


@pytest.mark.parametrize("name, num_features", [
    ("mobilenet_v1", 1024), ("mobilenet_v1_075", 768), ("mobilenet_v1_050", 512), ("mobilenet_v1_025", 256),
    ("mobilenet_v2", 1280), ("mobilenet_v2_140", 1792), ("mobilenet_v2_035", 1280),
])
def test_feature_widths(name, num_features):
    """The classifier's input width: v1's depth(1024); v2's 1280 scaled up (1.4) but never down (0.35)."""
    assert _model(name, 1001).num_features == num_features
    assert _model(name, 0).num_features == num_features


def test_make_divisible_matches_slim():
    """slim's _make_divisible: nearest multiple of 8, at least min_value, never 10% below."""
    assert make_divisible(32 * 0.35, 8) == 16       # 11.2 -> 8 is more than 10% below -> 16
    assert make_divisible(16 * 0.35, 8) == 8
    assert make_divisible(96 * 0.35, 8) == 32       # 33.6 -> 32
    assert make_divisible(320 * 1.4, 8) == 448
    assert make_divisible(1280 * 0.35, 8) == 448
    assert make_divisible(1280 / 0.35 * 0.35, 8) == 1280
    assert make_divisible(3, 8, min_value=16) == 16
    assert make_divisible(20, 16) == 32             # 16 < 0.9 * 20


def test_v2_finegrain_mode_only_keeps_the_last_layer_wide():
    """Without finegrain_classification_mode a 0.35 net's last conv shrinks to 448; above 1.0 it is ignored."""
    plain = _model("mobilenet_v2_035", 1001, finegrain_classification_mode=False)
    assert plain.num_features == 448
    wide = _model("mobilenet_v2_140", 1001, finegrain_classification_mode=True)
    assert wide.num_features == 1792
    divisible = _model("mobilenet_v2", 10, divisible_by=16, min_depth=16)
    assert divisible.MobilenetV2.expanded_conv.project.weight.shape[0] == 16
    assert divisible.MobilenetV2.expanded_conv_1.project.weight.shape[0] == 32   # 24 rounds up to 32


def test_v1_min_depth():
    """min_depth bounds every thinned layer, as max(int(d * multiplier), min_depth)."""
    model = _model("mobilenet_v1", 10, depth_multiplier=0.1, min_depth=16)
    assert model.MobilenetV1.Conv2d_0.weight.shape[0] == 16          # 3.2 -> 16
    assert model.MobilenetV1.Conv2d_13_pointwise.weight.shape[0] == 102
    assert model.num_features == 102


# ------------------------------------------------------------------------------------------------
# Sizes, strides and padding modes.

@pytest.mark.parametrize("name", ["mobilenet_v1_025", "mobilenet_v2_035"])
@pytest.mark.parametrize("height, width", [(97, 131), (33, 40), (1, 1)])
@torch.no_grad()
def test_any_input_size(name, height, width):
    """Any size works: maps shrink by ceil(x / 2) per stride, headless features stay [N, C]."""
    images = torch.zeros(2, 3, height, width)
    logits, end_points = _model(name, 7).forward_endpoints(images)
    assert logits.shape == (2, 7)
    last = "Conv2d_13_pointwise" if "v1" in name else "layer_19"
    expected = (-(-height // 32), -(-width // 32))
    assert end_points[last].shape[-2:] == expected
    assert _model(name, 0)(images).shape == (2, 256 if "v1" in name else 1280)


@torch.no_grad()
def test_v1_dense_logits_and_squeeze_error():
    """AvgPool_1a keeps slim's stride 2: a 10x13 map gives 2x4 logits; squeezing them is a ConfigError."""
    images = torch.zeros(2, 3, 320, 416)
    logits, end_points = _model("mobilenet_v1_025", 5, spatial_squeeze=False).forward_endpoints(images)
    assert end_points["Conv2d_13_pointwise"].shape[-2:] == (10, 13)
    assert logits.shape == (2, 5, 2, 4)
    assert end_points["Predictions"].shape == (2, 5, 2, 4)
    with pytest.raises(ConfigError, match="spatial_squeeze=False"):
        _model("mobilenet_v1_025", 5)(images)
    pooled, end_points = _model("mobilenet_v1_025", 5, global_pool=True).forward_endpoints(images)
    assert pooled.shape == (2, 5) and end_points["global_pool"].shape == (2, 256, 1, 1)
    assert "AvgPool_1a" not in end_points


@pytest.mark.parametrize("name, last", [("mobilenet_v1_025", "Conv2d_13_pointwise"), ("mobilenet_v2_035", "layer_19")])
@pytest.mark.parametrize("output_stride", [8, 16])
@torch.no_grad()
def test_output_stride_keeps_resolution(name, last, output_stride):
    """output_stride turns the later strides into atrous rates: the final map is input / stride."""
    pooling = {"global_pool": True} if "v1" in name else {}   # v2 always pools globally
    model = _model(name, 3, output_stride=output_stride, **pooling)
    logits, end_points = model.forward_endpoints(torch.zeros(1, 3, 224, 224))
    assert end_points[last].shape[-2:] == (224 // output_stride,) * 2
    assert logits.shape == (1, 3)


def test_v1_explicit_padding_equals_same_when_every_strided_input_is_odd():
    """use_explicit_padding pads (1, 1) where TF's SAME pads (0, 1) at even sizes: at 225 every
    stride-2 layer sees an odd map and both agree; at 224 they differ from the first layer on."""
    golden = _golden("mobilenet_v1_025")
    weights = seeded_slim_weights(golden.variables, golden.seed)
    same = create_model("mobilenet_v1_025", num_classes=1001).eval()
    explicit = create_model("mobilenet_v1_025", num_classes=1001, use_explicit_padding=True).eval()
    restore(same, weights)
    restore(explicit, weights)
    torch.manual_seed(0)
    with torch.no_grad():
        odd = torch.randn(2, 3, 225, 225)
        torch.testing.assert_close(explicit(odd), same(odd))
        even = torch.randn(2, 3, 224, 224)
        (same_logits, same_points), (explicit_logits, explicit_points) = (
            same.forward_endpoints(even), explicit.forward_endpoints(even))
    assert same_points["Conv2d_0"].shape == explicit_points["Conv2d_0"].shape == (2, 8, 112, 112)
    difference = (explicit_logits - same_logits).abs().max()
    assert difference > 1e-3 * same_logits.abs().max()


def test_invalid_options_are_config_errors():
    """Wrong kwargs fail at build time with a ConfigError naming the option."""
    with pytest.raises(ConfigError, match="depth_multiplier"):
        _model("mobilenet_v1", 10, depth_multiplier=0)
    with pytest.raises(ConfigError, match="depth_multiplier"):
        _model("mobilenet_v2", 10, depth_multiplier=-1.0)
    with pytest.raises(ConfigError, match="output_stride"):
        _model("mobilenet_v1", 10, output_stride=4)
    with pytest.raises(ConfigError, match="output_stride"):
        _model("mobilenet_v2", 10, output_stride=3)
    with pytest.raises(ConfigError, match="dropout_keep_prob"):
        _model("mobilenet_v2", 10, dropout_keep_prob=0.0)
    with pytest.raises(ConfigError, match="dropout_keep_prob"):
        _model("mobilenet_v1", 10, dropout_keep_prob=1.5)


# ------------------------------------------------------------------------------------------------
# Training behaviour.

@pytest.mark.parametrize("name", ["mobilenet_v1_025", "mobilenet_v2_035"])
def test_trains_end_to_end(name):
    """Gradients reach every parameter through the in-place ReLU6s and residual adds; a step helps;
    training mode updates BN moving statistics with slim's decay."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, dropout_keep_prob=1.0).train()
    images, labels = torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 1])
    first_bn = next(m for m in model.modules() if type(m).__name__ == "BatchNorm")
    decay = 0.9997 if "v1" in name else 0.997
    assert first_bn.decay == decay and first_bn.eps == 0.001 and first_bn.weight is not None
    losses = sgd_losses(model, images, labels, steps=3)
    assert max(losses[1:]) < losses[0]
    assert not torch.all(first_bn.running_mean == 0)


def test_v2_residual_blocks():
    """Residuals join exactly the stride-1 blocks whose depth does not change (10 of 17 in V2)."""
    body = _model("mobilenet_v2", 10).MobilenetV2
    residual = [name for name, module in body.named_children() if getattr(module, "residual", False)]
    assert residual == ["expanded_conv_2", "expanded_conv_4", "expanded_conv_5", "expanded_conv_7",
                        "expanded_conv_8", "expanded_conv_9", "expanded_conv_11", "expanded_conv_12",
                        "expanded_conv_14", "expanded_conv_15"]
    assert body.expanded_conv.expand is None          # the first block does not expand
    assert body.expanded_conv_1.expand.weight.shape[:2] == (96, 16)


@pytest.mark.parametrize("config, keep", [("mobilenet_v1_025", 0.999), ("mobilenet_v2_035", 0.8)])
def test_dropout_defaults_and_modes(config, keep):
    """Dropout keeps slim's probability (v1 0.999, v2's training_scope 0.8) and acts only in training."""
    golden = _golden(config)
    assert create_model(golden.model_name, num_classes=10).dropout.p == pytest.approx(1 - keep)
    model = create_model(golden.model_name, num_classes=golden.num_classes, dropout_keep_prob=0.5)
    restore(model, seeded_slim_weights(golden.variables, golden.seed))
    for module in model.modules():   # BN stays on its moving statistics: only dropout may differ
        if hasattr(module, "frozen"):
            module.frozen = True
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        evaluated = model.eval()(images)
        assert torch.equal(model(images), evaluated)
        model.train()
        dropped = model(images)
        assert (dropped - evaluated).abs().max() > 0.1 * evaluated.abs().max()
        model.dropout.p = 0.0
        torch.testing.assert_close(model(images), evaluated)


@pytest.mark.parametrize("name", ["mobilenet_v1_025", "mobilenet_v2_035"])
def test_initialization_follows_slim_arg_scopes(name):
    """truncated_normal(stddev=0.09) kernels (depthwise and classifier too), zero biases, BN at 1/0/0/1."""
    torch.manual_seed(0)
    state = create_model(name, num_classes=10).state_dict()
    kernels = torch.cat([v.flatten() for k, v in state.items() if k.endswith("weight") and v.dim() == 4])
    assert kernels.abs().max() <= 0.18
    assert kernels.std().item() == pytest.approx(0.09 * 0.88, rel=0.05)
    for key, value in state.items():
        if key.endswith("Conv2d_1c_1x1.bias") or key.endswith("BatchNorm.bias") or key.endswith("running_mean"):
            assert torch.all(value == 0), key
        elif key.endswith("BatchNorm.weight") or key.endswith("running_var"):
            assert torch.all(value == 1), key


# ------------------------------------------------------------------------------------------------
# slim.separable_conv2d with num_outputs (for Inception v2 / NASNet; checked against TF by hand).

def test_separable_conv_is_depthwise_then_pointwise():
    """SeparableConv2d = DepthwiseConv2d(multiplier M, TF padding) then a 1x1 conv with the BN/bias,
    under one scope with slim's leaves, and a TF [k, k, C, M] kernel restores into it."""
    from torch import nn
    from slimtune.nets.layers import Conv2d, DepthwiseConv2d, batch_norm_factory
    from slimtune.nets.mobilenet_common import SeparableConv2d

    torch.manual_seed(0)
    root = nn.Module()
    root.Conv2d_1a_7x7 = SeparableConv2d(3, 24, 7, stride=2, depth_multiplier=8,
                                         normalizer=batch_norm_factory(scale=True))
    shapes = {key: tuple(value.shape) for key, value in root.state_dict().items()}
    assert shapes == {"Conv2d_1a_7x7.depthwise_weight": (24, 1, 7, 7), "Conv2d_1a_7x7.pointwise_weight": (24, 24, 1, 1),
                      "Conv2d_1a_7x7.BatchNorm.weight": (24,), "Conv2d_1a_7x7.BatchNorm.bias": (24,),
                      "Conv2d_1a_7x7.BatchNorm.running_mean": (24,), "Conv2d_1a_7x7.BatchNorm.running_var": (24,)}
    tf_kernel = np.random.default_rng(0).standard_normal((7, 7, 3, 8)).astype(np.float32)
    weights = seeded_slim_weights([("Conv2d_1a_7x7/pointwise_weights", (1, 1, 24, 24)),
                                   ("Conv2d_1a_7x7/BatchNorm/gamma", (24,)), ("Conv2d_1a_7x7/BatchNorm/beta", (24,)),
                                   ("Conv2d_1a_7x7/BatchNorm/moving_mean", (24,)),
                                   ("Conv2d_1a_7x7/BatchNorm/moving_variance", (24,))])
    restore(root, {"Conv2d_1a_7x7/depthwise_weights": tf_kernel, **weights})
    separable = root.Conv2d_1a_7x7.eval()
    # TF's depthwise output channel c*M + m comes from input channel c with kernel [:, :, c, m].
    assert torch.equal(separable.depthwise_weight[2 * 8 + 5, 0], torch.from_numpy(tf_kernel[:, :, 2, 5]))
    depthwise = DepthwiseConv2d(3, 7, 2, depth_multiplier=8, activation=None)
    pointwise = Conv2d(24, 24, 1, normalizer=batch_norm_factory(scale=True)).eval()
    with torch.no_grad():
        depthwise.depthwise_weight.copy_(separable.depthwise_weight)
        pointwise.weight.copy_(separable.pointwise_weight)
        pointwise.BatchNorm.load_state_dict(separable.BatchNorm.state_dict())
        images = torch.randn(2, 3, 20, 21)
        folded = separable(images)  # no autograd: BN folded into the pointwise kernel
        torch.testing.assert_close(folded, pointwise(depthwise(images)))
    unfolded = separable(images)  # autograd on: BN runs as its own op
    torch.testing.assert_close(folded, unfolded.detach(), rtol=1e-5, atol=1e-5)
    assert unfolded.shape == (2, 24, 10, 11)
    biased = SeparableConv2d(5, 10, 3, rate=2, depth_multiplier=2)
    assert biased.bias.shape == (10,) and biased.BatchNorm is None
