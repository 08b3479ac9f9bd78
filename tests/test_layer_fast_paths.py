"""Fast paths of the shared layers and of NASNet: border-only padding, pooling without a padded
copy, a spatial mean whose gradient keeps the memory format, one activation per hidden state. Each
gives the plain computation's values and is shown to be taken (elements filled, tensors activated,
gradient layouts), so that losing it fails here rather than only in a benchmark."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from slimtune.nets import create_model
from slimtune.nets.layers import AvgPool2d, BatchNorm, concat_channels, pad2d, reduce_mean_hw, same_padding


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


def test_spatial_mean_gradient_keeps_the_channels_last_layout() -> None:
    x = torch.randn(2, 5, 4, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    reference = x.detach().clone().requires_grad_()
    for keepdim in (True, False):
        got = reduce_mean_hw(x, keepdim)
        want = reference.mean(dim=(2, 3), keepdim=keepdim)
        assert torch.equal(got, want)
        grad = torch.randn_like(want)
        (got_grad,) = torch.autograd.grad(got, x, grad)
        (want_grad,) = torch.autograd.grad(want, reference, grad)
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-7)
        assert got_grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("net, kwargs", [("mobilenet_v3_large", {"depth_multiplier": 0.35}),
                                         ("mobilenet_v1", {"depth_multiplier": 0.25}),
                                         ("inception_v3", {"depth_multiplier": 0.1}),
                                         ("nasnet_mobile", {"num_cells": 3, "num_conv_filters": 8, "image_size": 96})])
def test_every_batch_norm_gets_a_channels_last_gradient(net, kwargs) -> None:
    """A BatchNorm backward fed a contiguous NCHW gradient with its channels-last input takes a slow
    path plus copies (a broadcast mean gradient did this to MobileNet v3's last conv, an in-place
    padded copy to the layers before its strided depthwise convs): in a channels-last training step
    every BN must receive a channels-last gradient (NASNet's cell outputs are concatenations, whose
    plain backward hands each branch's last BN a strided channel slice)."""
    model = create_model(net, num_classes=7, **kwargs).to(memory_format=torch.channels_last).train()
    size = 299 if net.startswith("inception") else 96
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    layouts = {}

    def record(module, args, out, name):
        out.register_hook(lambda grad: layouts.__setitem__(name, grad.is_contiguous(memory_format=torch.channels_last)))

    for name, module in model.named_modules():
        if isinstance(module, BatchNorm):
            module.register_forward_hook(lambda module, args, out, name=name: record(module, args, out, name))
    logits, end_points = model(x, with_end_points=True)
    (logits.sum() + end_points.get("AuxLogits", logits).sum()).backward()
    assert len(layouts) > 10
    assert [name for name, channels_last in layouts.items() if not channels_last] == []


def test_concat_gradient_is_compact_and_equal() -> None:
    parts = [torch.randn(2, c, 5, 4).contiguous(memory_format=torch.channels_last).requires_grad_() for c in (3, 6, 2)]
    references = [p.detach().clone().requires_grad_() for p in parts]
    got, want = concat_channels(parts), torch.cat(references, dim=1)
    assert torch.equal(got, want)
    grad = torch.randn(want.shape).contiguous(memory_format=torch.channels_last)
    got_grads = torch.autograd.grad(got, parts, grad)
    want_grads = torch.autograd.grad(want, references, grad)
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert torch.equal(got_grad, want_grad)
        assert got_grad.is_contiguous(memory_format=torch.channels_last)
