"""Parity of slimtune's resnet_v1_* / resnet_v2_* with TF-Slim's research/slim, plus their options.

Goldens (tests/golden/<config>.npz) come from tools/tf_reference/make_parity_fixtures.py. Seeded
weights depend only on (seed, variable name, shape), so configs that differ only in forward-time
options (output_stride, headless, global_pool, ...) share one TF checkpoint per family.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from slimtune.errors import ConfigError
from slimtune.nets import create_model, get_model_spec
from slimtune.nets.layers import BatchNorm
from slimtune.testing import assert_matches_golden

from parity_support import FamilyCheckpoints
from parity_support import golden as _golden
from parity_support import nchw as _nchw
from parity_support import net_kwargs as _net_kwargs

# The first config of each family holds every variable of the rest (headless ones lack logits).
FAMILIES = {
    "resnet_v1_50": ("resnet_v1_50", "resnet_v1_50_headless", "resnet_v1_50_os16", "resnet_v1_50_os8",
                     "resnet_v1_50_nonstrided_os16"),
    "resnet_v1_50_dm025_dense65": ("resnet_v1_50_dm025_dense65",),
    "resnet_v2_50": ("resnet_v2_50", "resnet_v2_50_headless", "resnet_v2_50_nopool", "resnet_v2_50_os8"),
    "resnet_v1_101": ("resnet_v1_101",),
    "resnet_v2_101": ("resnet_v2_101",),
    "resnet_v1_152": ("resnet_v1_152",),
    "resnet_v2_152": ("resnet_v2_152",),
    "resnet_v1_200": ("resnet_v1_200",),
    "resnet_v2_200": ("resnet_v2_200",),
}
# Deeper nets repeat the 50-layer units (10-60 s each on 2 cores), so they run with -m slow.
SLOW_FAMILIES = {"resnet_v1_101", "resnet_v2_101", "resnet_v1_152", "resnet_v2_152", "resnet_v1_200",
                 "resnet_v2_200"}
# Variants whose code paths a default config already covers (os8 / nonstrided_os16, v2's headless).
SLOW_CONFIGS = {"resnet_v1_50_os16", "resnet_v1_50_headless"}
FAMILY_OF = {config: family for family, configs in FAMILIES.items() for config in configs}
ALL_CONFIGS = [config for configs in FAMILIES.values() for config in configs]
CHANNELS_LAST_CONFIGS = {"resnet_v1_50", "resnet_v2_50_nopool"}
NET_NAMES = [f"resnet_v{version}_{depth}" for version in (1, 2) for depth in (50, 101, 152, 200)]
UNITS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}


def _param(config: str):
    slow = FAMILY_OF[config] in SLOW_FAMILIES or config in SLOW_CONFIGS
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(config, marks=marks, id=config)





def _meta_model(name: str, num_classes: int, **kwargs):
    """A net without storage: names, shapes and shape arithmetic at no cost."""
    with torch.device("meta"):
        return create_model(name, num_classes=num_classes, **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    store = FamilyCheckpoints(tmp_path_factory.mktemp("resnet_family_ckpt"))
    yield store
    store.release()


# --- parity with TF-Slim --------------------------------------------------------------------------

@pytest.mark.parametrize("config", [_param(c) for c in ALL_CONFIGS])
def test_matches_tf_slim(config, checkpoints):
    """Restored from a TF checkpoint: logits and every slim end point (names, order, shapes, values)."""
    golden = _golden(config)
    path, stored = checkpoints.get(FAMILY_OF[config])
    for name, shape in golden.variables:
        assert stored[name] == tuple(shape)
    model = create_model(golden.model_name, num_classes=golden.num_classes or 0, checkpoint_path=str(path),
                         **_net_kwargs(golden)).eval()
    images = _nchw(golden)
    with torch.no_grad():
        logits, end_points = model.forward_endpoints(images)
        if config in CHANNELS_LAST_CONFIGS:
            channels_last = model(images.contiguous(memory_format=torch.channels_last))
            torch.testing.assert_close(channels_last, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())
    assert list(end_points) == list(golden.end_points)
    if golden.num_classes:
        assert_matches_golden(logits, end_points, golden)
        assert torch.equal(end_points["predictions"], torch.softmax(logits, dim=1))
    else:
        # Headless: slim returns the pooled [N, 1, 1, C] map; model(x) returns it as [N, C].
        assert logits.shape == (golden.batch, model.num_features)
        assert_matches_golden(logits[:, :, None, None], end_points, golden)
        assert torch.equal(logits, end_points["global_pool"].flatten(1))


# --- registration and structure ---------------------------------------------------------------------

@pytest.mark.parametrize("name", NET_NAMES)
def test_registration(name):
    """v1: vgg preprocessing at 224, 1000 classes; v2: inception at 299 (not slim's 'vgg'), 1001."""
    spec = get_model_spec(name)
    version, depth = int(name[8]), int(name.rsplit("_", 1)[1])
    date = "2016_08_28" if version == 1 else "2017_04_14"
    assert spec.scope == name
    assert spec.published_checkpoint == (None if depth == 200 else f"{name}_{date}.tar.gz")
    if version == 1:
        assert (spec.default_image_size, spec.preprocessing, spec.checkpoint_num_classes) == (224, "vgg", 1000)
    else:
        assert (spec.default_image_size, spec.preprocessing, spec.checkpoint_num_classes) == (299, "inception", 1001)
    model = _meta_model(name, spec.checkpoint_num_classes)  # names and heads: tests/test_models.py
    assert model.num_features == 2048
    body = getattr(model, name)
    assert [len(list(getattr(body, f"block{i}").children())) for i in range(1, 5)] == list(UNITS[depth])


def test_batch_norm_follows_resnet_arg_scope():
    """epsilon 1e-5, decay 0.997, with gamma; v1 convs have no biases, v2's linear convs do."""
    model = _meta_model("resnet_v2_50", 10)
    norms = [m for m in model.modules() if isinstance(m, BatchNorm)]
    assert norms and all(m.eps == 1e-5 and m.decay == 0.997 and m.weight is not None for m in norms)
    keys = set(model.state_dict())
    unit = "resnet_v2_50.block1.unit_1.bottleneck_v2"
    for present in ("resnet_v2_50.conv1.bias", f"{unit}.shortcut.bias", f"{unit}.conv3.bias",
                    f"{unit}.preact.weight", "resnet_v2_50.postnorm.running_var"):
        assert present in keys
    assert f"{unit}.conv1.bias" not in keys and "resnet_v2_50.conv1.BatchNorm.weight" not in keys
    v1_keys = set(_meta_model("resnet_v1_50", 10).state_dict())
    assert not any(k.endswith(".bias") and "BatchNorm" not in k and "logits" not in k for k in v1_keys)


@pytest.fixture(scope="module")
def initialized():
    """One freshly initialized net per version (10 classes; v1 at depth_multiplier 0.25 to stay cheap).

    Tests that need other options build on the meta device and copy these weights in.
    """
    torch.manual_seed(0)
    return {"resnet_v1_50": create_model("resnet_v1_50", num_classes=10, depth_multiplier=0.25),
            "resnet_v2_50": create_model("resnet_v2_50", num_classes=10)}


def _copy_of(name: str, initialized, **kwargs) -> torch.nn.Module:
    """A net with `kwargs` that takes the shared initialized weights (extra/missing: conv1 only)."""
    source = initialized[name]
    if name == "resnet_v1_50":
        kwargs.setdefault("depth_multiplier", 0.25)
    model = _meta_model(name, 10, **kwargs).to_empty(device="cpu")
    result = model.load_state_dict(source.state_dict(), strict=False)
    assert not result.missing_keys
    assert all(key.startswith(f"{name}.conv1.") for key in result.unexpected_keys)
    return model


@pytest.mark.parametrize("name", ["resnet_v1_50", "resnet_v2_50"])
def test_initialization_follows_resnet_arg_scope(name, initialized):
    """He (fan-in, truncated) conv kernels, zero biases, BN at gamma 1 / beta 0 / mean 0 / var 1."""
    for key, value in initialized[name].state_dict().items():
        if key.endswith(".weight") and value.dim() == 4:
            fan_in = value[0].numel()
            assert value.std().item() == pytest.approx((2.0 / fan_in) ** 0.5, rel=0.1), key
            assert value.abs().max().item() <= 2 * (2.0 / fan_in) ** 0.5 / 0.8796, key  # truncated at 2 sigma
        elif key.endswith("running_var") or (key.endswith(".weight") and value.dim() == 1):
            assert torch.all(value == 1), key
        else:
            assert torch.all(value == 0), key


# --- options --------------------------------------------------------------------------------------

def _ceil_halvings(size: int, times: int) -> int:
    for _ in range(times):
        size = -(-size // 2)
    return size


@pytest.mark.parametrize("name", ["resnet_v1_50", "resnet_v2_50"])
@pytest.mark.parametrize("output_stride", [None, 16, 8])
def test_any_input_size_and_output_stride(name, output_stride):
    """97x131: every stride-2 step rounds up (SAME); beyond output_stride the maps stop shrinking."""
    height, width = 97, 131
    images = torch.empty(2, 3, height, width, device="meta")
    halvings = {None: 5, 16: 4, 8: 3}[output_stride]
    logits, end_points = _meta_model(name, 6, output_stride=output_stride).forward_endpoints(images)
    assert logits.shape == (2, 6)
    for index, block_halvings in enumerate((3, 4, 5, 5), start=1):
        block_halvings = min(block_halvings, halvings)
        expected = (_ceil_halvings(height, block_halvings), _ceil_halvings(width, block_halvings))
        assert tuple(end_points[f"{name}/block{index}"].shape[-2:]) == expected
    assert end_points["global_pool"].shape == (2, 2048, 1, 1)
    assert list(end_points)[-4:] == ["global_pool", f"{name}/logits", f"{name}/spatial_squeeze", "predictions"]

    dense, end_points = _meta_model(name, 6, output_stride=output_stride, global_pool=False,
                                    spatial_squeeze=False).forward_endpoints(images)
    assert dense.shape == (2, 6, _ceil_halvings(height, halvings), _ceil_halvings(width, halvings))
    assert "global_pool" not in end_points and f"{name}/spatial_squeeze" not in end_points
    assert _meta_model(name, 0, output_stride=output_stride)(images).shape == (2, 2048)
    with pytest.raises(ConfigError, match="spatial_squeeze=False"):
        _meta_model(name, 6, global_pool=False)(images)


def test_invalid_output_stride_is_a_config_error():
    """Strides that are not a multiple of 4, or beyond the nominal 32, fail at build time; 32 is nominal."""
    assert repr(_meta_model("resnet_v1_50", 10, output_stride=32)) == repr(_meta_model("resnet_v1_50", 10))
    for output_stride in (2, 6, 10):
        with pytest.raises(ConfigError, match="multiple of 4"):
            _meta_model("resnet_v1_50", 10, output_stride=output_stride)
    for output_stride in (12, 24, 64):
        with pytest.raises(ConfigError, match=f"output_stride={output_stride} cannot be reached"):
            _meta_model("resnet_v2_50", 10, output_stride=output_stride)


def test_store_non_strided_activations_moves_the_stride_after_the_block_end_point():
    """Block end points keep the last unit's resolution; the next block sees the subsampled map."""
    images = torch.empty(1, 3, 224, 224, device="meta")
    _, plain = _meta_model("resnet_v1_50", 5).forward_endpoints(images)
    _, dense = _meta_model("resnet_v1_50", 5, store_non_strided_activations=True).forward_endpoints(images)
    assert list(plain) == list(dense)
    for block, plain_size, dense_size in (("block1", 28, 56), ("block2", 14, 28), ("block3", 7, 14), ("block4", 7, 7)):
        assert plain[f"resnet_v1_50/{block}"].shape[-1] == plain_size
        assert dense[f"resnet_v1_50/{block}"].shape[-1] == dense_size


@pytest.mark.parametrize("name", ["resnet_v1_50", "resnet_v2_50"])
def test_include_root_block_false_feeds_block1_directly(name, initialized):
    """Without the root block, a net given pool1's output computes what the full net computes."""
    full = _copy_of(name, initialized).eval()
    body = getattr(full, name)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move BN statistics away from identity so the check has teeth
        for module in full.modules():
            if isinstance(module, BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    rootless = _copy_of(name, {name: full}, include_root_block=False, in_channels=64).eval()
    assert not any(key.startswith(f"{name}.conv1.") for key in rootless.state_dict())
    images = torch.randn(2, 3, 40, 56, generator=generator)
    with torch.no_grad():
        expected = full(images)
        got, end_points = rootless.forward_endpoints(body.pool1(body.conv1(images)))
    assert f"{name}/conv1" not in end_points and f"{name}/block1" in end_points
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("name", ["resnet_v1_50", "resnet_v2_50"])
def test_trains_end_to_end(name, initialized):
    """Gradients reach every parameter through the in-place ReLUs; BN statistics update; loss drops."""
    model = _copy_of(name, initialized).train()
    norm = getattr(model, name).block1.unit_1._modules[f"bottleneck_v{name[8]}"].conv1.BatchNorm
    generator = torch.Generator().manual_seed(2)
    images, labels = torch.randn(4, 3, 48, 48, generator=generator), torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for _ in range(2):
        before = norm.running_mean.clone()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        losses.append(loss.item())
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        assert not torch.equal(norm.running_mean, before)
        optimizer.step()
    assert losses[1] < losses[0]
