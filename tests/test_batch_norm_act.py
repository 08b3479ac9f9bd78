"""Training-mode BatchNorm + activation in one C kernel (nets/batch_norm_act.py): the same values,
gradients and running statistics as torch's F.batch_norm followed by the activation, used by every
slimtune conv layer whose BN and activation it covers, and left alone everywhere else."""

import pytest
import torch
import torch.nn.functional as F

import slimtune
from slimtune.nets import batch_norm_act, layers
from slimtune.nets.mobilenet_common import relu6_
from slimtune.nets.mobilenet_v3 import hard_swish

from native_support import assert_one_fallback_warning, needs_c_compiler
pytestmark = needs_c_compiler

ACTIVATIONS = {"none": (None, lambda x: x), "relu": (F.relu, F.relu), "relu_": (torch.relu_, F.relu),
               "relu6": (relu6_, F.relu6), "hard_swish": (hard_swish, F.hardswish)}


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
    monkeypatch.delenv("SLIMTUNE_BATCH_NORM_KERNEL", raising=False)


def _case(shape, scale, center, seed=0):
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    # An offset mean (3) and a spread that puts values on both sides of every activation's kinks.
    x = torch.randn(shape, generator=generator) * 2.5 + 3.0
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.rand(channels, generator=generator) + 0.5).requires_grad_() if scale else None
    bias = torch.randn(channels, generator=generator).requires_grad_() if center else None
    stats = torch.randn(channels, generator=generator), torch.rand(channels, generator=generator) + 0.5
    grad = torch.randn(shape, generator=generator)
    return x.requires_grad_(), weight, bias, stats, grad


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape,scale,center", [((4, 24, 9, 7), True, True), ((3, 40, 5, 5), False, True),
                                                ((2, 16, 6, 6), True, False), ((37, 72), True, True)])
def test_matches_torch_batch_norm_then_activation(name, shape, scale, center):
    fused_activation, reference_activation = ACTIVATIONS[name]
    x, weight, bias, (mean, var), grad = _case(shape, scale, center)
    ours_mean, ours_var = mean.clone(), var.clone()
    calls = batch_norm_act.kernel_calls
    y = batch_norm_act.batch_norm_act(x, weight, bias, ours_mean, ours_var, 0.003, 1e-3, fused_activation)
    assert batch_norm_act.kernel_calls == calls + 1
    y.backward(grad)
    ours = [t.grad.clone() for t in (x, weight, bias) if t is not None]
    for t in (x, weight, bias):
        if t is not None:
            t.grad = None
    expected = reference_activation(F.batch_norm(x, mean, var, weight, bias, True, 0.003, 1e-3))
    expected.backward(grad)
    theirs = [t.grad for t in (x, weight, bias) if t is not None]
    assert y.stride() == expected.stride()
    torch.testing.assert_close(y, expected, rtol=0, atol=5e-6)
    for got, want in zip(ours, theirs):
        # gradients of sums over the batch: tolerance relative to their size
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * max(1.0, want.abs().max().item()))
    torch.testing.assert_close(ours_mean, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_var, var, rtol=0, atol=1e-6)
    assert not torch.equal(ours_mean, _case(shape, scale, center)[3][0])  # the statistics did move


@pytest.mark.parametrize("layout", ["padded window", "broadcast", "channels-last", "nchw"])
def test_gradients_of_any_layout(layout):
    """Autograd hands the backward a window of a padded map's gradient (after a border pad), a
    broadcast one (after a mean), or a dense one: read in place or copied, the same gradients."""
    x, weight, bias, (mean, var), _ = _case((3, 20, 7, 9), True, True, seed=4)
    generator = torch.Generator().manual_seed(5)
    if layout == "padded window":
        padded = torch.randn(3, 20, 9, 11, generator=generator).contiguous(memory_format=torch.channels_last)
        grad = padded[:, :, 1:8, 2:11]
        assert grad.stride(1) == 1 and not grad.is_contiguous(memory_format=torch.channels_last)
    elif layout == "broadcast":
        grad = torch.randn(3, 20, 1, 1, generator=generator).expand(3, 20, 7, 9)
    else:
        grad = torch.randn(3, 20, 7, 9, generator=generator)
        if layout == "channels-last":
            grad = grad.contiguous(memory_format=torch.channels_last)
    y = batch_norm_act.batch_norm_act(x, weight, bias, mean.clone(), var.clone(), 0.1, 1e-3, F.relu)
    ours = torch.autograd.grad(y, (x, weight, bias), grad)
    expected = F.relu(F.batch_norm(x, mean.clone(), var.clone(), weight, bias, True, 0.1, 1e-3))
    theirs = torch.autograd.grad(expected, (x, weight, bias), grad.contiguous())
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * max(1.0, want.abs().max().item()))


def test_nan_propagates_as_in_torch():
    x, weight, bias, (mean, var), _ = _case((2, 8, 4, 4), True, True)
    with torch.no_grad():
        x[0, 3, 1, 2] = float("nan")
    for fused_activation, reference_activation in ACTIVATIONS.values():
        ours = batch_norm_act.batch_norm_act(x, weight, bias, mean.clone(), var.clone(), 0.1, 1e-3,
                                             fused_activation)
        theirs = reference_activation(F.batch_norm(x, mean.clone(), var.clone(), weight, bias, True, 0.1, 1e-3))
        assert torch.equal(ours.isnan(), theirs.isnan()) and ours[:, 3].isnan().all()


def test_deterministic_for_a_thread_count():
    x, weight, bias, (mean, var), grad = _case((8, 32, 14, 14), True, True)
    results = []
    for _ in range(2):
        y = batch_norm_act.batch_norm_act(x, weight, bias, mean.clone(), var.clone(), 0.01, 1e-3, F.relu)
        results.append(torch.autograd.grad(y, (x, weight, bias), grad))
    for first, second in zip(*results):
        assert torch.equal(first, second)


def _model(net: str, size: int) -> torch.nn.Module:
    extra = {"image_size": size} if net.startswith("nasnet") else {}  # NASNet's aux head is sized for it
    return slimtune.create_model(net, num_classes=5, **extra)


def _train_step(net: str, size: int, enabled: bool, dtype: torch.dtype, monkeypatch) -> tuple[dict, dict, int]:
    """One forward/backward of a seeded net: parameter gradients, running statistics (as float64)
    and how many BatchNorms ran through the kernel."""
    monkeypatch.setenv("SLIMTUNE_BATCH_NORM_KERNEL", "1" if enabled else "0")
    torch.manual_seed(0)
    model = _model(net, size).train().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, size, size).contiguous(memory_format=torch.channels_last)
    model, x = model.to(dtype), x.to(dtype)
    calls = batch_norm_act.kernel_calls
    out = model(x)
    F.cross_entropy(out[0] if isinstance(out, tuple) else out, torch.tensor([0, 1, 2, 3])).backward()
    grads = {name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None}
    buffers = {name: b.double() for name, b in model.named_buffers() if "running" in name}
    return grads, buffers, batch_norm_act.kernel_calls - calls


# BNs that stay torch's: the auxiliary head's (they run on a pooled 5x5 map).
UNFUSED = ("aux_bn0", "aux_bn1")


@pytest.mark.parametrize("net,size", [("mobilenet_v3_large", 64), ("mobilenet_v1_025", 64), ("resnet_v1_50", 64),
                                      ("nasnet_mobile", 96)])
def test_nets_train_through_the_kernel_with_torchs_results(net, size, monkeypatch):
    """Every BN of these nets runs fused (but NASNet's aux-head ones), and the net's gradients
    are as close to a float64 run as torch's own float32 ones. Deep BN nets at batch 4 amplify float32
    rounding (some gradients are mathematically ~0, e.g. a BN bias feeding only another BN; ResNet's
    block4 at 2x2 differs from float64 by up to 40% in torch's own float32), so every float32 run is
    measured against float64."""
    fused_grads, fused_buffers, fused = _train_step(net, size, True, torch.float32, monkeypatch)
    torch_grads, torch_buffers, unfused = _train_step(net, size, False, torch.float32, monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # torch's float32 on one thread: another summation order, to size float32's own spread
        single_thread_grads = _train_step(net, size, False, torch.float32, monkeypatch)[0]
    finally:
        torch.set_num_threads(threads)
    exact_grads, exact_buffers, _ = _train_step(net, size, False, torch.float64, monkeypatch)
    norms = [name for name, m in _model(net, size).named_modules()
             if isinstance(m, layers.BatchNorm) and not name.endswith(UNFUSED)]
    assert fused == len(norms) and unfused == 0
    assert fused_grads.keys() == exact_grads.keys()

    def distance(grads: dict) -> float:
        return sum(((grads[name] - exact) ** 2).sum().item() for name, exact in exact_grads.items()) ** 0.5

    exact_norm = sum((g ** 2).sum().item() for g in exact_grads.values()) ** 0.5
    ours = distance(fused_grads)
    torchs = max(distance(torch_grads), distance(single_thread_grads))
    # Over the whole net: within the spread of torch's own float32 runs around float64 (measured against
    # torch on 2 threads: ours / torch's 0.38-0.64 for the mobilenets and resnet; nasnet_mobile 15.1 vs 3.8,
    # and torch on 1 thread 124: its 7x7 stem cells amplify rounding chaotically).
    assert ours <= 2 * torchs + 1e-6 * exact_norm, (ours, torchs, exact_norm)
    for name, exact in exact_buffers.items():
        torch.testing.assert_close(fused_buffers[name], exact, rtol=1e-5, atol=1e-6, msg=name)


def test_left_to_torch_where_the_kernel_does_not_apply(monkeypatch):
    layer = layers.Conv2d(3, 8, 3, normalizer=layers.batch_norm_factory(), activation=F.relu).train()
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    calls = batch_norm_act.kernel_calls
    layer(x)
    assert batch_norm_act.kernel_calls == calls + 1
    layer(x.contiguous())  # NCHW
    layer.activation = lambda t: t.clamp(min=0)  # an activation the kernel does not know
    layer(x)
    layer.activation = F.relu
    layer.BatchNorm.frozen = True  # moving statistics in training
    layer(x)
    layer.BatchNorm.frozen = False
    layer.eval()
    layer(x)
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    monkeypatch.setenv("SLIMTUNE_BATCH_NORM_KERNEL", "0")
    layer(x)
    assert batch_norm_act.kernel_calls == calls + 1


def test_one_value_per_channel_is_torchs_error():
    layer = layers.Conv2d(3, 8, 1, normalizer=layers.batch_norm_factory(), activation=F.relu).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1))


def test_without_a_compiler_torch_computes_it(tmp_path):
    """No compiler on PATH: one warning, and the layer computes with torch's operations."""
    script = """
import warnings, torch, torch.nn.functional as F
from slimtune.nets import batch_norm_act, layers
layer = layers.Conv2d(3, 8, 3, normalizer=layers.batch_norm_factory(), activation=F.relu).train()
x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first, second = layer(x), layer(x)
conv = F.conv2d(x, layer.weight, padding=1)
expected = F.relu(F.batch_norm(conv, None, None, layer.BatchNorm.weight, layer.BatchNorm.bias, True, 0.0,
                                layer.BatchNorm.eps))
torch.testing.assert_close(second, expected)
messages = [str(w.message) for w in caught if "BatchNorm" in str(w.message)]
print(len(messages), batch_norm_act.kernel_calls, messages[0])
"""
    assert_one_fallback_warning(tmp_path, script)
