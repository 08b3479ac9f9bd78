"""The shared TF-compatible layers: their fast paths give what the plain padded computation gives."""

import pytest
import torch
import torch.nn.functional as F

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
