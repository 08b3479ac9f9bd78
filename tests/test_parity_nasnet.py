"""Parity of slimtune's NASNet-A / PNASNet-5 with TF-Slim (nets/nasnet/nasnet.py, pnasnet.py), plus
drop path, the auxiliary head and gradient checkpointing.

Goldens come from tools/tf_reference/make_parity_fixtures.py (its NASNET block): reduced variants
(6 cells, 8 or 12 filters, slim's hyper-parameters otherwise) run by default; the published mobile
architectures at 224 run with -m slow. The full default architectures' variable names and shapes
are checked against TF-Slim's own list (tests/fixtures/nasnet_variables.json.gz, written by
tools/tf_reference/make_nasnet_manifest.py from slim's training graphs, which include the aux head).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtune.errors import ConfigError
from slimtune.nets import batch_norm_act, create_model, get_model_spec
from slimtune.nets.nasnet import NASNet, drop_path
from slimtune.testing import assert_matches_golden

from parity_support import GOLDEN_DIR, FamilyCheckpoints, slim_to_torch_name_and_shape
from parity_support import golden as _golden
from parity_support import nchw as _nchw
from parity_support import net_kwargs as _net_kwargs

REDUCED = ["nasnet_cifar_r", "nasnet_mobile_r", "nasnet_large_r", "pnasnet_mobile_r", "pnasnet_large_r"]
FULL: list[str] = []
NAMES = ["nasnet_cifar", "nasnet_mobile", "nasnet_large", "pnasnet_mobile", "pnasnet_large"]
MANIFEST = Path(__file__).parent / "fixtures" / "nasnet_variables.json.gz"


def _build(golden, **extra) -> NASNet:
    return create_model(golden.model_name, num_classes=golden.num_classes, image_size=golden.image_size[0],
                        **_net_kwargs(golden), **extra).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    store = FamilyCheckpoints(tmp_path_factory.mktemp("nasnet_ckpt"))
    yield store
    store.release()


# ------------------------------------------------------------------------------------------------
# Parity with TF-Slim.

@pytest.mark.parametrize("config", REDUCED)
def test_state_dict_matches_slim_variables(config):
    """Every torch tensor is one of slim's variables (training graph: with the aux head) and none is missing."""
    golden = _golden(config)
    model = _build(golden)
    expected = dict(slim_to_torch_name_and_shape(name, shape) for name, shape in golden.variables)
    actual = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert actual == expected


def _param(config: str, slow: bool):
    return pytest.param(config, marks=[pytest.mark.slow] if slow else [], id=config)


@pytest.mark.parametrize("config", [_param(c, False) for c in REDUCED] + [_param(c, True) for c in FULL])
def test_matches_tf_slim(config, checkpoints):
    """Eval-mode logits and every end point (names, order, shapes, values) match TF-Slim within
    1e-4 of the largest absolute value."""
    golden = _golden(config)
    path, stored = checkpoints.get(config)
    model = create_model(golden.model_name, num_classes=golden.num_classes, checkpoint_path=str(path),
                         image_size=golden.image_size[0], **_net_kwargs(golden)).eval()
    with torch.no_grad():
        out, end_points = model.forward_endpoints(_nchw(golden))
    assert list(end_points) == list(golden.end_points)
    assert_matches_golden(out, end_points, golden, rtol_of_max=1e-4)
    if golden.num_classes:
        assert end_points["Logits"] is out
        assert "AuxLogits" not in end_points  # slim builds the aux head only for training


@pytest.mark.parametrize("config", ["nasnet_cifar_ckpt", "pnasnet_mobile_ckpt"])
def test_tf_written_checkpoint_reproduces_tf(config):
    """V1 (nasnet_cifar) and V2 (pnasnet_mobile) checkpoints written by TensorFlow's Saver load and
    reproduce TF's outputs."""
    golden = _golden(config)
    prefix = GOLDEN_DIR / f"{config}.ckpt"
    model = create_model(golden.model_name, num_classes=golden.num_classes, checkpoint_path=str(prefix),
                         image_size=golden.image_size[0], **_net_kwargs(golden)).eval()
    with torch.no_grad():
        logits, end_points = model.forward_endpoints(_nchw(golden))
    assert list(end_points) == list(golden.end_points)
    assert_matches_golden(logits, end_points, golden)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n != "nasnet_mobile" else [])
                                  for n in NAMES])
def test_full_architecture_variables_match_slim(name):
    """The published architectures (default hyper-parameters and size, aux head included) have
    exactly TF-Slim's variable names and shapes (the aux conv's kernel covers its map: 4x4 at 224
    and for cifar at 32, 6x6 at 331). nasnet_mobile runs by default, the rest with -m slow (meta
    tensors, but thousands of modules)."""
    with gzip.open(MANIFEST, "rt") as handle:
        manifest = json.load(handle)[name]
    with torch.device("meta"):
        model = create_model(name)
    expected = dict(slim_to_torch_name_and_shape(n, s) for n, s in manifest["variables"])
    actual = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert len(actual) == len(expected) == manifest["count"]
    assert actual == expected


# ------------------------------------------------------------------------------------------------
# Registry.

@pytest.mark.parametrize("name,size,classes,preprocessing,top1,aux", [
    ("nasnet_cifar", 32, 10, "cifarnet", None, "aux_11"),
    ("nasnet_mobile", 224, 1001, "inception", 74.0, "aux_7"),
    ("nasnet_large", 331, 1001, "inception", 82.7, "aux_11"),
    ("pnasnet_mobile", 224, 1001, "inception", 74.2, "aux_5"),
    ("pnasnet_large", 331, 1001, "inception", 82.9, "aux_7"),
])
def test_registration(name, size, classes, preprocessing, top1, aux):
    spec = get_model_spec(name)
    assert (spec.default_image_size, spec.checkpoint_num_classes, spec.preprocessing) == (size, classes, preprocessing)
    assert spec.published_top1 == top1
    assert spec.classifier_scopes == ("final_layer/FC", f"{aux}/aux_logits/FC")
    if name != "nasnet_cifar":
        assert spec.published_checkpoint.endswith(".tar.gz")


# ------------------------------------------------------------------------------------------------
# Drop path and the auxiliary head.

def _slim_keep_prob(drop_path_keep_prob, cell_num, total_num_cells, step, total_training_steps):
    """slim's _apply_drop_path (drop_connect_version 'v3'), transcribed in float32 as TF runs it."""
    layer_ratio = (cell_num + 1) / float(total_num_cells)
    keep = 1 - layer_ratio * (1 - drop_path_keep_prob)
    ratio = np.minimum(np.float32(1.0), np.float32(step) / np.float32(total_training_steps))
    return float(np.float32(1) - ratio * np.float32(1 - keep))


@pytest.mark.parametrize("name,cells", [
    # slim's cell_num of every cell in build order (stem cells 0, 1; reduction cells take a number).
    ("nasnet_large", [("cell_stem_0", 0), ("cell_stem_1", 1)]
     + [(f"cell_{i}", i + 2) for i in range(6)] + [("reduction_cell_0", 8)]
     + [(f"cell_{i}", i + 3) for i in range(6, 12)] + [("reduction_cell_1", 15)]
     + [(f"cell_{i}", i + 4) for i in range(12, 18)]),
    ("pnasnet_large", [("cell_stem_0", 0), ("cell_stem_1", 1)] + [(f"cell_{i}", i + 2) for i in range(12)]),
])
def test_drop_path_schedule_matches_slims_formula(name, cells):
    with torch.device("meta"):
        model = create_model(name)
    config = model.config
    total = {"nasnet_large": 18 + 4, "pnasnet_large": 12 + 2}[name]
    assert model.total_num_cells == total
    assert [(n, model._modules[n].cell_num) for n, *_ in model._steps] == sorted(
        cells, key=lambda item: [s[0] for s in model._steps].index(item[0]))
    for step in (0, 1, 5000, 125000, 249999, 250000, 10 ** 6):
        model.set_training_step(step)
        for cell_name, cell_num in cells:
            expected = _slim_keep_prob(config.drop_path_keep_prob, cell_num, total, step, config.total_training_steps)
            assert model.cell_keep_prob(model._modules[cell_name].cell_num) == pytest.approx(expected, abs=1e-6)
    # The last cell at the end of training: 1 - (21 + 1) / 22 * 0.3 = 0.7 (slim's drop_path_keep_prob).
    model.set_training_step(config.total_training_steps)
    assert model.cell_keep_prob(total - 1) == pytest.approx(config.drop_path_keep_prob)


def test_drop_path_drops_whole_examples_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(4000, 2, 3, 3)
    y = drop_path(x, 0.7)
    per_example = y.flatten(1)
    kept = (per_example != 0).all(dim=1)
    assert torch.all((per_example == 0).all(dim=1) | kept)            # whole examples only
    assert torch.allclose(per_example[kept], torch.full_like(per_example[kept], 1 / 0.7))
    assert abs(kept.float().mean().item() - 0.7) < 0.03
    assert drop_path(x, 1.0) is x


def _tiny(name: str = "nasnet_large", **kwargs) -> NASNet:
    return create_model(name, num_classes=5, num_cells=3, num_conv_filters=6, image_size=67, **kwargs)


def test_drop_path_only_in_training():
    torch.manual_seed(1)
    model = create_model("nasnet_large", num_classes=5, num_cells=3, num_conv_filters=6, use_aux_head=0)
    model.set_training_step(model.config.total_training_steps)
    x = torch.randn(4, 3, 35, 35)
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    model.train()
    torch.manual_seed(2)
    a = model.forward_features(x)
    torch.manual_seed(3)
    b = model.forward_features(x)
    assert not torch.equal(a, b)                                     # random drop path
    model.set_training_step(0)                                       # keep 1 at step 0
    torch.manual_seed(2)
    c = model.forward_features(x)
    torch.manual_seed(3)
    d = model.forward_features(x)
    assert torch.equal(c, d)


def test_aux_head_in_training_only():
    model = _tiny("pnasnet_mobile")
    x = torch.randn(2, 3, 67, 67)
    model.train()
    _, end_points = model(x, with_end_points=True)
    assert end_points["AuxLogits"].shape == (2, 5)
    # slim's order: the aux logits right after the cell they branch off (cell 1 of 3 here).
    names = list(end_points)
    assert names.index("AuxLogits") == names.index("Cell_1") + 1
    model.eval()
    with torch.no_grad():
        _, end_points = model(x, with_end_points=True)
    assert "AuxLogits" not in end_points


def test_headless_reset_and_errors():
    model = _tiny("nasnet_mobile")
    assert model.classifier_scopes == ("final_layer/FC", "aux_1/aux_logits/FC")
    model.reset_classifier(0)
    assert not any(k.startswith(("final_layer", "aux_")) for k in model.state_dict())
    x = torch.randn(2, 3, 67, 67)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)
    model.reset_classifier(7)
    model.train()
    logits, end_points = model(x, with_end_points=True)
    assert logits.shape == end_points["AuxLogits"].shape == (2, 7)
    model.eval()
    with pytest.raises(ConfigError, match="smaller than"):
        model(torch.randn(1, 3, 18, 18))
    with pytest.raises(ConfigError, match="unknown option"):
        create_model("nasnet_mobile", num_cells=3, bogus=1)
    with pytest.raises(ConfigError, match="auxiliary head needs"):
        create_model("nasnet_mobile", num_cells=3, num_conv_filters=4, image_size=40)
    model.train()
    with pytest.raises(ConfigError, match="built for image_size"):
        model(torch.randn(2, 3, 131, 131))  # a 2x2 aux map, not 1x1


@pytest.mark.parametrize("size", [19, 20, 67, 100])
def test_any_input_size_in_eval(size):
    model = create_model("pnasnet_mobile", num_classes=3, num_cells=3, num_conv_filters=4, use_aux_head=0).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 3)


# ------------------------------------------------------------------------------------------------
# Gradient checkpointing.

def _checkpointing_runs(name: str, dtype: torch.dtype, channels_last: bool) -> list:
    """(loss, gradients, buffers) of one training step of the tiny net, without and with
    gradient checkpointing, from the same weights and the same random draws."""
    torch.manual_seed(0)
    plain = _tiny(name)
    checkpointed = _tiny(name, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, y = torch.randn(3, 3, 67, 67, dtype=dtype), torch.tensor([0, 1, 2])
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    results = []
    for model in (plain, checkpointed):
        model.to(dtype=dtype, memory_format=layout).train()
        model.set_training_step(model.config.total_training_steps)
        torch.manual_seed(5)
        logits, end_points = model(x, with_end_points=True)
        loss = torch.nn.functional.cross_entropy(logits, y) + 0.4 * torch.nn.functional.cross_entropy(
            end_points["AuxLogits"], y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                        {n: b.clone() for n, b in model.named_buffers()}))
    return results


@pytest.mark.parametrize("name", [pytest.param("nasnet_large", marks=pytest.mark.slow), "pnasnet_large"])
def test_gradient_checkpointing_gives_the_same_gradients_and_statistics(name):
    """Recomputed cells give the same loss, gradients and BN moving statistics (updated once), with
    drop path active (the recomputation replays the same random draws).

    In float64: the plain forward computes a cell output's activation once for the two cells that
    read it (their gradients meet before its backward), a recomputed cell its own (they meet after),
    and this tiny net's stem amplifies that change of summation order to 4.5% of a gradient in
    float32 but 1e-9 in float64 (measured), so float64 shows the two are the same computation."""
    (loss_a, grads_a, buffers_a), (loss_b, grads_b, buffers_b) = _checkpointing_runs(name, torch.float64, False)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for key in grads_a:
        scale = grads_a[key].abs().max().item()
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=0, atol=1e-7 * scale + 1e-12, msg=key)
    for key in buffers_a:
        torch.testing.assert_close(buffers_b[key], buffers_a[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", [pytest.param("nasnet_large", marks=pytest.mark.slow), "pnasnet_large"])
def test_gradient_checkpointing_through_the_batch_norm_kernel(name):
    """float32 channels-last, where training BNs run in the C kernel: a recomputed cell leaves the
    moving statistics as they were after the first pass (the kernel honours decay 1) and the
    forward is bit for bit the plain one."""
    if not batch_norm_act.kernel_available():
        pytest.skip("no C compiler: the BatchNorm kernel is not built here")
    calls = batch_norm_act.kernel_calls
    (loss_a, _, buffers_a), (loss_b, _, buffers_b) = _checkpointing_runs(name, torch.float32, True)
    assert batch_norm_act.kernel_calls > calls
    assert torch.equal(loss_a, loss_b)
    for key in buffers_a:
        torch.testing.assert_close(buffers_b[key], buffers_a[key], rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------------------------------------
# The training loop's hooks: the step reaches the net, --gradient_checkpointing reaches it too.

_RECORDING_NET = '''
from slimtune.nets.cifarnet import cifarnet

STEPS = []


def recording_net(num_classes=10, **kwargs):
    model = cifarnet(num_classes, **kwargs)
    model.gradient_checkpointing = False
    model.set_training_step = STEPS.append
    return model
'''


def test_train_loop_tells_the_net_its_step_and_checkpointing(tmp_path):
    import sys

    from slimtune.config import TrainConfig
    from slimtune.train.loop import train

    source = tmp_path / "recording_net.py"
    source.write_text(_RECORDING_NET)
    settings = dict(model_name=f"{source}:recording_net", dataset_name="digits", batch_size=16,
                    optimizer="sgd", learning_rate=0.01, learning_rate_decay_type="fixed", num_workers=0,
                    save_summaries_secs=1e9, save_interval_secs=1e9, max_number_of_steps=3,
                    train_image_size=32, preprocessing_name="cifarnet")
    train(TrainConfig(train_dir=str(tmp_path / "a"), gradient_checkpointing=True, **settings))
    module = next(m for name, m in sys.modules.items() if name.startswith("slimtune_user_") and hasattr(m, "STEPS"))
    assert module.STEPS == [0, 1, 2]
    with pytest.raises(ConfigError, match="--gradient_checkpointing: lenet does not support it"):
        train(TrainConfig(train_dir=str(tmp_path / "b"), gradient_checkpointing=True,
                          **{**settings, "model_name": "lenet"}))
