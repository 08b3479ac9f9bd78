"""The shared TF-compatible layers: their fast paths give what the plain padded computation gives."""

import pytest
import torch
import torch.nn.functional as F

from slimtune.errors import ConfigError
from slimtune.nets.layers import Conv2d, MaxPool2d, same_padding


def _reference_same_max_pool(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TF 'SAME' max pooling spelled out: pad with -inf (extra pixel after), then pool unpadded."""
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    padded = F.pad(x, (left, right, top, bottom), value=float("-inf"))
    return F.max_pool2d(padded, kernel, stride)


@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_max_pool_matches_padded_reference_for_every_size(kernel: int, stride: int) -> None:
    generator = torch.Generator().manual_seed(kernel * 10 + stride)
    for height in range(1, 18):
        width = 19 - height
        # Negative inputs make a wrongly counted padded zero visible as a wrong maximum.
        x = -torch.rand(2, 3, height, width, generator=generator) - 0.5
        got = MaxPool2d(kernel, stride, padding="SAME")(x)
        want = _reference_same_max_pool(x, kernel, stride)
        assert got.shape == want.shape == (2, 3, -(-height // stride), -(-width // stride))
        assert torch.equal(got, want), (height, width)


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_covering_its_whole_input_equals_the_convolution(channels_last: bool) -> None:
    torch.manual_seed(0)
    layer = Conv2d(16, 8, 7, padding="VALID", activation=None, bias=True)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(4, 16, 7, 7)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    got = layer(x)
    want = F.conv2d(x, layer.weight, layer.bias)
    assert got.shape == (4, 8, 1, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    (grad_want,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-5)


def test_same_conv_on_a_kernel_sized_input_keeps_its_spatial_size() -> None:
    # 'SAME' pads a 3x3 kernel on a 3x3 map: it must stay a 3x3 convolution, not become a dot product.
    layer = Conv2d(4, 5, 3, padding="SAME", activation=None)
    x = torch.randn(1, 4, 3, 3)
    got = layer(x)
    want = F.conv2d(x, layer.weight, layer.bias, padding=1)
    assert got.shape == (1, 5, 3, 3)
    torch.testing.assert_close(got, want)


def _with_random_batch_norm(layer: Conv2d, seed: int) -> Conv2d:
    generator = torch.Generator().manual_seed(seed)
    norm = layer.BatchNorm
    channels = norm.num_features
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(channels, generator=generator))
        norm.running_var.copy_(torch.rand(channels, generator=generator) * 2 + 0.1)
        if norm.weight is not None:
            norm.weight.copy_(torch.randn(channels, generator=generator))
        norm.bias.copy_(torch.randn(channels, generator=generator))
    return layer


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_folds_batch_norm_into_the_kernel_without_changing_the_output(
        scale: bool, depthwise: bool, channels_last: bool) -> None:
    from slimtune.nets.layers import DepthwiseConv2d, batch_norm_factory

    norm = batch_norm_factory(scale=scale)
    layer = (DepthwiseConv2d(8, 3, stride=2, normalizer=norm) if depthwise
             else Conv2d(8, 6, 3, stride=2, normalizer=norm))
    layer = _with_random_batch_norm(layer, seed=int(scale) + 2 * int(depthwise)).eval()
    x = torch.randn(3, 8, 10, 9)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    separate = layer(x)  # autograd on: BN runs as its own op
    with torch.no_grad():
        assert layer._folds_batch_norm()
        folded = layer(x)
    torch.testing.assert_close(folded, separate, rtol=1e-5, atol=1e-5)


def test_training_batch_norm_is_never_folded_and_keeps_updating_its_statistics() -> None:
    from slimtune.nets.layers import batch_norm_factory

    layer = _with_random_batch_norm(Conv2d(4, 5, 3, normalizer=batch_norm_factory()), seed=7).train()
    before = layer.BatchNorm.running_mean.clone()
    with torch.no_grad():
        assert not layer._folds_batch_norm()
        out = layer(torch.randn(6, 4, 8, 8))
    assert not torch.equal(layer.BatchNorm.running_mean, before)
    assert out.shape == (6, 5, 8, 8)
    layer.BatchNorm.frozen = True  # a frozen BN (--trainable_scopes, --freeze_batch_norm) uses moving stats
    with torch.no_grad():
        assert layer._folds_batch_norm()


def test_shared_helpers_have_one_definition() -> None:
    """check_keep_prob, the BN fold and the conv-as-FC head each live in one module that every net
    family imports (vgg, alexnet_v2 and overfeat share conv_fc_head's head)."""
    import importlib
    import pkgutil

    import slimtune.nets as nets
    from slimtune.nets import conv_fc_head, layers

    shared = {"check_keep_prob": layers, "fold_batch_norm": layers, "FullyConvolutionalNet": conv_fc_head,
              "FullyConvolutionalBody": conv_fc_head}
    for info in pkgutil.iter_modules(nets.__path__):
        module = importlib.import_module(f"slimtune.nets.{info.name}")
        for name, home in shared.items():
            if hasattr(module, name):
                assert getattr(module, name) is getattr(home, name), f"nets/{info.name}.py redefines {name}"
    for name in ("vgg_16", "alexnet_v2", "overfeat"):
        with torch.device("meta"):
            model = nets.create_model(name)
        assert isinstance(model, conv_fc_head.FullyConvolutionalNet)
    with pytest.raises(ConfigError, match="dropout_keep_prob must be in"):
        layers.check_keep_prob("net", float("nan"))


def test_fold_batch_norm_equals_conv_then_moving_statistics_batch_norm() -> None:
    from slimtune.nets.layers import BatchNorm, fold_batch_norm

    torch.manual_seed(0)
    norm = BatchNorm(6, scale=True).eval()
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    kernel, bias, x = torch.randn(6, 3, 3, 3), torch.randn(6), torch.randn(2, 3, 8, 8)
    folded_kernel, folded_bias = fold_batch_norm(kernel, bias, norm)
    expected = norm(F.conv2d(x, kernel, bias))
    torch.testing.assert_close(F.conv2d(x, folded_kernel, folded_bias), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,height,width", [(3, 1, 9, 9), (3, 2, 11, 11), (5, 3, 10, 10)])
def test_average_pool_with_explicit_padding_has_the_same_values_and_gradients(monkeypatch, kernel, stride,
                                                                               height, width) -> None:
    """On CUDA, training takes the explicit-padding path (torch's channels-last avg_pool2d backward
    with padding was wrong there): forced here on the CPU, it gives torch's padding's values and
    gradients (float64: only the summation order differs)."""
    from slimtune.nets import layers

    generator = torch.Generator().manual_seed(kernel + stride)
    x = torch.randn(2, 5, height, width, generator=generator, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)
    weights = torch.randn(2, 5, -(-height // stride), -(-width // stride), generator=generator, dtype=torch.float64)
    monkeypatch.setenv("SLIMTUNE_POOL_KERNEL", "0")
    results = []
    real_pad2d = layers.pad2d
    for forced in (False, True):
        monkeypatch.setattr(layers, "_cuda_padded_pool_gradient_is_unsafe", lambda t, forced=forced: forced)
        calls: list = []
        monkeypatch.setattr(layers, "pad2d", lambda *a, calls=calls, **k: calls.append(a[1]) or real_pad2d(*a, **k))
        leaf = x.clone().requires_grad_()
        out = layers.AvgPool2d(kernel, stride, "SAME")(leaf)
        (out * weights).sum().backward()
        results.append((out.detach(), leaf.grad, len(calls)))
    (plain, plain_grad, plain_pads), (explicit, explicit_grad, explicit_pads) = results
    assert plain_pads == 0 and explicit_pads == 1  # the forced run did take the explicit path
    torch.testing.assert_close(explicit, plain, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(explicit_grad, plain_grad, rtol=1e-14, atol=1e-14)
