"""Inference pooling in a C kernel (nets/pool2d.py): bit for bit what torch's pooling with TF's
windows gives (layers.MaxPool2d / AvgPool2d with the kernel off), used only where it applies."""

import pytest
import torch

from slimtune.nets import layers, pool2d

from native_support import assert_one_fallback_warning, needs_c_compiler

pytestmark = needs_c_compiler


def _channels_last(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).contiguous(memory_format=torch.channels_last)


def _both(module, x, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_POOL_KERNEL", "1")
    calls = pool2d.kernel_calls
    with torch.no_grad():
        ours = module(x)
    used = pool2d.kernel_calls - calls
    monkeypatch.setenv("SLIMTUNE_POOL_KERNEL", "0")
    with torch.no_grad():
        theirs = module(x)
    return ours, theirs, used


@pytest.mark.parametrize("pool", [layers.MaxPool2d, layers.AvgPool2d])
@pytest.mark.parametrize("channels,size,kernel,stride,padding", [
    (11, 56, 3, 1, "SAME"), (44, 28, 3, 1, "SAME"), (22, 9, 5, 1, "SAME"), (192, 8, 3, 1, "SAME"),
    (7, 13, 3, 1, "VALID"), (3, 6, 5, 1, "VALID"),
    # strided: even and odd sizes (TF's SAME pads one side only when the total is odd), a 2x2 window,
    # stride 3, and VALID windows that leave the last columns unread
    (11, 111, 3, 2, "SAME"), (22, 56, 3, 2, "SAME"), (5, 10, 2, 2, "SAME"), (13, 17, 5, 3, "SAME"),
    (8, 15, 3, 2, "VALID"), (63, 12, 3, 2, "VALID")])
def test_equals_torch_bit_for_bit(pool, channels, size, kernel, stride, padding, monkeypatch):
    # A strided average whose rows and columns TF pads differently is not one torch pooling
    # (layers.AvgPool2d then divides a padded map's sums by counts): the float64 test below covers
    # it; here the width is the height plus the stride, so both are padded alike.
    width = size + stride if pool is layers.AvgPool2d and stride > 1 else size + 1
    x = _channels_last(2, channels, size, width)
    ours, theirs, used = _both(pool(kernel, stride, padding), x, monkeypatch)
    assert used == 1
    assert ours.shape == theirs.shape and ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("channels,height,width,kernel,stride", [(11, 111, 112, 3, 2), (13, 17, 19, 5, 3),
                                                                  (4, 9, 6, 3, 2)])
def test_strided_average_is_the_exact_mean_rounded_once(channels, height, width, kernel, stride, monkeypatch):
    # TF's SAME pads these rows and columns differently (111 rows: one above and one below; 112
    # columns: one on the right), which torch's pooling cannot express: each output must be the
    # float32 sum of its window's pixels inside the map divided by their count.
    x = _channels_last(2, channels, height, width)
    ours, theirs, used = _both(layers.AvgPool2d(kernel, stride, "SAME"), x, monkeypatch)
    assert used == 1
    left, right, top, bottom = layers._same_pads(x, (kernel, kernel), (stride, stride), (1, 1))
    padded = torch.nn.functional.pad(x.double(), (left, right, top, bottom))
    inside = torch.nn.functional.pad(torch.ones(1, 1, height, width, dtype=torch.float64), (left, right, top, bottom))
    exact = torch.nn.functional.avg_pool2d(padded, kernel, stride) / torch.nn.functional.avg_pool2d(inside, kernel, stride)
    assert ours.shape == exact.shape
    # a float32 sum of up to kernel**2 terms, each step rounded, then one rounded division
    error = (ours.double() - exact).abs().max()
    assert error <= kernel * kernel * torch.finfo(torch.float32).eps * x.abs().max()
    assert error <= (theirs.double() - exact).abs().max()


@pytest.mark.parametrize("pool", [layers.MaxPool2d, layers.AvgPool2d])
@pytest.mark.parametrize("stride", [1, 2])
def test_nan_and_infinity_as_torch(pool, stride, monkeypatch):
    x = _channels_last(1, 12, 7, 7)
    with torch.no_grad():
        x[0, 2, 3, 3] = float("nan")
        x[0, 5, 0, 0] = float("-inf")
        x[0, 6, 6, 6] = float("inf")
    ours, theirs, used = _both(pool(3, stride, "SAME"), x, monkeypatch)
    assert used == 1
    window = slice(2, 5) if stride == 1 else slice(1, 3)  # the outputs whose windows hold pixel (3, 3)
    assert torch.equal(ours.isnan(), theirs.isnan()) and ours[0, 2, window, window].isnan().all()
    assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(theirs))


def test_only_where_it_applies(monkeypatch):
    monkeypatch.setenv("SLIMTUNE_POOL_KERNEL", "1")
    x = _channels_last(2, 11, 10, 10)
    calls = pool2d.kernel_calls
    with torch.no_grad():
        layers.MaxPool2d(3, 2, "SAME")(_channels_last(2, 64, 10, 10))  # strided with 64 channels: torch's
        layers.MaxPool2d(3, 1, "SAME")(x.contiguous())  # NCHW: torch's
        layers.AvgPool2d(3, 1, "SAME")(x.double())  # float64: torch's
    pooled = layers.MaxPool2d(3, 1, "SAME")(x.requires_grad_())  # autograd: torch's, with its gradient
    pooled.sum().backward()
    assert pool2d.kernel_calls == calls and x.grad is not None


def test_without_a_compiler_torch_pools(tmp_path):
    script = """
import warnings, torch
from slimtune.nets import layers, pool2d
x = torch.randn(2, 11, 8, 8).contiguous(memory_format=torch.channels_last)
with warnings.catch_warnings(record=True) as caught, torch.no_grad():
    warnings.simplefilter("always")
    first, second = layers.MaxPool2d(3, 1, "SAME")(x), layers.AvgPool2d(3, 1, "SAME")(x)
assert torch.equal(first, torch.nn.functional.max_pool2d(x, 3, 1, 1))
messages = [str(w.message) for w in caught if "pooling" in str(w.message)]
print(len(messages), pool2d.kernel_calls, messages[0])
"""
    assert_one_fallback_warning(tmp_path, script)
