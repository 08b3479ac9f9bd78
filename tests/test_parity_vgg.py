"""Parity of slimtune's vgg_a / vgg_16 / vgg_19, alexnet_v2 and overfeat with TF-Slim's research/slim.

Goldens (tests/golden/<config>.npz) come from tools/tf_reference/make_parity_fixtures.py. Each
family's seeded weights depend only on (seed, variable name, shape), so the configs of one family
(default, headless, global_pool, dense) share one TF checkpoint, written once per module run.
"""

from __future__ import annotations

import copy

import pytest
import torch

from slimtune.errors import ConfigError
from slimtune.nets import create_model, get_model_spec
from slimtune.testing import assert_matches_golden

from parity_support import FamilyCheckpoints, sgd_losses
from parity_support import golden as _golden
from parity_support import nchw as _nchw
from parity_support import net_kwargs as _net_kwargs

# Configs sharing one checkpoint: the first config of each family holds every variable of the rest.
FAMILIES = {
    "vgg_16": ("vgg_16", "vgg_16_headless", "vgg_16_gp256", "vgg_16_dense100"),
    "alexnet_v2": ("alexnet_v2", "alexnet_v2_headless", "alexnet_v2_gp257"),
    "overfeat": ("overfeat", "overfeat_dense263"),
    "vgg_a": ("vgg_a",),
    "vgg_19": ("vgg_19",),
}
FAMILY_OF = {config: family for family, configs in FAMILIES.items() for config in configs}
ALL_CONFIGS = [config for configs in FAMILIES.values() for config in configs]
# Each ~140M-parameter run costs several seconds on 2 cores. By default: the published vgg_16, VGG's
# dense SAME-padded fc6, and the whole (cheaper) alexnet family, which exercises the head shared by
# all five nets (headless, global_pool at an odd size); the rest run with -m slow.
FAST_CONFIGS = {"vgg_16", "vgg_16_dense100", "alexnet_v2", "alexnet_v2_headless", "alexnet_v2_gp257"}
NET_NAMES = ("vgg_a", "vgg_16", "vgg_19", "alexnet_v2", "overfeat")


def _param(config: str):
    marks = [] if config in FAST_CONFIGS else [pytest.mark.slow]
    return pytest.param(config, marks=marks, id=config)





@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    store = FamilyCheckpoints(tmp_path_factory.mktemp("vgg_family_ckpt"))
    yield store
    store.release()


@pytest.fixture(scope="module")
def alexnet_10():
    """A freshly initialized 10-class alexnet_v2 (never modified by the tests that share it)."""
    torch.manual_seed(0)
    return create_model("alexnet_v2", num_classes=10)


def _copy_into(name: str, source: torch.nn.Module, num_classes: int, **kwargs) -> torch.nn.Module:
    """A net built without initialization that takes `source`'s weights (all but fc8 when headless)."""
    model = _meta_model(name, num_classes, **kwargs).to_empty(device="cpu")
    result = model.load_state_dict(source.state_dict(), strict=False)
    assert not result.missing_keys
    assert all(".fc8." in key for key in result.unexpected_keys)
    return model


def _meta_model(name: str, num_classes: int, **kwargs):
    """A net without real storage: enough for names, shapes and shape arithmetic, at no cost."""
    with torch.device("meta"):
        return create_model(name, num_classes=num_classes, **kwargs)


@pytest.mark.parametrize("config", [_param(c) for c in ALL_CONFIGS])
def test_matches_tf_slim(config, checkpoints):
    """Logits and every slim end point (names, order, shapes, values) match TF-Slim."""
    golden = _golden(config)
    path, stored = checkpoints.get(FAMILY_OF[config])
    for name, shape in golden.variables:  # the shared checkpoint holds exactly this config's weights
        assert stored[name] == tuple(shape)
    model = create_model(golden.model_name, num_classes=golden.num_classes or 0, checkpoint_path=str(path),
                         **_net_kwargs(golden)).eval()
    images = _nchw(golden)
    with torch.no_grad():
        logits, end_points = model.forward_endpoints(images)
        if config == "alexnet_v2":
            channels_last = model(images.contiguous(memory_format=torch.channels_last))
            torch.testing.assert_close(channels_last, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())
    assert list(end_points) == list(golden.end_points)
    assert "Predictions" not in end_points
    if golden.num_classes:
        assert_matches_golden(logits, end_points, golden)
    else:
        # Headless: slim returns fc7 as [N, 1, 1, 4096]; slimtune's model(x) returns it pooled, [N, 4096].
        assert logits.shape == (golden.batch, 4096) == (golden.batch, model.num_features)
        assert_matches_golden(logits[:, :, None, None], end_points, golden)
        fc7 = end_points[f"{model.scope}/fc7"]
        assert torch.equal(logits, fc7.flatten(1))


@pytest.mark.parametrize("name", NET_NAMES)
def test_registration(name):
    """Factory metadata: image size, preprocessing, checkpoint classes, scope, published checkpoint."""
    spec = get_model_spec(name)
    published = {"vgg_16": "vgg_16_2016_08_28.tar.gz", "vgg_19": "vgg_19_2016_08_28.tar.gz"}
    assert spec.default_image_size == (231 if name == "overfeat" else 224)
    assert spec.preprocessing == "vgg"
    assert spec.checkpoint_num_classes == 1000
    assert spec.scope == name
    assert spec.published_checkpoint == published.get(name)
    model = _meta_model(name, 1000)  # names, heads and widths: tests/test_models.py
    assert not any("BatchNorm" in key for key in model.state_dict())


@pytest.mark.parametrize("name, smallest, fc8_map", [
    ("vgg_a", 224, 1), ("vgg_16", 224, 1), ("vgg_19", 224, 1), ("alexnet_v2", 195, 1), ("overfeat", 231, 1),
])
def test_smallest_input_and_too_small_input(name, smallest, fc8_map):
    """The documented smallest input works; one pixel less is a ConfigError, not a torch crash."""
    model = _meta_model(name, 7).eval()
    logits, end_points = model.forward_endpoints(torch.empty(2, 3, smallest, smallest, device="meta"))
    assert logits.shape == (2, 7)
    assert end_points[f"{name}/fc6"].shape[-2:] == (fc8_map, fc8_map)
    for height, width in ((smallest - 1, smallest), (smallest, smallest - 1)):
        with pytest.raises(ConfigError, match="too small"):
            model(torch.empty(2, 3, height, width, device="meta"))


@pytest.mark.parametrize("name, height, width, dense_map", [
    ("vgg_16", 97, 131, (3, 4)),        # SAME fc6: H//32 x W//32
    ("alexnet_v2", 257, 301, (2, 4)),
    ("overfeat", 263, 300, (2, 3)),
])
def test_any_input_size(name, height, width, dense_map):
    """Odd sizes: dense maps with spatial_squeeze=False, [N, classes] with global_pool, pooled headless."""
    padding = {"fc_conv_padding": "SAME"} if name.startswith("vgg") else {}
    images = torch.empty(2, 3, height, width, device="meta")
    dense = _meta_model(name, 5, spatial_squeeze=False, **padding)
    logits, end_points = dense.forward_endpoints(images)
    assert logits.shape == (2, 5) + dense_map
    assert end_points[f"{name}/fc8"] is logits
    pooled, end_points = _meta_model(name, 5, global_pool=True, **padding).forward_endpoints(images)
    assert pooled.shape == (2, 5)
    assert end_points["global_pool"].shape == (2, 4096, 1, 1)
    assert list(end_points)[-2:] == ["global_pool", f"{name}/fc8"]
    assert _meta_model(name, 0, **padding)(images).shape == (2, 4096)
    with pytest.raises(ConfigError, match="spatial_squeeze=False"):
        _meta_model(name, 5, **padding)(images)


def test_headless_pools_a_dense_fc7_map(alexnet_10):
    """num_classes=0 on a bigger input averages slim's fc7 map into [N, 4096] features."""
    model = _copy_into("alexnet_v2", alexnet_10, num_classes=0).eval()
    images = torch.randn(2, 3, 257, 257, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features, end_points = model.forward_endpoints(images)
    fc7 = end_points["alexnet_v2/fc7"]
    assert fc7.shape == (2, 4096, 2, 2)
    torch.testing.assert_close(features, fc7.mean(dim=(2, 3)))
    assert "alexnet_v2/fc8" not in end_points


def test_invalid_options_are_config_errors():
    """Wrong kwargs fail at build time with a ConfigError naming the option."""
    with pytest.raises(ConfigError, match="fc_conv_padding"):
        _meta_model("vgg_16", 10, fc_conv_padding="FULL")
    with pytest.raises(ConfigError, match="dropout_keep_prob"):
        _meta_model("alexnet_v2", 10, dropout_keep_prob=0.0)
    with pytest.raises(ConfigError, match="dropout_keep_prob"):
        _meta_model("overfeat", 10, dropout_keep_prob=1.5)


def test_dropout_follows_train_and_eval_modes(alexnet_10):
    """Dropout6/7 act only in training mode; keep_prob=1.0 makes training deterministic."""
    model = copy.deepcopy(alexnet_10)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        evaluated = model.eval()(images)
        assert torch.equal(model(images), evaluated)
        torch.manual_seed(0)
        trained = model.train()(images)
        assert not torch.allclose(trained, evaluated)
        kept = _copy_into("alexnet_v2", alexnet_10, num_classes=10, dropout_keep_prob=1.0)
        torch.testing.assert_close(kept.train()(images), evaluated)


def test_trains_end_to_end(alexnet_10):
    """Gradients reach every parameter through the in-place ReLUs, and a step lowers the loss."""
    model = _copy_into("alexnet_v2", alexnet_10, num_classes=10, dropout_keep_prob=1.0).train()
    generator = torch.Generator().manual_seed(3)
    images, labels = torch.randn(4, 3, 224, 224, generator=generator), torch.tensor([0, 1, 2, 1])
    losses = sgd_losses(model, images, labels, steps=2)
    assert losses[1] < losses[0]


def _check_alexnet_style_init(body, conv_bias: float, fc_bias: float) -> None:
    """Xavier convs, truncated_normal(0.005) fc6..fc8, and the arg scope's bias constants."""
    for index in range(1, 6):
        conv = getattr(body, f"conv{index}")
        out_channels, in_channels, kh, kw = conv.weight.shape
        assert conv.weight.abs().max() <= (6.0 / ((in_channels + out_channels) * kh * kw)) ** 0.5
        assert torch.all(conv.bias == conv_bias)
    for layer, bias in ((body.fc6, fc_bias), (body.fc7, fc_bias), (body.fc8, 0.0)):
        assert layer.weight.abs().max() <= 0.01  # truncated at two standard deviations
        assert layer.weight.std().item() == pytest.approx(0.005 * 0.88, rel=0.05)
        assert torch.all(layer.bias == bias)


def test_alexnet_initialization_follows_its_arg_scope(alexnet_10):
    """alexnet_v2_arg_scope: xavier convs with biases 0.1; truncated_normal(0.005) fc6..fc8."""
    _check_alexnet_style_init(alexnet_10.alexnet_v2, conv_bias=0.1, fc_bias=0.1)


@pytest.mark.slow
def test_overfeat_initialization_follows_its_arg_scope():
    """overfeat_arg_scope: xavier convs with zero biases; truncated_normal(0.005) fc6..fc8."""
    torch.manual_seed(0)
    _check_alexnet_style_init(create_model("overfeat", num_classes=10).overfeat, conv_bias=0.0, fc_bias=0.1)


@pytest.mark.slow
def test_vgg_initialization_is_xavier_with_zero_biases():
    """vgg_arg_scope: slim's default xavier weights everywhere (fc8 included), zero biases."""
    torch.manual_seed(0)
    model = create_model("vgg_a", num_classes=10)
    for key, value in model.state_dict().items():
        if key.endswith(".bias"):
            assert torch.all(value == 0), key
        else:
            out_channels, in_channels, kh, kw = value.shape
            bound = (6.0 / ((in_channels + out_channels) * kh * kw)) ** 0.5
            assert value.abs().max() <= bound, key
            assert value.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1), key

