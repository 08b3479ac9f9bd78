"""ResNet v1 as research/slim builds it (nets/resnet_v1.py): post-activation bottlenecks.

resnet_v1_{50,101,152,200}: a 7x7/2 conv + 3x3/2 max-pool root, four blocks of bottleneck_v1
units (stride on the LAST unit of blocks 1-3), global average pool and a 1x1-conv classifier.
The published checkpoints (resnet_v1_{50,101,152}_2016_08_28, converted from Caffe) have 1000
classes and expect VGG preprocessing at 224.
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


class BottleneckV1(nn.Module):
    """slim's resnet_v1.bottleneck: conv1 1x1 -> conv2 3x3 (conv2d_same) -> conv3 1x1, each with BN,
    added to the shortcut (a BN'd 1x1 conv when the depth changes, else a subsampled identity), ReLU."""

    def __init__(self, in_channels: int, unit: PlannedUnit, norm: NormFactory, name: str) -> None:
        super().__init__()
        depth, bottleneck = unit.depth, unit.depth_bottleneck
        self.stride = unit.stride
        self.shortcut = (pointwise_conv(in_channels, depth, unit.stride, norm, activation=None)
                         if depth != in_channels else None)
        # ReLUs run in place on fresh BN outputs: batch norm's backward needs its input, not its output.
        self.conv1 = pointwise_conv(in_channels, bottleneck, 1, norm, activation=torch.relu_)
        self.conv2 = conv2d_same(bottleneck, bottleneck, 3, unit.stride, unit.rate, norm, activation=torch.relu_)
        self.conv3 = pointwise_conv(bottleneck, depth, 1, norm, activation=None)
        self.end_point = name
        self._names = (f"{name}/shortcut", f"{name}/conv1", f"{name}/conv2", f"{name}/conv3")

    def forward(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """relu(shortcut + residual), recording slim's end points in slim's order."""
        shortcut_name, conv1_name, conv2_name, conv3_name = self._names
        if self.shortcut is None:
            shortcut = subsample(x, self.stride)
        else:
            shortcut = end_points[shortcut_name] = self.shortcut(x)
        residual = end_points[conv1_name] = self.conv1(x)
        residual = end_points[conv2_name] = self.conv2(residual)
        residual = end_points[conv3_name] = self.conv3(residual)
        # The sum is a fresh tensor (conv3 stays an intact end point), so its ReLU can be in place.
        output = end_points[self.end_point] = torch.relu_(shortcut + residual)
        return output


class ResNetV1(ResNet):
    """slim's resnet_v1(): BN + ReLU root conv, bottleneck_v1 units, no final norm.

    Keyword arguments are slim's: global_pool, output_stride (8, 16, 32: atrous beyond it),
    spatial_squeeze, store_non_strided_activations, min_base_depth, depth_multiplier, and
    include_root_block (slim's resnet_v1() argument; without it the input feeds block1 directly).
    """

    bottleneck_name = "bottleneck_v1"

    def __init__(self, num_classes: int, units_per_block: Sequence[int], scope: str, global_pool: bool = True,
                 output_stride: Optional[int] = None, spatial_squeeze: bool = True,
                 store_non_strided_activations: bool = False, min_base_depth: int = 8,
                 depth_multiplier: float = 1.0, include_root_block: bool = True, in_channels: int = 3) -> None:
        def depth(base: int) -> int:
            return max(int(base * depth_multiplier), min_base_depth)

        super().__init__(num_classes, standard_blocks(units_per_block, depth), scope, global_pool=global_pool,
                         output_stride=output_stride, spatial_squeeze=spatial_squeeze,
                         include_root_block=include_root_block,
                         store_non_strided_activations=store_non_strided_activations, in_channels=in_channels)

    def _make_root_conv(self, in_channels: int, norm: NormFactory) -> nn.Module:
        return conv2d_same(in_channels, 64, 7, 2, normalizer=norm, activation=torch.relu_)

    def _make_bottleneck(self, in_channels: int, unit: PlannedUnit, norm: NormFactory, name: str) -> nn.Module:
        return BottleneckV1(in_channels, unit, norm, name)


def _register_v1(depth: int, published: Optional[str]) -> Callable[..., ResNetV1]:
    """Register resnet_v1_<depth> with its slim metadata."""
    scope = f"resnet_v1_{depth}"
    units = UNITS_PER_BLOCK[depth]

    def build(num_classes: int = 1000, **kwargs) -> ResNetV1:
        return ResNetV1(num_classes, units, scope, **kwargs)

    build.__name__ = build.__qualname__ = scope
    build.__doc__ = (f"ResNet-{depth} v1 (slim nets/resnet_v1.py, scope '{scope}'); "
                     "VGG preprocessing at 224, 1000-class checkpoints.")
    return register_model(scope, default_image_size=224, preprocessing="vgg", checkpoint_num_classes=1000,
                          scope=scope, published_checkpoint=published,
                          classifier_scopes=(f"{scope}/logits",), first_conv=f"{scope}/conv1")(build)


resnet_v1_50 = _register_v1(50, "resnet_v1_50_2016_08_28.tar.gz")
resnet_v1_101 = _register_v1(101, "resnet_v1_101_2016_08_28.tar.gz")
resnet_v1_152 = _register_v1(152, "resnet_v1_152_2016_08_28.tar.gz")
resnet_v1_200 = _register_v1(200, None)  # slim never released ResNet-200 weights
