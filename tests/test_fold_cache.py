"""Inference folds each BatchNorm into its kernel once per set of weights (layers.inference_cached),
not on every call. The cache must never serve a stale fold: every way the weights or statistics
change (in-place writes, an optimizer step, load_state_dict, replaced parameters, a dtype change, a
training-mode forward) gives exactly what a net that never cached computes, and tracing, autograd
and deepcopy never see a cached tensor."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from slimtune.nets import create_model
from slimtune.nets import layers
from slimtune.nets.layers import Conv2d, batch_norm_factory


class _CountedOps(TorchDispatchMode):
    """Counts aten ops by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(Conv2d(3, 8, 3, normalizer=batch_norm_factory(scale=True)),
                        Conv2d(8, 4, 1, stride=2, normalizer=batch_norm_factory()))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, layers.BatchNorm):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                if module.weight is not None:
                    module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
    return net.eval()


def _uncached(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same net's output computed without the cache (a copy: the cache is per module)."""
    twin = copy.deepcopy(net)
    original = layers.inference_cached
    layers.inference_cached = lambda owner, slot, sources, compute: compute()
    try:
        with torch.no_grad():
            return twin(x)
    finally:
        layers.inference_cached = original


def _normalized_separately(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv, then the BN on moving statistics, with no folding at all (the definition)."""
    with torch.no_grad():
        for conv in net:
            x = conv.convolve(x, conv.weight, conv.bias, normalize=True)
    return x


def test_second_inference_call_folds_nothing_and_gives_the_same_values() -> None:
    net, x = _net(), torch.randn(2, 3, 9, 9)
    with torch.no_grad(), _CountedOps() as first:
        once = net(x)
    with torch.no_grad(), _CountedOps() as second:
        twice = net(x)
    assert first.counts.get("rsqrt") == 2  # two BNs folded on the first call
    assert "rsqrt" not in second.counts and "mul" not in second.counts
    assert torch.equal(once, twice)
    torch.testing.assert_close(once, _normalized_separately(net, x), rtol=1e-5, atol=1e-5)


def test_every_kind_of_weight_change_is_seen() -> None:
    net, x = _net(), torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        net(x)  # fill the cache
        net[0].weight.mul_(1.5)  # in-place write to a kernel
    with torch.no_grad():
        assert torch.equal(net(x), _uncached(net, x))
        net[1].BatchNorm.running_var.add_(0.25)  # in-place write to a statistic
        assert torch.equal(net(x), _uncached(net, x))
        net[0].BatchNorm.weight.copy_(torch.full((8,), 0.3))  # copy_ into gamma
        assert torch.equal(net(x), _uncached(net, x))

    other = _net()
    with torch.no_grad():
        other[0].weight.normal_()
    net.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(net(x), other(x))

    # A new parameter whose version counter happens to equal the old one's: only the memory differs.
    old_kernel = net[1].weight
    replacement = torch.randn_like(old_kernel)
    with torch.no_grad():
        while replacement._version < old_kernel._version:
            replacement.add_(0.0)
    assert replacement._version == old_kernel._version
    net[1].weight = nn.Parameter(replacement)
    with torch.no_grad():
        assert torch.equal(net(x), _uncached(net, x))
        net(x)
    # The same memory read in another order (a view sharing storage and version counter).
    kernel = net[1].weight
    net[1].weight = nn.Parameter(torch.as_strided(kernel.detach(), kernel.shape, (1, 4, 1, 1)))
    assert net[1].weight.data_ptr() == kernel.data_ptr()
    with torch.no_grad():
        assert torch.equal(net(x), _uncached(net, x))

    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    net(x).square().mean().backward()  # also updates the moving statistics
    optimizer.step()
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), _uncached(net, x))
        torch.testing.assert_close(net(x), _normalized_separately(net, x), rtol=1e-5, atol=1e-5)

    net.double()
    with torch.no_grad():
        got = net(x.double())
    assert got.dtype == torch.float64
    assert torch.equal(got, _uncached(net, x.double()))


def test_training_mode_drops_the_cache() -> None:
    net, x = _net(), torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        net(x)
    assert all(bn in layers._INFERENCE_CACHE for bn in (net[0].BatchNorm, net[1].BatchNorm))
    net.train()
    assert not any(bn in layers._INFERENCE_CACHE for bn in (net[0].BatchNorm, net[1].BatchNorm))


def test_autograd_tracing_and_copies_never_see_a_cached_fold() -> None:
    net, x = _net(), torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        net(x)
    # With autograd, eval mode runs slim's separate BN and the gradient reaches the kernel.
    net(x).sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0

    # A trace taken after a cached call computes the fold from the parameters, so it follows them.
    with torch.no_grad():
        traced = torch.jit.trace(net, x, check_trace=False)
        net[0].weight.mul_(2.0)
        assert torch.equal(traced(x), _uncached(net, x))

    twin = copy.deepcopy(net)
    assert not any(isinstance(m, layers.BatchNorm) and m in layers._INFERENCE_CACHE for m in twin.modules())
    with torch.no_grad():
        assert torch.equal(twin(x), net(x))


def test_nasnet_factorized_reduction_fold_follows_both_paths() -> None:
    torch.manual_seed(0)
    net = create_model("nasnet_cifar", num_classes=10, num_cells=3).eval()
    x = torch.randn(2, 3, 32, 32)
    reduction = next(m for m in net.modules() if hasattr(m, "path2_conv") and hasattr(m, "final_path_bn"))
    with torch.no_grad():
        before = net(x)
        with _CountedOps() as counted:
            assert torch.equal(net(x), before)
        assert "rsqrt" not in counted.counts
        reduction.path2_conv.weight.mul_(-1.0)
        after = net(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, _uncached(net, x))
