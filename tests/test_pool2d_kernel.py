"""Inference pooling in a C kernel (nets/pool2d.py): bit for bit what torch's pooling with TF's
windows gives (layers.MaxPool2d / AvgPool2d with the kernel off), used only where it applies."""

import pytest
import torch

from slimtune.nets import layers, pool2d

from native_support import assert_one_fallback_warning

pytestmark = pytest.mark.skipif(pool2d._load() is None, reason="no C compiler here")


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
@pytest.mark.parametrize("channels,size,kernel,padding", [(11, 56, 3, "SAME"), (44, 28, 3, "SAME"), (22, 9, 5, "SAME"),
                                                          (192, 8, 3, "SAME"), (7, 13, 3, "VALID"), (3, 6, 5, "VALID")])
def test_equals_torch_bit_for_bit(pool, channels, size, kernel, padding, monkeypatch):
    x = _channels_last(2, channels, size, size + 1)
    ours, theirs, used = _both(pool(kernel, 1, padding), x, monkeypatch)
    assert used == 1
    assert ours.shape == theirs.shape and ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("pool", [layers.MaxPool2d, layers.AvgPool2d])
def test_nan_and_infinity_as_torch(pool, monkeypatch):
    x = _channels_last(1, 12, 7, 7)
    with torch.no_grad():
        x[0, 2, 3, 3] = float("nan")
        x[0, 5, 0, 0] = float("-inf")
        x[0, 6, 6, 6] = float("inf")
    ours, theirs, used = _both(pool(3, 1, "SAME"), x, monkeypatch)
    assert used == 1
    assert torch.equal(ours.isnan(), theirs.isnan()) and ours[0, 2, 2:5, 2:5].isnan().all()
    assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(theirs))


def test_only_where_it_applies(monkeypatch):
    monkeypatch.setenv("SLIMTUNE_POOL_KERNEL", "1")
    x = _channels_last(2, 11, 10, 10)
    calls = pool2d.kernel_calls
    with torch.no_grad():
        layers.MaxPool2d(3, 2, "SAME")(x)  # stride 2: torch's
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
