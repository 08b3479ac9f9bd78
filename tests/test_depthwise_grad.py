"""The C kernel for depthwise weight gradients (slimtune/nets/depthwise_grad.c) against torch's own.

torch's convolution_backward is the independent computation; every test also checks that the C
kernel really ran (its call counter), so a silent fallback to torch cannot pass as the kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slimtune.nets import depthwise_grad
from slimtune.nets.layers import DepthwiseConv2d
from slimtune.nets.nasnet import SeparableConv2d

from native_support import assert_one_fallback_warning

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLIMTUNE_DEPTHWISE_KERNEL", raising=False)


def _torch_weight_grad(x, weight, grad, stride, padding, dilation):
    return torch.ops.aten.convolution_backward(grad, x, weight, None, list(stride), list(padding), list(dilation),
                                               False, [0, 0], x.shape[1], [False, True, False])[1]


# (batch, channels, size, kernel, stride, padding, dilation): channel counts that exercise every
# vector width of the kernel (16, 8, 4 and the scalar tail), strides, dilation, a batch smaller than
# the thread count, and padding wider than the kernel's reach on one side.
GEOMETRIES = [
    (4, 44, 23, (5, 5), (1, 1), (2, 2), (1, 1)),
    (3, 7, 20, (7, 7), (2, 2), (3, 3), (1, 1)),
    (1, 29, 17, (5, 3), (2, 1), (2, 1), (1, 1)),
    (2, 16, 19, (5, 5), (1, 1), (4, 4), (2, 2)),
    (5, 3, 12, (7, 7), (3, 3), (0, 0), (1, 1)),
]


@pytest.mark.parametrize("batch,channels,size,kernel,stride,padding,dilation", GEOMETRIES)
def test_weight_grad_equals_torch(batch, channels, size, kernel, stride, padding, dilation):
    generator = torch.Generator().manual_seed(channels)
    x = torch.randn(batch, channels, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, *kernel, generator=generator)
    out = F.conv2d(x, weight, None, stride, padding, dilation, channels)
    grad = torch.randn(out.shape, generator=generator).contiguous(memory_format=torch.channels_last)
    calls = depthwise_grad.kernel_calls
    mine = depthwise_grad._weight_grad(x, grad, kernel, stride, padding, dilation)
    assert depthwise_grad.kernel_calls == calls + 1, "the C kernel did not run"
    expected = _torch_weight_grad(x, weight, grad, stride, padding, dilation)
    assert mine.shape == expected.shape
    torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("make_layer", [
    lambda: DepthwiseConv2d(24, 5, stride=2, padding="SAME", normalizer=None, activation=None, bias=False),
    lambda: SeparableConv2d(20, 12, 7, stride=2),
])
def test_layer_gradients_equal_with_and_without_kernel(make_layer, monkeypatch):
    """A whole slim layer (TF 'SAME' padding, asymmetric at stride 2 on an even input) trains the same."""
    torch.manual_seed(0)
    layer = make_layer()
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter)
    x = torch.randn(3, layer.in_channels, 18, 18).contiguous(memory_format=torch.channels_last)

    def gradients() -> list[torch.Tensor]:
        layer.zero_grad()
        inputs = x.clone().requires_grad_()
        (layer(inputs) ** 2).sum().backward()
        return [inputs.grad] + [p.grad.clone() for p in layer.parameters()]

    calls = depthwise_grad.kernel_calls
    with_kernel = gradients()
    assert depthwise_grad.kernel_calls == calls + 1
    monkeypatch.setenv("SLIMTUNE_DEPTHWISE_KERNEL", "0")
    with_torch = gradients()
    assert depthwise_grad.kernel_calls == calls + 1
    for mine, theirs in zip(with_kernel, with_torch):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def test_small_kernels_stay_with_torch():
    """Up to 3x3 torch's gradient is the faster one (depthwise_grad.MAX_TORCH_KERNEL_AREA)."""
    layer = DepthwiseConv2d(8, 3, normalizer=None, activation=None, bias=False)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    calls = depthwise_grad.kernel_calls
    layer(x).sum().backward()
    assert depthwise_grad.kernel_calls == calls
    assert layer.depthwise_weight.grad is not None


def test_weight_grad_is_deterministic():
    x = torch.randn(6, 40, 21, 21).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(6, 40, 21, 21).contiguous(memory_format=torch.channels_last)
    first = depthwise_grad._weight_grad(x, grad, (5, 5), (1, 1), (2, 2), (1, 1))
    second = depthwise_grad._weight_grad(x, grad, (5, 5), (1, 1), (2, 2), (1, 1))
    assert torch.equal(first, second)


def test_without_a_compiler_torch_computes_it_and_says_so_once(tmp_path):
    """No C compiler on PATH: one warning line, the same gradients from torch, no kernel call."""
    script = """
import warnings, torch
from slimtune.nets import depthwise_grad
from slimtune.nets.layers import DepthwiseConv2d
torch.manual_seed(0)
layer = DepthwiseConv2d(6, 5, normalizer=None, activation=None, bias=False)
x = torch.randn(2, 6, 11, 11).contiguous(memory_format=torch.channels_last)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        layer.zero_grad()
        layer(x).sum().backward()
expected = torch.ops.aten.convolution_backward(torch.ones(2, 6, 11, 11).contiguous(memory_format=torch.channels_last),
    x, layer.depthwise_weight.detach(), None, [1, 1], [2, 2], [1, 1], False, [0, 0], 6, [False, True, False])[1]
torch.testing.assert_close(layer.depthwise_weight.grad, expected)
messages = [str(w.message) for w in caught if "depthwise" in str(w.message)]
print(len(messages), depthwise_grad.kernel_calls, messages[0])
"""
    assert_one_fallback_warning(tmp_path, script)
    assert not (tmp_path / "cache" / "kernels").exists()


def test_kernel_is_cached_per_machine(tmp_path):
    """A second process finds the compiled kernel in the cache instead of compiling it again."""
    script = ("from slimtune.nets import depthwise_grad as d, native; "
              "print(d.kernel_available(), sorted(p.name for p in native.kernel_dir().iterdir()))")
    env = {**os.environ, "SLIMTUNE_HOME": str(tmp_path), "PYTHONPATH": str(REPO / "src")}
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    built = sorted((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert second.stdout == first.stdout and first.stdout.startswith("True")
    assert built[0].stat().st_mtime_ns == stamp
