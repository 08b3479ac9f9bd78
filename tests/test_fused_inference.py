"""Inference fast paths: fused oneDNN conv + bias + activation (+ residual), border-only padding,
NASNet's shared activations and folded BNs. Each gives the plain computation's values, and each is
shown to be taken (counted), so that losing it fails here rather than only in a benchmark."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from slimtune.nets import create_model, layers
from slimtune.nets.layers import AvgPool2d, BatchNorm, Conv2d, batch_norm_factory, pad2d, same_padding
from slimtune.nets.mobilenet_common import relu6_

pytestmark = pytest.mark.skipif(layers._CONV_POINTWISE is None, reason="this torch build has no fused oneDNN conv")


class _CountFusedCalls:
    """Counts calls of the fused oneDNN conv (both overloads) while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.plain = self.residual = 0
        plain, binary = layers._CONV_POINTWISE, layers._CONV_POINTWISE_BINARY

        def count_plain(*args):
            self.plain += 1
            return plain(*args)

        def count_binary(*args):
            self.residual += 1
            return binary(*args)

        monkeypatch.setattr(layers, "_CONV_POINTWISE", count_plain)
        monkeypatch.setattr(layers, "_CONV_POINTWISE_BINARY", count_binary)


def _random_batch_norm(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for norm in module.modules():
        if isinstance(norm, BatchNorm):
            channels = norm.num_features
            with torch.no_grad():
                norm.running_mean.copy_(torch.randn(channels, generator=generator) * 0.3)
                norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
                if norm.weight is not None:
                    norm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(channels, generator=generator) * 0.3)


@pytest.mark.parametrize("activation", [F.relu, torch.relu_, relu6_, F.relu6, None],
                         ids=["relu", "relu_", "mobilenet_relu6_", "relu6", "linear"])
@pytest.mark.parametrize("stride, padding", [(1, "SAME"), (2, "SAME"), (2, "VALID")])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_conv_equals_conv_then_activation(monkeypatch, activation, stride, padding, channels_last) -> None:
    layer = Conv2d(6, 7, 3, stride=stride, padding=padding, normalizer=batch_norm_factory(scale=True),
                   activation=activation)
    _random_batch_norm(layer, seed=stride)
    layer.eval()
    x = torch.randn(2, 6, 11, 10) * 3
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    calls = _CountFusedCalls(monkeypatch)
    want = layer(x).detach()  # autograd on: conv, separate BN, activation
    assert calls.plain == 0
    with torch.no_grad():
        got = layer(x)
    assert calls.plain == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if activation in (relu6_, F.relu6):
        assert want.max() == 6.0 and got.max() == 6.0  # the clip is exercised
    if activation is not None:
        assert (want == 0).any() and (got == 0).any()


def test_an_activation_without_a_onednn_post_op_runs_unfused(monkeypatch) -> None:
    layer = Conv2d(4, 5, 3, activation=torch.tanh).eval()
    x = torch.randn(1, 4, 6, 6)
    calls = _CountFusedCalls(monkeypatch)
    with torch.no_grad():
        got = layer(x)
    assert calls.plain == 0
    torch.testing.assert_close(got, torch.tanh(F.conv2d(x, layer.weight, layer.bias, padding=1)))


def test_no_fusion_under_autograd_autocast_tracing_or_when_switched_off(monkeypatch) -> None:
    layer = Conv2d(4, 5, 3).eval()
    x = torch.randn(1, 4, 6, 6)
    calls = _CountFusedCalls(monkeypatch)
    y = layer(x.requires_grad_())
    y.sum().backward()  # the fused op has no backward: autograd must not see it
    assert calls.plain == 0 and x.grad is not None
    with torch.no_grad():
        with layers.unfused_inference():
            layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        traced = torch.jit.trace(layer, (x.detach(),), check_trace=False)
    assert calls.plain == 0
    assert "mkldnn" not in str(traced.graph) and "aten::_convolution" in str(traced.graph)
    with torch.no_grad():
        layer(x)
    assert calls.plain == 1


def test_inception_resnet_residual_block_fuses_scale_add_and_relu(monkeypatch) -> None:
    from slimtune.nets.inception_resnet_v2 import Block35

    for activation, clip in (("relu", False), (None, False), ("relu6", True)):
        block = Block35(channels=32, scale=0.17, activation=activation)
        _random_batch_norm(block, seed=3)
        with torch.no_grad():
            block.Conv2d_1x1.bias.normal_()
        block.eval()
        x = torch.randn(2, 32, 9, 9).contiguous(memory_format=torch.channels_last)
        block = block.to(memory_format=torch.channels_last)
        calls = _CountFusedCalls(monkeypatch)
        want = block(x).detach()
        with torch.no_grad():
            got = block(x)
        # relu6 clips the scaled residual before the addition: not expressible as one post-op.
        assert calls.residual == (0 if clip else 1), activation
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if activation == "relu":
            assert (got == 0).any()


class _FilledElements(TorchDispatchMode):
    """Counts the elements written by fill_ (F.pad's whole-output fill shows up here)."""

    def __init__(self) -> None:
        super().__init__()
        self.filled = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.fill_.Scalar, torch.ops.aten.fill_.Tensor, torch.ops.aten.zero_.default):
            self.filled += args[0].numel()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("value", [0.0, float("-inf")])
@pytest.mark.parametrize("pads", [(0, 1, 0, 1), (2, 3, 1, 2), (0, 0, 0, 2), (1, 1, 1, 1)])
def test_pad2d_equals_f_pad_and_fills_only_the_border(pads, value) -> None:
    x = torch.randn(2, 5, 7, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    with _FilledElements() as mode:
        got = pad2d(x, pads, value)
    want = F.pad(x, pads, value=value)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)
    assert mode.filled == want.numel() - x.numel()  # F.pad on channels-last fills all of it
    grad = torch.randn_like(want)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    assert torch.equal(got_grad, want_grad)


def _reference_same_avg_pool(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TF 'SAME' average pooling spelled out: sums over the zero-padded input / pixels inside it."""
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    pads = (left, right, top, bottom)
    sums = F.avg_pool2d(F.pad(x, pads), kernel, stride, divisor_override=1)
    counts = F.avg_pool2d(F.pad(torch.ones_like(x[:1, :1]), pads), kernel, stride, divisor_override=1)
    return sums / counts


@pytest.mark.parametrize("kernel", [1, 2, 3, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_avg_pool_matches_padded_reference_for_every_size(kernel: int, stride: int) -> None:
    generator = torch.Generator().manual_seed(kernel * 10 + stride)
    for height in range(1, 16):
        width = 17 - height
        x = torch.rand(2, 3, height, width, generator=generator) + 1.0  # a counted pad would lower means
        got = AvgPool2d(kernel, stride, padding="SAME")(x)
        want = _reference_same_avg_pool(x, kernel, stride)
        assert got.shape == want.shape == (2, 3, -(-height // stride), -(-width // stride))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("net", ["nasnet_mobile", "pnasnet_mobile"])
def test_nasnet_cells_activate_each_tensor_once(monkeypatch, net) -> None:
    """Several operations of a cell read the same hidden state (NASNet-A's normal cell reads state 1
    six times); its ReLU is computed once per cell, as slim's graph does, in training (autograd
    shares it) and at inference."""
    from slimtune.nets import nasnet

    model = create_model(net, num_classes=5, num_cells=3, num_conv_filters=8, image_size=96)
    original = nasnet._activation
    per_cell: dict[str, list[torch.Tensor]] = {}
    current = []

    def counted(x, bounded):
        if current:  # keeping x alive: its memory cannot be reused by a later tensor of the cell
            per_cell.setdefault(current[-1], []).append(x)
        return original(x, bounded)

    monkeypatch.setattr(nasnet, "_activation", counted)
    def leave(module, args, out) -> None:
        current.pop()

    for name, module in model.named_modules():
        if isinstance(module, nasnet.Cell):
            module.register_forward_pre_hook(lambda module, args, name=name: current.append(name))
            module.register_forward_hook(leave)
    x = torch.randn(2, 3, 96, 96)
    for train in (True, False):
        per_cell.clear()
        model.train(train)
        with torch.set_grad_enabled(train):
            model(x)
        assert len(per_cell) >= 5
        for name, inputs in per_cell.items():
            storages = [(x.data_ptr(), tuple(x.shape)) for x in inputs]
            assert len(storages) == len(set(storages)), (train, name)
        if train:  # the normal cells do activate several hidden states (the test is not vacuous)
            assert max(len(inputs) for inputs in per_cell.values()) >= 4
