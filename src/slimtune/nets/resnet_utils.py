"""What ResNet v1 and v2 share, as slim's nets/resnet_utils.py lays it out.

- block descriptions (`BlockSpec`: units of (depth, depth_bottleneck, stride), the stride on the
  LAST unit of each block, as slim does it);
- `plan_blocks`: slim's `stack_blocks_dense` stride/rate bookkeeping done once at construction
  (output_stride via atrous rates, store_non_strided_activations), so forward does no arithmetic;
- `conv2d_same` and `subsample`;
- `ResNet`: the trunk both versions run (root conv + pool1, blocks, optional postnorm, global
  pool, 1x1-conv logits, squeeze, softmax) with slim's end-point names. The versions differ only in
  their bottleneck unit, their root conv and v2's `postnorm`, which the subclasses supply.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .base import SlimNet, pooled_features
from .layers import (Activation, Conv2d, MaxPool2d, NormFactory, batch_norm_factory, reduce_mean_hw,
                     variance_scaling_)

# resnet_arg_scope's batch-norm settings (they suit the released checkpoints).
BATCH_NORM_DECAY = 0.997
BATCH_NORM_EPSILON = 1e-5


def resnet_batch_norm() -> NormFactory:
    """slim.batch_norm as resnet_arg_scope configures it (decay 0.997, epsilon 1e-5, with gamma)."""
    return batch_norm_factory(eps=BATCH_NORM_EPSILON, decay=BATCH_NORM_DECAY, scale=True)


@dataclass(frozen=True)
class UnitSpec:
    """One bottleneck unit's arguments, as in slim's Block.args entries."""

    depth: int
    depth_bottleneck: int
    stride: int


@dataclass(frozen=True)
class BlockSpec:
    """slim's resnet_utils.Block without the unit function: a scope name and its units."""

    scope: str
    units: tuple[UnitSpec, ...]


def bottleneck_block(scope: str, base_depth: int, num_units: int, stride: int) -> BlockSpec:
    """slim's resnet_v{1,2}_block: `num_units` bottlenecks of width 4*base_depth, stride on the last."""
    inner = UnitSpec(base_depth * 4, base_depth, 1)
    last = UnitSpec(base_depth * 4, base_depth, stride)
    return BlockSpec(scope, (inner,) * (num_units - 1) + (last,))


# Bottleneck units per block of slim's ResNet-50/101/152/200 (the same for v1 and v2).
UNITS_PER_BLOCK = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}


def standard_blocks(units_per_block: Sequence[int], depth: Callable[[int], int] = int) -> list[BlockSpec]:
    """The four blocks of every slim ResNet (base depths 64/128/256/512, strides 2/2/2/1)."""
    base_depths, strides = (64, 128, 256, 512), (2, 2, 2, 1)
    return [bottleneck_block(f"block{i + 1}", depth(base), units, stride)
            for i, (base, units, stride) in enumerate(zip(base_depths, units_per_block, strides))]


@dataclass(frozen=True)
class PlannedUnit:
    """A unit with the stride and atrous rate stack_blocks_dense would call it with."""

    depth: int
    depth_bottleneck: int
    stride: int
    rate: int


@dataclass(frozen=True)
class PlannedBlock:
    """A block's planned units and the subsampling slim applies after its end point."""

    scope: str
    units: tuple[PlannedUnit, ...]
    subsample: int


def plan_blocks(blocks: Sequence[BlockSpec], output_stride: Optional[int] = None,
                store_non_strided_activations: bool = False) -> list[PlannedBlock]:
    """Replay slim's stack_blocks_dense: once the target stride is reached, strides become rates.

    `output_stride` is relative to the blocks' input (the caller divides out the root block's 4).
    """
    current_stride, rate = 1, 1
    planned: list[PlannedBlock] = []

    def check() -> None:
        if output_stride is not None and current_stride > output_stride:
            raise ConfigError(f"output_stride={output_stride} cannot be reached by this ResNet; "
                              "use 8, 16 or 32 (or None)")

    for block in blocks:
        units: list[PlannedUnit] = []
        block_stride = 1
        for index, unit in enumerate(block.units):
            stride = unit.stride
            if store_non_strided_activations and index == len(block.units) - 1:
                # The last unit's stride moves to a subsampling after the block's end point.
                block_stride, stride = stride, 1
            if output_stride is not None and current_stride == output_stride:
                units.append(PlannedUnit(unit.depth, unit.depth_bottleneck, 1, rate))
                rate *= stride
            else:
                units.append(PlannedUnit(unit.depth, unit.depth_bottleneck, stride, 1))
                current_stride *= stride
                check()
        if output_stride is not None and current_stride == output_stride:
            rate *= block_stride
            subsample_factor = 1
        else:
            subsample_factor = block_stride
            current_stride *= block_stride
            check()
        planned.append(PlannedBlock(block.scope, tuple(units), subsample_factor))
    if output_stride is not None and current_stride != output_stride:
        raise ConfigError(f"output_stride={output_stride} cannot be reached by this ResNet; "
                          "use 8, 16 or 32 (or None)")
    return planned


def conv2d_same(in_channels: int, out_channels: int, kernel_size: int, stride: int, rate: int = 1,
                normalizer: NormFactory = None, activation: Activation = None) -> Conv2d:
    """slim's resnet_utils.conv2d_same: 'SAME' at stride 1, else symmetric explicit padding + VALID."""
    padding = "SAME" if stride == 1 else "EXPLICIT"
    return Conv2d(in_channels, out_channels, kernel_size, stride, padding=padding, rate=rate,
                  normalizer=normalizer, activation=activation)


def pointwise_conv(in_channels: int, out_channels: int, stride: int = 1, normalizer: NormFactory = None,
                   activation: Activation = None) -> Conv2d:
    """A 1x1 slim.conv2d. TF's 'SAME' never pads a 1x1 kernel, so 'VALID' is identical and skips
    the per-call padding arithmetic that a strided 'SAME' conv needs."""
    return Conv2d(in_channels, out_channels, 1, stride, padding="VALID", normalizer=normalizer,
                  activation=activation)


def subsample(x: Tensor, factor: int) -> Tensor:
    """slim's resnet_utils.subsample: a 1x1 max-pool with stride `factor` is plain strided slicing."""
    return x if factor == 1 else x[:, :, ::factor, ::factor]


class Block(nn.Module):
    """A slim block scope ('block1' ...) holding units 'unit_1' ... and its trailing subsampling."""

    def __init__(self, units: Sequence[nn.Module], subsample_factor: int, end_point: str) -> None:
        super().__init__()
        for index, unit in enumerate(units):
            self.add_module(f"unit_{index + 1}", unit)
        self.subsample_factor = subsample_factor
        self.end_point = end_point

    def forward(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """Run the units, record the block's end point, then subsample (slim's order)."""
        for unit in self.children():
            x = unit(x, end_points)
        end_points[self.end_point] = x
        return subsample(x, self.subsample_factor)


class Unit(nn.Module):
    """slim's 'unit_N' scope: a thin holder whose one child is the bottleneck ('bottleneck_v1'/'_v2')."""

    def __init__(self, bottleneck_name: str, bottleneck: nn.Module) -> None:
        super().__init__()
        self.bottleneck_name = bottleneck_name
        self.add_module(bottleneck_name, bottleneck)

    def forward(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """Run the bottleneck."""
        return self._modules[self.bottleneck_name](x, end_points)


def _init_like_resnet_arg_scope(model: nn.Module) -> None:
    """resnet_arg_scope's initializers: He (variance scaling, fan-in) conv kernels, zero biases;
    BatchNorm starts at gamma 1, beta 0, moving mean 0, moving variance 1 (its constructor's values)."""
    for module in model.modules():
        # Meta tensors hold no values; skipping them keeps shape-only builds (device='meta') instant.
        if isinstance(module, Conv2d) and not module.weight.is_meta:
            variance_scaling_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class ResNet(SlimNet):
    """The trunk slim's resnet_v1() and resnet_v2() share; subclasses give the version's pieces.

    Subclasses set `bottleneck_name` ('bottleneck_v1'/'bottleneck_v2') and implement
    `_make_bottleneck`, `_make_root_conv` and `_make_postnorm` (None for v1).
    """

    bottleneck_name = ""

    def __init__(self, num_classes: int, blocks: Sequence[BlockSpec], scope: str, global_pool: bool = True,
                 output_stride: Optional[int] = None, spatial_squeeze: bool = True,
                 include_root_block: bool = True, store_non_strided_activations: bool = False,
                 in_channels: int = 3) -> None:
        super().__init__(num_classes)
        self.scope = scope
        self.classifier_scope = f"{scope}/logits"
        self.classifier_scopes = (self.classifier_scope,)
        self.global_pool = global_pool
        self.spatial_squeeze = spatial_squeeze
        self.include_root_block = include_root_block
        self.output_stride = output_stride
        blocks_output_stride = output_stride
        if include_root_block and output_stride is not None:
            if output_stride % 4 != 0:
                raise ConfigError(f"output_stride={output_stride}: it must be a multiple of 4 (8, 16 or 32)")
            blocks_output_stride = output_stride // 4
        try:
            plan = plan_blocks(blocks, blocks_output_stride, store_non_strided_activations)
        except ConfigError:  # re-raised with the stride the user asked for, not the blocks' share of it
            raise ConfigError(f"output_stride={output_stride} cannot be reached by {scope}; "
                              "use 8, 16 or 32 (or None)") from None
        norm = resnet_batch_norm()

        body = nn.Module()
        channels = in_channels
        if include_root_block:
            body.conv1 = self._make_root_conv(in_channels, norm)
            body.pool1 = MaxPool2d(3, 2, padding="SAME")  # resnet_arg_scope sets max_pool2d to 'SAME'
            channels = 64
        self._block_names: list[str] = []
        for planned in plan:
            units = []
            for index, unit in enumerate(planned.units):
                name = f"{scope}/{planned.scope}/unit_{index + 1}/{self.bottleneck_name}"
                units.append(Unit(self.bottleneck_name, self._make_bottleneck(channels, unit, norm, name)))
                channels = unit.depth
            block = Block(units, planned.subsample, f"{scope}/{planned.scope}")
            body.add_module(planned.scope, block)
            self._block_names.append(planned.scope)
        self.num_features = channels
        postnorm = self._make_postnorm(channels, norm)
        if postnorm is not None:
            body.postnorm = postnorm
        self.add_module(scope, body)
        _init_like_resnet_arg_scope(self)
        # Built after the body's init: the same draws, in the same order, as one pass over all layers.
        self._build_classifier(num_classes)
        self._end_point_root = f"{scope}/conv1"
        self._end_point_logits = f"{scope}/logits"
        self._end_point_squeeze = f"{scope}/spatial_squeeze"

    # Version-specific pieces -------------------------------------------------------------
    def _make_root_conv(self, in_channels: int, norm: NormFactory) -> Conv2d:
        raise NotImplementedError

    def _make_bottleneck(self, in_channels: int, unit: PlannedUnit, norm: NormFactory, name: str) -> nn.Module:
        raise NotImplementedError

    def _make_postnorm(self, channels: int, norm: NormFactory) -> Optional[nn.Module]:
        return None

    # Shared forward (the two hooks of the model contract) -------------------------------------
    def _build_classifier(self, num_classes: int) -> None:
        """The 1x1 '<scope>/logits' conv with resnet_arg_scope's init (none when headless)."""
        body = self._modules[self.scope]
        if num_classes:
            body.logits = pointwise_conv(self.num_features, num_classes)
            _init_like_resnet_arg_scope(body.logits)
        elif "logits" in body._modules:
            del body._modules["logits"]

    def _forward_features(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """Root block, the four blocks and (v2) postnorm: the feature map before pooling."""
        body = self._modules[self.scope]
        if self.include_root_block:
            net = end_points[self._end_point_root] = body.conv1(x)
            net = body.pool1(net)
        else:
            net = x
        for name in self._block_names:
            net = body._modules[name](net, end_points)
        if "postnorm" in body._modules:
            # v2's postnorm is BN + ReLU; slim records no end point for it.
            net = torch.relu_(body.postnorm(net))
        return net

    def _forward_head(self, features: Tensor, end_points: "OrderedDict[str, Tensor]",
                      pre_logits: bool = False) -> Tensor:
        """global_pool, <scope>/logits, <scope>/spatial_squeeze, predictions. Headless or pre_logits:
        the pooled features [N, C]."""
        net = features
        if self.global_pool:
            net = end_points["global_pool"] = reduce_mean_hw(net)
        if not self.num_classes or pre_logits:
            return pooled_features(net)
        net = end_points[self._end_point_logits] = self._modules[self.scope].logits(net)
        if self.spatial_squeeze:
            if net.shape[2] != 1 or net.shape[3] != 1:
                raise ConfigError(f"{self.scope}: spatial_squeeze needs 1x1 logits but they are "
                                  f"{net.shape[2]}x{net.shape[3]}; pass global_pool=True or spatial_squeeze=False")
            net = end_points[self._end_point_squeeze] = net.flatten(1)
        # slim.softmax normalizes the last (channel) axis; channels are axis 1 here.
        end_points["predictions"] = torch.softmax(net, dim=1)
        return net
