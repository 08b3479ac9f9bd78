"""MobileNet v2 as research/slim builds it (nets/mobilenet/mobilenet_v2.py, V2_DEF).

A 3x3/2 conv (`Conv`), 17 inverted-residual blocks (`expanded_conv`, `expanded_conv_1` ...
`expanded_conv_16`: 1x1 expand x6 -> 3x3 depthwise -> linear 1x1 project, residual when stride 1
and depths match; the first block has no expansion), a 1x1 conv to 1280 (`Conv_1`), global
average pool and the 1x1-conv classifier `Logits/Conv2d_1c_1x1`. BN + ReLU6 everywhere but the
projections; BN with gamma, epsilon 0.001, decay 0.997 (training_scope); truncated-normal(0.09)
initialization. Depths are `make_divisible(d * depth_multiplier, 8)` (at least `min_depth`);
with `finegrain_classification_mode` (set for mobilenet_v2_035, as in slim's nets_factory) the
last conv keeps 1280 channels when the multiplier is below 1.

End points as slim's mobilenet_base collects them: layer_1 ... layer_19, then for each block
layer_N/expansion_output (when it expands), layer_N/depthwise_output, layer_N/output, then
global_pool, Logits, Predictions. Inception preprocessing; the published checkpoints
(mobilenet_v2_{1.0,1.4,0.35}_224) have 1001 classes.
"""

from __future__ import annotations

from typing import Optional

from .layers import batch_norm_factory
from .mobilenet_common import ConvOp, ExpandedConvOp, MobileNet, expand_input_by_factor
from .registry import register_model

#: slim's V2_DEF spec: (op, stride, num_outputs) before the depth multiplier.
V2_OPS: tuple = (
    ConvOp(32, kernel_size=3, stride=2),
    ExpandedConvOp(16, expansion=expand_input_by_factor(1, divisible_by=1)),
    ExpandedConvOp(24, stride=2),
    ExpandedConvOp(24),
    ExpandedConvOp(32, stride=2),
    ExpandedConvOp(32),
    ExpandedConvOp(32),
    ExpandedConvOp(64, stride=2),
    ExpandedConvOp(64),
    ExpandedConvOp(64),
    ExpandedConvOp(64),
    ExpandedConvOp(96),
    ExpandedConvOp(96),
    ExpandedConvOp(96),
    ExpandedConvOp(160, stride=2),
    ExpandedConvOp(160),
    ExpandedConvOp(160),
    ExpandedConvOp(320),
    ConvOp(1280, kernel_size=1),
)

# training_scope's batch norm: decay 0.997, slim's default epsilon; V2_DEF turns scale on.
BATCH_NORM_DECAY = 0.997
BATCH_NORM_EPSILON = 0.001


def v2_ops(depth_multiplier: float, finegrain_classification_mode: bool) -> tuple:
    """V2_DEF, with the last layer pre-divided by the multiplier in finegrain mode (slim's trick,
    so that the multiplier then restores it to 1280)."""
    if not (finegrain_classification_mode and depth_multiplier < 1):
        return V2_OPS
    last = V2_OPS[-1]
    return V2_OPS[:-1] + (ConvOp(last.num_outputs / depth_multiplier, kernel_size=last.kernel_size),)


class MobileNetV2(MobileNet):
    """slim's mobilenet_v2.mobilenet under the scope 'MobilenetV2'.

    Keyword arguments are slim's: depth_multiplier, finegrain_classification_mode, min_depth (8),
    divisible_by (8), output_stride (None, 1 or even: atrous beyond it), use_explicit_padding
    (symmetric pre-padding + VALID instead of TF's 'SAME'), dropout_keep_prob (training_scope's 0.8).
    """

    scope = "MobilenetV2"
    classifier_scope = "MobilenetV2/Logits/Conv2d_1c_1x1"

    def __init__(self, num_classes: int = 1001, depth_multiplier: float = 1.0,
                 finegrain_classification_mode: bool = False, min_depth: Optional[int] = None,
                 divisible_by: Optional[int] = None, output_stride: Optional[int] = None,
                 use_explicit_padding: bool = False, dropout_keep_prob: float = 0.8,
                 in_channels: int = 3) -> None:
        norm = batch_norm_factory(eps=BATCH_NORM_EPSILON, decay=BATCH_NORM_DECAY, scale=True)
        super().__init__(num_classes, v2_ops(float(depth_multiplier), finegrain_classification_mode),
                         "MobilenetV2", depth_multiplier=depth_multiplier,
                         min_depth=8 if min_depth is None else int(min_depth),
                         divisible_by=8 if divisible_by is None else int(divisible_by),
                         output_stride=output_stride, use_explicit_padding=use_explicit_padding,
                         dropout_keep_prob=dropout_keep_prob, norm=norm, in_channels=in_channels)
        self.finegrain_classification_mode = bool(finegrain_classification_mode)


_PUBLISHED = "mobilenet_v2_{}_224.tgz"
_HEADS = ("MobilenetV2/Logits",)


@register_model(default_image_size=224, preprocessing="inception", checkpoint_num_classes=1001,
                scope="MobilenetV2", classifier_scopes=_HEADS, first_conv="MobilenetV2/Conv",
                published_checkpoint=_PUBLISHED.format("1.0"))
def mobilenet_v2(num_classes: int = 1001, **kwargs) -> MobileNetV2:
    """MobileNet v2, depth multiplier 1.0 (slim nets/mobilenet/mobilenet_v2.py, scope 'MobilenetV2')."""
    return MobileNetV2(num_classes, **kwargs)


@register_model(default_image_size=224, preprocessing="inception", checkpoint_num_classes=1001,
                scope="MobilenetV2", classifier_scopes=_HEADS, first_conv="MobilenetV2/Conv",
                published_checkpoint=_PUBLISHED.format("1.4"), depth_multiplier=1.4)
def mobilenet_v2_140(num_classes: int = 1001, **kwargs) -> MobileNetV2:
    """MobileNet v2, depth multiplier 1.4 (slim's mobilenet_v2_140)."""
    return MobileNetV2(num_classes, **kwargs)


@register_model(default_image_size=224, preprocessing="inception", checkpoint_num_classes=1001,
                scope="MobilenetV2", classifier_scopes=_HEADS, first_conv="MobilenetV2/Conv",
                published_checkpoint=_PUBLISHED.format("0.35"), depth_multiplier=0.35,
                finegrain_classification_mode=True)
def mobilenet_v2_035(num_classes: int = 1001, **kwargs) -> MobileNetV2:
    """MobileNet v2, depth multiplier 0.35 with a full 1280-wide last layer (slim's mobilenet_v2_035)."""
    return MobileNetV2(num_classes, **kwargs)
