"""ResNet v2 as research/slim builds it (nets/resnet_v2.py): pre-activation bottlenecks.

resnet_v2_{50,101,152,200}: a plain 7x7/2 conv (bias, no BN, no ReLU) + 3x3/2 max-pool root,
four blocks of bottleneck_v2 units (stride on the LAST unit of blocks 1-3, as in v1), a final
`postnorm` BN + ReLU, global average pool and a 1x1-conv classifier.

Preprocessing: slim's preprocessing_factory maps resnet_v2 to 'vgg', but the published
checkpoints (resnet_v2_{50,101,152}_2017_04_14, 1001 classes) were trained with Inception
preprocessing at 299x299, so they are registered with 'inception' and default_image_size=299.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .layers import NormFactory
from .registry import register_model
from .resnet_utils import (UNITS_PER_BLOCK, PlannedUnit, ResNet, conv2d_same, pointwise_conv, standard_blocks,
                           subsample)


class BottleneckV2(nn.Module):
    """slim's resnet_v2.bottleneck: preact = relu(BN(x)); conv1 1x1 (BN, ReLU) -> conv2 3x3
    (conv2d_same, BN, ReLU) -> conv3 1x1 (bias, linear), added to the shortcut: a biased 1x1 conv
    of preact when the depth changes, else the subsampled *input* (not preact). No ReLU after."""

    def __init__(self, in_channels: int, unit: PlannedUnit, norm: NormFactory, name: str) -> None:
        super().__init__()
        depth, bottleneck = unit.depth, unit.depth_bottleneck
        self.stride = unit.stride
        self.preact = norm(in_channels)
        self.shortcut = pointwise_conv(in_channels, depth, unit.stride) if depth != in_channels else None
        # ReLUs run in place on fresh BN outputs: batch norm's backward needs its input, not its output.
        self.conv1 = pointwise_conv(in_channels, bottleneck, 1, norm, activation=torch.relu_)
        self.conv2 = conv2d_same(bottleneck, bottleneck, 3, unit.stride, unit.rate, norm, activation=torch.relu_)
        self.conv3 = pointwise_conv(bottleneck, depth, 1)
        self.end_point = name
        self._names = (f"{name}/shortcut", f"{name}/conv1", f"{name}/conv2", f"{name}/conv3")

    def forward(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """shortcut + residual, recording slim's end points in slim's order (preact has none)."""
        shortcut_name, conv1_name, conv2_name, conv3_name = self._names
        preact = torch.relu_(self.preact(x))
        if self.shortcut is None:
            shortcut = subsample(x, self.stride)
        else:
            shortcut = end_points[shortcut_name] = self.shortcut(preact)
        residual = end_points[conv1_name] = self.conv1(preact)
        residual = end_points[conv2_name] = self.conv2(residual)
        residual = end_points[conv3_name] = self.conv3(residual)
        output = end_points[self.end_point] = shortcut + residual
        return output


class ResNetV2(ResNet):
    """slim's resnet_v2(): linear root conv, bottleneck_v2 units, then postnorm (BN + ReLU).

    Keyword arguments are slim's: global_pool, output_stride (8, 16, 32: atrous beyond it),
    spatial_squeeze, and include_root_block (slim's resnet_v2() argument; without it the input
    feeds block1 directly and should be the output of an activation-less convolution).
    """

    bottleneck_name = "bottleneck_v2"

    def __init__(self, num_classes: int, units_per_block: Sequence[int], scope: str, global_pool: bool = True,
                 output_stride: Optional[int] = None, spatial_squeeze: bool = True,
                 include_root_block: bool = True, in_channels: int = 3) -> None:
        super().__init__(num_classes, standard_blocks(units_per_block), scope, global_pool=global_pool,
                         output_stride=output_stride, spatial_squeeze=spatial_squeeze,
                         include_root_block=include_root_block, in_channels=in_channels)

    def _make_root_conv(self, in_channels: int, norm: NormFactory) -> nn.Module:
        return conv2d_same(in_channels, 64, 7, 2)  # resnet_v2 turns BN and ReLU off for conv1

    def _make_bottleneck(self, in_channels: int, unit: PlannedUnit, norm: NormFactory, name: str) -> nn.Module:
        return BottleneckV2(in_channels, unit, norm, name)

    def _make_postnorm(self, channels: int, norm: NormFactory) -> Optional[nn.Module]:
        return norm(channels)


def _register_v2(depth: int, published: Optional[str]) -> Callable[..., ResNetV2]:
    """Register resnet_v2_<depth> with its slim metadata (inception preprocessing at 299, see above)."""
    scope = f"resnet_v2_{depth}"
    units = UNITS_PER_BLOCK[depth]

    def build(num_classes: int = 1001, **kwargs) -> ResNetV2:
        return ResNetV2(num_classes, units, scope, **kwargs)

    build.__name__ = build.__qualname__ = scope
    build.__doc__ = (f"ResNet-{depth} v2 (slim nets/resnet_v2.py, scope '{scope}'); Inception preprocessing "
                     "at 299 (not slim's factory's 'vgg'), 1001-class checkpoints.")
    return register_model(scope, default_image_size=299, preprocessing="inception", checkpoint_num_classes=1001,
                          scope=scope, published_checkpoint=published,
                          classifier_scopes=(f"{scope}/logits",), first_conv=f"{scope}/conv1")(build)


resnet_v2_50 = _register_v2(50, "resnet_v2_50_2017_04_14.tar.gz")
resnet_v2_101 = _register_v2(101, "resnet_v2_101_2017_04_14.tar.gz")
resnet_v2_152 = _register_v2(152, "resnet_v2_152_2017_04_14.tar.gz")
resnet_v2_200 = _register_v2(200, None)  # listed as "TBA" in slim's README, never released
