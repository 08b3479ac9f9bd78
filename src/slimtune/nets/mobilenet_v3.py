"""MobileNet v3 and MobileNet-EdgeTPU as research/slim builds them (nets/mobilenet/mobilenet_v3.py).

Four MobileNet v3 definitions (V3_LARGE, V3_SMALL and their "minimalistic" versions, scope
'MobilenetV3') and V3_EDGETPU (scope 'MobilenetEdgeTPU'), all run by slim's generic
`mobilenet.mobilenet` (see mobilenet_common):

- a 3x3/2 stem conv (`Conv`), inverted-residual blocks (`expanded_conv`, `expanded_conv_1`, ...)
  whose expansion is `make_divisible(input_depth * factor, 8)`;
- v3 blocks may carry squeeze-excite on the depthwise output (scope `squeeze_excite`: average
  pool, 1x1 `Conv` to make_divisible(width / 4, 8) + ReLU, 1x1 `Conv_1` back + hard-sigmoid gate
  relu6(x + 3) * 0.16667 -- slim's constant, not 1/6 -- then x * gate) and hard-swish
  x * relu6(x + 3) / 6 as inner activation; ReLU elsewhere (the arg scope's default), linear
  projections. Minimalistic nets drop squeeze-excite, hard-swish and 5x5 kernels;
- v3 ends with `Conv_1` (1x1, BN), `reduce_to_1x1` (an average pool to 1x1 for square maps, a
  7x7/1 VALID window otherwise) and `Conv_2` (1x1 to 1280/1024, biases, no BN) before slim's
  global pool and `Logits/Conv2d_1c_1x1`;
- EdgeTPU's first ten blocks are "fused": a 3x3 expansion conv carrying the block's stride and no
  depthwise conv (a block that does not expand is then only its 1x1 projection); it ends with
  `Conv_1` (1x1 to 1280, BN, ReLU).

BN: decay 0.997, epsilon 0.001, gamma and beta (training_scope + DEFAULTS); truncated-normal(0.09)
initialization. `depth_multiplier` scales every layer by make_divisible(d * m, 8);
`finegrain_classification_mode` keeps the last conv unscaled (slim's v3 does this for any
multiplier, above 1 too). End points: layer_1 ... layer_N, each block's layer_N/expansion_output
(when it expands), layer_N/depthwise_output (unfused blocks), layer_N/output, then global_pool,
Logits, Predictions.

slim's v3 always pools globally and squeezes the logits (its mobilenet() takes neither
`global_pool` nor `spatial_squeeze`), so neither is an option here; num_classes=0 returns the
pooled features (slim's `global_pool` end point), any input size works (square maps, or
non-square ones whose last map is at least 7x7 for the four v3 nets).

slim's v3 cannot be built with `use_explicit_padding` (its reduce_to_1x1 passes the flag to
slim.avg_pool2d, and EdgeTPU's fused residuals stop matching in shape) nor with an
`output_stride` that gives reduce_to_1x1 an atrous rate: both are ConfigErrors here. The
published checkpoints (1001 classes, inception preprocessing, 224) are the float ones of slim's
mobilenet README.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .batch_norm_act import HARD_SWISH, RELU, register_activation
from .layers import Conv2d, batch_norm_factory, reduce_mean_hw
from .mobilenet_common import (ConvOp, ExpandedConvOp, MobileNet, ReduceTo1x1Op, expand_input_by_factor,
                               make_divisible)
from .registry import register_model

# training_scope's batch norm (decay 0.997, slim's epsilon) with DEFAULTS' center + scale.
BATCH_NORM_DECAY = 0.997
BATCH_NORM_EPSILON = 0.001
#: slim's hard-sigmoid gate multiplies by this rounded constant, not by 1/6.
HARD_SIGMOID_SCALE = 0.16667


def relu_(x: Tensor) -> Tensor:
    """tf.nn.relu in place, for fresh conv/BN outputs (ReLU's backward needs only its output)."""
    return torch.relu_(x)


def hard_swish(x: Tensor) -> Tensor:
    """slim mobilenet_v3's hard_swish: x * relu6(x + 3) / 6 (in place when no gradient is recorded)."""
    if x.requires_grad and torch.is_grad_enabled():
        return F.hardswish(x)
    return F.hardswish(x, inplace=True)


register_activation(relu_, RELU)
register_activation(hard_swish, HARD_SWISH)


def hard_sigmoid(x: Tensor) -> Tensor:
    """slim mobilenet_v3's squeeze-excite gate: relu6(x + 3) * 0.16667."""
    if x.requires_grad and torch.is_grad_enabled():
        return F.relu6(x + 3.0) * HARD_SIGMOID_SCALE
    return x.add_(3.0).clamp_(0.0, 6.0).mul_(HARD_SIGMOID_SCALE)


class SqueezeExcite(nn.Module):
    """slim conv_blocks.squeeze_excite (squeeze_factor 4, ReLU inside, hard-sigmoid gate), scope
    'squeeze_excite': `Conv` (1x1 to make_divisible(C / 4, 8), biases, ReLU) and `Conv_1` (1x1
    back to C, biases, gate) on the spatial average; returns x * gate."""

    def __init__(self, channels: int, squeeze_factor: int = 4, divisible_by: int = 8) -> None:
        super().__init__()
        self.channels = channels
        squeezed = make_divisible(channels / squeeze_factor, divisible_by)
        self.Conv = Conv2d(channels, squeezed, 1, padding="VALID", activation=relu_, bias=True)
        self.Conv_1 = Conv2d(squeezed, channels, 1, padding="VALID", activation=hard_sigmoid, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """Gate every channel of x by the excitation of its spatial mean."""
        gate = self.Conv_1(self.Conv(reduce_mean_hw(x)))
        return x * gate


def _squeeze_excite(width: int) -> tuple[str, nn.Module]:
    """slim's _se4 expansion transform: squeeze-excite on the depthwise output."""
    return "squeeze_excite", SqueezeExcite(width)


def _block(factor: float, depth: int, kernel: int, stride: int = 1, act=relu_, se: bool = False,
           **kwargs) -> ExpandedConvOp:
    """slim's mbv3_op / mbv3_op_se: an inverted-residual block."""
    return ExpandedConvOp(depth, stride=stride, kernel_size=kernel, expansion=expand_input_by_factor(factor),
                          inner_activation=act, expansion_transform=_squeeze_excite if se else None, **kwargs)


def _fused(factor: float, depth: int, kernel: int, stride: int = 1) -> ExpandedConvOp:
    """slim's mbv3_fused: a kernel x kernel expansion conv with the stride, no depthwise conv."""
    return _block(factor, depth, kernel, stride, fused=True)


def _head(last_conv: int, final: int, act) -> tuple:
    """v3's tail: 1x1 conv (BN), reduce_to_1x1, 1x1 conv with biases and no BN."""
    return (ConvOp(last_conv, kernel_size=1, activation=act), ReduceTo1x1Op(default_size=7),
            ConvOp(final, kernel_size=1, activation=act, normalizer=False))


_hs = hard_swish

#: slim's V3_LARGE.
V3_LARGE: tuple = (
    ConvOp(16, kernel_size=3, stride=2, activation=_hs),
    _block(1, 16, 3),
    _block(4, 24, 3, 2),
    _block(3, 24, 3),
    _block(3, 40, 5, 2, se=True),
    _block(3, 40, 5, se=True),
    _block(3, 40, 5, se=True),
    _block(6, 80, 3, 2, act=_hs),
    _block(2.5, 80, 3, act=_hs),
    _block(184 / 80., 80, 3, act=_hs),
    _block(184 / 80., 80, 3, act=_hs),
    _block(6, 112, 3, act=_hs, se=True),
    _block(6, 112, 3, act=_hs, se=True),
    _block(6, 160, 5, 2, act=_hs, se=True),
    _block(6, 160, 5, act=_hs, se=True),
    _block(6, 160, 5, act=_hs, se=True),
) + _head(960, 1280, _hs)

#: slim's V3_LARGE_MINIMALISTIC: no squeeze-excite, no hard-swish, 3x3 kernels only.
V3_LARGE_MINIMALISTIC: tuple = (
    ConvOp(16, kernel_size=3, stride=2),
    _block(1, 16, 3),
    _block(4, 24, 3, 2),
    _block(3, 24, 3),
    _block(3, 40, 3, 2),
    _block(3, 40, 3),
    _block(3, 40, 3),
    _block(6, 80, 3, 2),
    _block(2.5, 80, 3),
    _block(184 / 80., 80, 3),
    _block(184 / 80., 80, 3),
    _block(6, 112, 3),
    _block(6, 112, 3),
    _block(6, 160, 3, 2),
    _block(6, 160, 3),
    _block(6, 160, 3),
) + _head(960, 1280, "default")

#: slim's V3_SMALL.
V3_SMALL: tuple = (
    ConvOp(16, kernel_size=3, stride=2, activation=_hs),
    _block(1, 16, 3, 2, se=True),
    _block(72. / 16, 24, 3, 2),
    _block(88. / 24, 24, 3),
    _block(4, 40, 5, 2, act=_hs, se=True),
    _block(6, 40, 5, act=_hs, se=True),
    _block(6, 40, 5, act=_hs, se=True),
    _block(3, 48, 5, act=_hs, se=True),
    _block(3, 48, 5, act=_hs, se=True),
    _block(6, 96, 5, 2, act=_hs, se=True),
    _block(6, 96, 5, act=_hs, se=True),
    _block(6, 96, 5, act=_hs, se=True),
) + _head(576, 1024, _hs)

#: slim's V3_SMALL_MINIMALISTIC.
V3_SMALL_MINIMALISTIC: tuple = (
    ConvOp(16, kernel_size=3, stride=2),
    _block(1, 16, 3, 2),
    _block(72. / 16, 24, 3, 2),
    _block(88. / 24, 24, 3),
    _block(4, 40, 3, 2),
    _block(6, 40, 3),
    _block(6, 40, 3),
    _block(3, 48, 3),
    _block(3, 48, 3),
    _block(6, 96, 3, 2),
    _block(6, 96, 3),
    _block(6, 96, 3),
) + _head(576, 1024, "default")

#: slim's V3_EDGETPU (upstream tensorflow/models 03cdc5fe): fused blocks first, no squeeze-excite.
V3_EDGETPU: tuple = (
    ConvOp(32, kernel_size=3, stride=2),
    _fused(1, 16, 3),
    _fused(8, 32, 3, 2),
    _fused(4, 32, 3),
    _fused(4, 32, 3),
    _fused(4, 32, 3),
    _fused(8, 48, 3, 2),
    _fused(4, 48, 3),
    _fused(4, 48, 3),
    _fused(4, 48, 3),
    _block(8, 96, 3, 2),
    _block(4, 96, 3),
    _block(4, 96, 3),
    _block(4, 96, 3),
    _block(8, 96, 3, residual=False),
    _block(4, 96, 3),
    _block(4, 96, 3),
    _block(4, 96, 3),
    _block(8, 160, 5, 2),
    _block(4, 160, 5),
    _block(4, 160, 5),
    _block(4, 160, 5),
    _block(8, 192, 3),
    ConvOp(1280, kernel_size=1),
)

CONV_DEFS = {"large": V3_LARGE, "small": V3_SMALL, "large_minimalistic": V3_LARGE_MINIMALISTIC,
             "small_minimalistic": V3_SMALL_MINIMALISTIC, "edgetpu": V3_EDGETPU}


def v3_ops(conv_defs: str, finegrain_classification_mode: bool) -> tuple:
    """The op list; finegrain mode keeps the last layer's depth out of the multiplier (slim replaces
    its multiplier_func by the identity, whatever the multiplier)."""
    if conv_defs not in CONV_DEFS:
        raise ConfigError(f"MobileNet v3: conv_defs={conv_defs!r}; expected one of {sorted(CONV_DEFS)}")
    ops = CONV_DEFS[conv_defs]
    if not finegrain_classification_mode:
        return ops
    last = ops[-1]
    return ops[:-1] + (ConvOp(last.num_outputs, kernel_size=last.kernel_size, stride=last.stride,
                              activation=last.activation, normalizer=last.normalizer, scale_depth=False),)


class MobileNetV3(MobileNet):
    """slim's mobilenet_v3.mobilenet over one of CONV_DEFS, under scope 'MobilenetV3' (v3) or
    'MobilenetEdgeTPU' (edgetpu).

    Keyword arguments are slim's: depth_multiplier, finegrain_classification_mode, output_stride
    (None, 1 or even: atrous beyond it), use_explicit_padding (slim cannot build it for these
    nets: a ConfigError), dropout_keep_prob (training_scope's 0.8).
    """

    def __init__(self, num_classes: int = 1001, conv_defs: str = "large", depth_multiplier: float = 1.0,
                 finegrain_classification_mode: bool = False, output_stride: Optional[int] = None,
                 use_explicit_padding: bool = False, dropout_keep_prob: float = 0.8, scope: Optional[str] = None,
                 in_channels: int = 3) -> None:
        scope = scope or ("MobilenetEdgeTPU" if conv_defs == "edgetpu" else "MobilenetV3")
        if use_explicit_padding:
            raise ConfigError(f"{scope}: slim's MobileNet v3 cannot be built with use_explicit_padding=True "
                              "(reduce_to_1x1 hands the flag to slim.avg_pool2d, a TypeError, and EdgeTPU's "
                              "fused blocks then add residuals of different sizes); leave it False")
        norm = batch_norm_factory(eps=BATCH_NORM_EPSILON, decay=BATCH_NORM_DECAY, scale=True)
        super().__init__(num_classes, v3_ops(conv_defs, finegrain_classification_mode), scope,
                         depth_multiplier=depth_multiplier, output_stride=output_stride,
                         dropout_keep_prob=dropout_keep_prob, norm=norm, activation=relu_,
                         in_channels=in_channels)
        self.conv_defs = conv_defs
        self.finegrain_classification_mode = bool(finegrain_classification_mode)


def _register(name: str, conv_defs: str, scope: str, published: str, top1: float, doc: str, **defaults):
    """Register one slim nets_factory name of the v3 family."""
    def build(num_classes: int = 1001, **kwargs) -> MobileNetV3:
        return MobileNetV3(num_classes, **{"conv_defs": conv_defs, **kwargs})

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    return register_model(name, default_image_size=224, preprocessing="inception", checkpoint_num_classes=1001,
                          scope=scope, published_checkpoint=published, published_top1=top1,
                          classifier_scopes=(f"{scope}/Logits",), first_conv=f"{scope}/Conv",
                          **defaults)(build)


# Published float checkpoints and top-1 (%) from slim's nets/mobilenet/README.md (no top-5 given).
mobilenet_v3_large = _register(
    "mobilenet_v3_large", "large", "MobilenetV3", "v3-large_224_1.0_float.tgz", 75.2,
    "MobileNet v3 large (slim nets/mobilenet/mobilenet_v3.py V3_LARGE, scope 'MobilenetV3').")
mobilenet_v3_small = _register(
    "mobilenet_v3_small", "small", "MobilenetV3", "v3-small_224_1.0_float.tgz", 67.5,
    "MobileNet v3 small (slim V3_SMALL, scope 'MobilenetV3').")
mobilenet_v3_large_minimalistic = _register(
    "mobilenet_v3_large_minimalistic", "large_minimalistic", "MobilenetV3",
    "v3-large-minimalistic_224_1.0_float.tgz", 72.3,
    "MobileNet v3 large without squeeze-excite, hard-swish or 5x5 kernels (slim V3_LARGE_MINIMALISTIC).")
mobilenet_v3_small_minimalistic = _register(
    "mobilenet_v3_small_minimalistic", "small_minimalistic", "MobilenetV3",
    "v3-small-minimalistic_224_1.0_float.tgz", 61.9,
    "MobileNet v3 small without squeeze-excite, hard-swish or 5x5 kernels (slim V3_SMALL_MINIMALISTIC).")
mobilenet_edgetpu = _register(
    "mobilenet_edgetpu", "edgetpu", "MobilenetEdgeTPU", "mobilenet_edgetpu_224_1.0.tgz", 75.6,
    "MobileNet-EdgeTPU (slim V3_EDGETPU, scope 'MobilenetEdgeTPU'); the README's top-1 is the 8-bit model's.")
mobilenet_edgetpu_075 = _register(
    "mobilenet_edgetpu_075", "edgetpu", "MobilenetEdgeTPU", "mobilenet_edgetpu_224_0.75.tgz", 73.5,
    "MobileNet-EdgeTPU, depth multiplier 0.75 with a full 1280-wide last layer (slim's edge_tpu_075).",
    depth_multiplier=0.75, finegrain_classification_mode=True)
