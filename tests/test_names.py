"""The naming contract (slim <-> torch names) and the TF <-> torch layout conversions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimtune.checkpoint.names import (fit_torch_array, slim_to_torch, strip_tensor_suffix, strip_wrappers,
                                       tf_to_torch_array, tf_to_torch_shape, torch_to_slim, torch_to_tf_array,
                                       torch_to_tf_shape)

CONTRACT = [
    ("vgg_16/fc8/weights", "vgg_16.fc8.weight"),
    ("vgg_16/fc8/biases", "vgg_16.fc8.bias"),
    ("resnet_v1_50/block4/unit_3/bottleneck_v1/conv2/BatchNorm/gamma",
     "resnet_v1_50.block4.unit_3.bottleneck_v1.conv2.BatchNorm.weight"),
    ("resnet_v1_50/conv1/BatchNorm/beta", "resnet_v1_50.conv1.BatchNorm.bias"),
    ("resnet_v1_50/conv1/BatchNorm/moving_mean", "resnet_v1_50.conv1.BatchNorm.running_mean"),
    ("resnet_v1_50/conv1/BatchNorm/moving_variance", "resnet_v1_50.conv1.BatchNorm.running_var"),
    ("MobilenetV1/Conv2d_1_depthwise/depthwise_weights", "MobilenetV1.Conv2d_1_depthwise.depthwise_weight"),
    ("InceptionV3/Mixed_5b/Branch_1/Conv2d_0b_5x5/weights", "InceptionV3.Mixed_5b.Branch_1.Conv2d_0b_5x5.weight"),
    ("cell_stem_0/beginning_bn/gamma", "cell_stem_0.beginning_bn.weight"),
    ("cell_0/comb_iter_0/left/bn_sep_3x3_1/beta", "cell_0.comb_iter_0.left.bn_sep_3x3_1.bias"),
]


@pytest.mark.parametrize("slim, torch_name", CONTRACT)
def test_contract_both_ways(slim, torch_name):
    assert slim_to_torch(slim) == torch_name
    assert torch_to_slim(torch_name) == slim


def test_suffixes_and_wrappers_are_stripped():
    assert slim_to_torch("vgg_16/conv1/conv1_1/weights:0") == "vgg_16.conv1.conv1_1.weight"
    assert strip_tensor_suffix("model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE") == "model/dense/kernel"
    assert strip_wrappers("module._orig_mod.vgg_16.fc8.weight") == "vgg_16.fc8.weight"
    assert torch_to_slim("module.vgg_16.fc8.bias") == "vgg_16/fc8/biases"


def test_explicit_norm_flag_wins_over_the_scope_guess():
    assert torch_to_slim("net.scale_layer.weight", is_norm=True) == "net/scale_layer/gamma"
    assert torch_to_slim("net.bn.weight", is_norm=False) == "net/bn/weights"


def test_names_without_separators_pass_through():
    assert slim_to_torch("global_step") == "global_step"
    assert slim_to_torch("vgg_16.fc8.weight") == "vgg_16.fc8.weight"
    assert torch_to_slim("vgg_16/fc8/weights") == "vgg_16/fc8/weights"


ROUND_TRIPS = [
    ("net/conv/weights", (3, 5, 4, 6), None, (6, 4, 3, 5)),
    ("net/dw/depthwise_weights", (3, 3, 8, 1), None, (8, 1, 3, 3)),
    ("net/dw/depthwise_weights", (3, 3, 4, 2), None, (8, 1, 3, 3)),
    ("net/fc/weights", (10, 7), None, (7, 10)),
    ("net/conv1d/weights", (5, 3, 4), None, (4, 3, 5)),
    ("net/conv3d/weights", (2, 3, 3, 4, 6), None, (6, 4, 2, 3, 3)),
    ("net/fc/biases", (7,), None, (7,)),
    # Keras-style dense fc6 [H*W*C, out] into a slim conv fc6 [out, C, H, W], and back.
    ("vgg16/fc6/kernel", (2 * 3 * 4, 5), (5, 4, 2, 3), (5, 4, 2, 3)),
    # A slim 'fc as conv' kernel into a torch Linear over an NCHW flatten.
    ("vgg_16/fc6/weights", (2, 3, 4, 5), (5, 24), (5, 24)),
]


@pytest.mark.parametrize("name, tf_shape, target, torch_shape", ROUND_TRIPS)
def test_layout_round_trips_exactly(name, tf_shape, target, torch_shape):
    array = np.random.default_rng(0).standard_normal(tf_shape).astype(np.float32)
    converted = tf_to_torch_array(name, array, target)
    assert converted.shape == torch_shape
    assert tf_to_torch_shape(name, tf_shape, target) == torch_shape
    torch_name = slim_to_torch(name)
    back = torch_to_tf_array(torch_name, converted, tf_shape)
    assert torch_to_tf_shape(torch_name, torch_shape, tf_shape) == tf_shape
    np.testing.assert_array_equal(back, array)


def test_torch_tensors_convert_too():
    array = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 3, 4)
    out = tf_to_torch_array("a/weights", array)
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (4, 3, 2, 2)
    assert torch.equal(torch.as_tensor(torch_to_tf_array("a.weight", out)), array)


def _valid_conv_nhwc(x, kernel_hwio):
    """Reference VALID cross-correlation exactly as TF defines it (NHWC input, HWIO kernel)."""
    kh, kw = kernel_hwio.shape[:2]
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel_hwio.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,co->nhwo", x[:, i:i + out_h, j:j + out_w, :], kernel_hwio[i, j])
    return out


def test_converted_kernels_compute_what_tf_computes():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 6, 4))
    x_nchw = torch.from_numpy(x).permute(0, 3, 1, 2)

    kernel = rng.standard_normal((3, 3, 4, 5))
    ours = F.conv2d(x_nchw, torch.from_numpy(tf_to_torch_array("c/weights", kernel))).permute(0, 2, 3, 1)
    np.testing.assert_allclose(ours.numpy(), _valid_conv_nhwc(x, kernel), atol=1e-10)

    # depthwise [H, W, C, M]: output channel c*M + m convolves input channel c with kernel[..., c, m]
    depthwise = rng.standard_normal((3, 3, 4, 2))
    expected = np.concatenate([_valid_conv_nhwc(x[..., c:c + 1], depthwise[:, :, c:c + 1, :]) for c in range(4)], axis=-1)
    ours = F.conv2d(x_nchw, torch.from_numpy(tf_to_torch_array("d/depthwise_weights", depthwise)), groups=4)
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), expected, atol=1e-10)

    # Keras flattens NHWC before a dense layer; the converted kernel is a conv over NCHW.
    dense = rng.standard_normal((6 * 6 * 4, 3))
    ours = F.conv2d(x_nchw, torch.from_numpy(tf_to_torch_array("fc6/kernel", dense, (3, 4, 6, 6)))).flatten(1)
    np.testing.assert_allclose(ours.numpy(), x.reshape(2, -1) @ dense, atol=1e-10)

    # slim's fc6 is a 6x6 VALID conv; as a torch Linear it reads the NCHW flatten.
    slim_fc = rng.standard_normal((6, 6, 4, 3))
    linear = torch.from_numpy(tf_to_torch_array("fc6/weights", slim_fc, (3, 144)))
    np.testing.assert_allclose((x_nchw.flatten(1) @ linear.T).numpy(), _valid_conv_nhwc(x, slim_fc).reshape(2, 3), atol=1e-10)


def test_target_shape_tells_depthwise_apart_when_the_name_cannot():
    kernel = np.random.default_rng(2).standard_normal((3, 3, 8, 1))
    assert tf_to_torch_array("net/conv/weights", kernel).shape == (1, 8, 3, 3)
    assert tf_to_torch_array("net/conv/kernel", kernel, (8, 1, 3, 3)).shape == (8, 1, 3, 3)
    np.testing.assert_array_equal(tf_to_torch_array("net/conv/kernel", kernel, (8, 1, 3, 3)),
                                  tf_to_torch_array("net/dw/depthwise_weights", kernel))


def test_fit_torch_array_reshapes_dense_and_conv_only():
    dense = np.arange(5 * 12.0).reshape(5, 12)
    assert fit_torch_array(dense, (5, 3, 2, 2)).shape == (5, 3, 2, 2)
    assert fit_torch_array(dense.reshape(5, 3, 2, 2), (5, 12)).shape == (5, 12)
    assert fit_torch_array(dense, (6, 10)).shape == (5, 12)  # other differences are reported, not hidden


def test_resnet_v2_standalone_norm_scopes_map_to_gamma_and_beta():
    # slim's resnet_v2 has batch norms named `preact` and `postnorm`, without a BatchNorm scope.
    assert torch_to_slim("resnet_v2_50.postnorm.weight") == "resnet_v2_50/postnorm/gamma"
    assert torch_to_slim("resnet_v2_50.block1.unit_1.bottleneck_v2.preact.bias") == \
        "resnet_v2_50/block1/unit_1/bottleneck_v2/preact/beta"
