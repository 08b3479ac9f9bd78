"""The MobileNet machinery research/slim keeps in nets/mobilenet/{mobilenet,conv_blocks}.py.

- depth arithmetic: `make_divisible` (slim's `_make_divisible`), the per-op depth multiplier
  (`scaled_depth`) and `expand_input_by_factor`;
- `relu6_`, the in-place ReLU6 every MobileNet uses;
- `ExpandedConv`: slim's `conv_blocks.expanded_conv`, the inverted-residual block (1x1 expand ->
  depthwise -> linear 1x1 project, residual when stride 1 and depths match), recording slim's
  `expansion_output` / `depthwise_output` / `output` end points. Its activations and the
  `expansion_transform` hook (a module run on the depthwise output, where MobileNet v3 puts
  squeeze-excite) are arguments, so v3 and EdgeTPU nets reuse it as slim does;
- `ConvOp` / `ExpandedConvOp` + `build_trunk`: slim's `op(...)` spec list and `mobilenet_base`:
  slim's automatic scope names (Conv, Conv_1, expanded_conv, expanded_conv_1, ...), depth
  multiplier, output_stride (strides become atrous rates) and use_explicit_padding, all resolved
  once at construction;
- `MobileNet`: slim's `mobilenet.mobilenet` classifier around such a trunk (global average pool,
  dropout, `Logits/Conv2d_1c_1x1`, squeeze, softmax) with slim's end-point names and order.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .base import SlimNet, pooled_features
from .batch_norm_act import RELU6, register_activation
from .depthwise_grad import depthwise_conv2d
from .layers import (Activation, BatchNorm, Conv2d, DepthwiseConv2d, NormFactory, check_keep_prob,
                     dropout_module, reduce_mean_hw, truncated_normal_)


class _ReLU6InPlace(torch.autograd.Function):
    """ReLU6 that clamps in place and keeps only its output for backward.

    torch's own in-place hardtanh_/clamp_ save a copy of their input for backward (a full
    clone per layer); the clamped output carries the same information: the gradient passes
    where 0 < output < 6, exactly where it passes for the input (TF's Relu6Grad rule)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.mark_dirty(x)
        out = x.clamp_(0.0, 6.0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, out, 0.0, 6.0)


def relu6_(x: Tensor) -> Tensor:
    """tf.nn.relu6 in place; for fresh BatchNorm or convolution outputs (neither needs its output
    for backward)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _ReLU6InPlace.apply(x)
    return x.clamp_(0.0, 6.0)


register_activation(relu6_, RELU6)


def make_divisible(value: float, divisor: int, min_value: Optional[int] = None) -> int:
    """slim's `_make_divisible`: round to the nearest multiple of divisor, never below min_value
    nor more than 10% below value."""
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return int(rounded)


def scaled_depth(num_outputs: float, multiplier: float, divisible_by: int = 8, min_depth: int = 8) -> int:
    """slim mobilenet's `depth_multiplier` op transform: make_divisible(d * multiplier)."""
    return make_divisible(num_outputs * multiplier, divisible_by, min_depth)


def expand_input_by_factor(factor: float, divisible_by: int = 8) -> Callable[[int], int]:
    """slim's `expand_input_by_factor`: the expanded width as a function of the block's input depth."""
    def expansion(num_inputs: int) -> int:
        return make_divisible(num_inputs * factor, divisible_by)
    expansion.factor = factor  # type: ignore[attr-defined]  # shown by repr of the op spec
    return expansion


def check_depth_multiplier(name: str, depth_multiplier: float) -> float:
    """slim raises ValueError for a non-positive multiplier; here it is a ConfigError."""
    if not float(depth_multiplier) > 0:
        raise ConfigError(f"{name}: depth_multiplier must be greater than zero, got {depth_multiplier}")
    return float(depth_multiplier)


def init_truncated_normal(model: nn.Module, stddev: float) -> None:
    """The MobileNet arg scopes' initializers: truncated normal kernels (depthwise included), zero
    biases; BatchNorm keeps gamma 1, beta 0, moving mean 0, moving variance 1."""
    for module in model.modules():
        if isinstance(module, Conv2d):
            truncated_normal_(getattr(module, module.kernel_name), stddev)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


# -------------------------------------------------------------------------------------------------
# slim.separable_conv2d with num_outputs (Inception v2's Conv2d_1a_7x7, NASNet's separable convs).

class SeparableConv2d(Conv2d):
    """slim.separable_conv2d(num_outputs=N): a depthwise conv (channel multiplier
    `depth_multiplier`) and a 1x1 pointwise conv in ONE scope, as slim stores them
    (`depthwise_weights` [k, k, C, M] -> `depthwise_weight` [C*M, 1, k, k], `pointwise_weights`
    -> `pointwise_weight` [N, C*M, 1, 1]); bias or BatchNorm and the activation follow the
    pointwise conv only. MobileNets call slim.separable_conv2d with num_outputs=None instead:
    that is `layers.DepthwiseConv2d`.
    """

    kernel_name = "depthwise_weight"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: str = "SAME", rate: int = 1, depth_multiplier: int = 1, normalizer: NormFactory = None,
                 activation: Activation = F.relu, bias: Optional[bool] = None) -> None:
        inner = in_channels * depth_multiplier
        super().__init__(in_channels, inner, kernel_size, stride, padding, rate, normalizer=None,
                         activation=activation, bias=False, groups=in_channels)
        self.out_channels = out_channels
        self.pointwise_weight = nn.Parameter(torch.empty(out_channels, inner, 1, 1))
        nn.init.kaiming_normal_(self.pointwise_weight, mode="fan_in", nonlinearity="relu")
        use_bias = normalizer is None if bias is None else bias
        self.bias = nn.Parameter(torch.zeros(out_channels)) if use_bias else None
        self.BatchNorm = normalizer(out_channels) if normalizer is not None else None

    def forward(self, x: Tensor) -> Tensor:
        """Depthwise (TF padding, stride, rate), pointwise 1x1, normalize, activate."""
        x, padding = self._pad(x)
        if self.groups == self.in_channels == self.depthwise_weight.shape[0]:
            x = depthwise_conv2d(x, self.depthwise_weight, self.stride, padding, self.rate)
        else:  # a channel multiplier above 1
            x = F.conv2d(x, self.depthwise_weight, None, self.stride, padding, self.rate, self.groups)
        pointwise, bias = self.pointwise_weight, self.bias
        fold = self._folds_batch_norm()
        if fold:
            pointwise, bias = self._folded(pointwise, bias)
        x = F.conv2d(x, pointwise, bias)
        if self.BatchNorm is not None and not fold:
            if isinstance(self.BatchNorm, BatchNorm):
                return self.BatchNorm.normalize_and_activate(x, self.activation)
            x = self.BatchNorm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


# -------------------------------------------------------------------------------------------------
# The inverted-residual block.

class ExpandedConv(nn.Module):
    """slim's conv_blocks.expanded_conv (depthwise_location='expansion', no split convs).

    Children named as slim's scopes: `expand` (1x1, BN, inner activation; absent when the
    expansion is not wider than the input, as in slim), `depthwise` (kxk, BN, depthwise
    activation), optional `expansion_transform` output (e.g. squeeze-excite, with its own scope
    name), `project` (1x1, BN, project activation, linear by default). The residual is added when
    `residual` and the (actual, after output_stride) stride is 1 and the depths match.
    """

    def __init__(self, in_channels: int, out_channels: int, expansion_size: int, kernel_size: int = 3,
                 stride: int = 1, rate: int = 1, residual: bool = True, norm: NormFactory = None,
                 inner_activation: Activation = relu6_, depthwise_activation: Activation = relu6_,
                 project_activation: Activation = None,
                 expansion_transform: Optional[tuple[str, nn.Module]] = None, padding: str = "SAME",
                 depthwise_channel_multiplier: int = 1, end_point_prefix: str = "",
                 depthwise_location: Optional[str] = "expansion", expansion_kernel_size: int = 1,
                 expansion_stride: int = 1) -> None:
        super().__init__()
        if depthwise_location not in ("expansion", None):
            raise ConfigError(f"expanded_conv: depthwise_location={depthwise_location!r} is not supported "
                              "(slimtune builds 'expansion' and None)")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.expand = None
        inner = in_channels
        if expansion_size > in_channels:
            # expansion_kernel_size/stride > 1: the EdgeTPU's fused block (slim's expansion_fn =
            # conv2d(kernel_size=k, stride=s)), which strides in the expansion, not the depthwise.
            self.expand = Conv2d(in_channels, expansion_size, expansion_kernel_size, expansion_stride,
                                 padding="VALID" if expansion_kernel_size == 1 else padding, normalizer=norm,
                                 activation=inner_activation)
            inner = expansion_size
        self.depthwise = None
        if depthwise_location == "expansion":
            self.depthwise = DepthwiseConv2d(inner, kernel_size, stride, padding=padding, rate=rate,
                                             depth_multiplier=depthwise_channel_multiplier, normalizer=norm,
                                             activation=depthwise_activation)
            inner *= depthwise_channel_multiplier
        self._transform_name = None
        if expansion_transform is not None:
            self._transform_name, transform = expansion_transform
            self.add_module(self._transform_name, transform)
        self.project = Conv2d(inner, out_channels, 1, padding="VALID", normalizer=norm,
                              activation=project_activation)
        self.residual = bool(residual) and stride == 1 and in_channels == out_channels
        # project's output is fresh (a BN or conv output) and neither needs it for backward, so
        # the residual can be added in place -- unless an activation that saves its result ran.
        self._add_in_place = project_activation is None
        self.expansion_end_point = f"{end_point_prefix}expansion_output"
        self.depthwise_end_point = f"{end_point_prefix}depthwise_output"
        self.output_end_point = f"{end_point_prefix}output"

    def forward(self, x: Tensor, end_points: Optional["OrderedDict[str, Tensor]"] = None) -> Tensor:
        """Expand, depthwise, (transform), project, add the input; record slim's block end points."""
        net = x
        if self.expand is not None:
            net = self.expand(net)
            if end_points is not None:
                end_points[self.expansion_end_point] = net
        if self.depthwise is not None:
            net = self.depthwise(net)
            if end_points is not None:
                end_points[self.depthwise_end_point] = net
        if self._transform_name is not None:
            net = self._modules[self._transform_name](net)
        net = self.project(net)
        if self.residual:
            net = net.add_(x) if self._add_in_place else net + x
        if end_points is not None:
            end_points[self.output_end_point] = net
        return net

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, residual={self.residual}"


# -------------------------------------------------------------------------------------------------
# slim's op(...) spec list and mobilenet_base.

@dataclass(frozen=True)
class ConvOp:
    """op(slim.conv2d, ...): a conv + BN + activation layer; scope 'Conv', 'Conv_1', ..."""

    num_outputs: float
    kernel_size: int = 3
    stride: int = 1
    activation: Union[Activation, str] = "default"   # "default": the net's activation (relu6)
    normalizer: bool = True
    scale_depth: bool = True                          # False: slim's multiplier_func=None

    scope_base = "Conv"


@dataclass(frozen=True)
class ExpandedConvOp:
    """op(ops.expanded_conv, ...): an inverted-residual block; scope 'expanded_conv', ..._1, ..."""

    num_outputs: float
    stride: int = 1
    kernel_size: int = 3
    expansion: Callable[[int], int] = field(default_factory=lambda: expand_input_by_factor(6))
    residual: bool = True
    inner_activation: Union[Activation, str] = "default"
    depthwise_activation: Union[Activation, str] = "default"   # "default": same as inner
    project_activation: Activation = None
    #: Given the expanded width, returns (scope name, module) run after the depthwise conv.
    expansion_transform: Optional[Callable[[int], tuple[str, nn.Module]]] = None
    scale_depth: bool = True
    #: EdgeTPU's mbv3_fused: a kernel_size x kernel_size expansion conv with the block's own stride
    #: (kept even past output_stride, as slim's functools.partial keeps it) and no depthwise conv.
    fused: bool = False

    scope_base = "expanded_conv"


@dataclass(frozen=True)
class ReduceTo1x1Op:
    """MobileNet v3's op(reduce_to_1x1, default_size=7, stride=1, padding='VALID'): an average pool
    over the whole map when it is square, else a default_size window (stride 1, VALID)."""

    default_size: int = 7
    stride: int = 1
    kernel_size = None   # slim passes no kernel_size: an atrous rate would reach avg_pool2d

    scope_base = "AvgPool2D"


Op = Union[ConvOp, ExpandedConvOp, ReduceTo1x1Op]


class ReduceTo1x1(nn.Module):
    """slim mobilenet_v3's reduce_to_1x1: the map's static (height, width) picks the window --
    the whole map when square, else default_size x default_size (stride 1, VALID), which TF
    rejects for a non-square map with a side below default_size (here a ConfigError)."""

    def __init__(self, default_size: int = 7) -> None:
        super().__init__()
        self.default_size = int(default_size)

    def forward(self, x: Tensor) -> Tensor:
        """Average-pool to 1x1 (square maps) or by the default window."""
        height, width = x.shape[-2:]
        if height == width:
            return reduce_mean_hw(x)
        if min(height, width) < self.default_size:
            raise ConfigError(f"reduce_to_1x1: a non-square {height}x{width} feature map is pooled by slim's "
                              f"default {self.default_size}x{self.default_size} VALID window, which does not "
                              f"fit; use a square input or one whose last feature map is at least "
                              f"{self.default_size} on each side")
        return F.avg_pool2d(x, self.default_size, 1)

    def extra_repr(self) -> str:
        return f"default_size={self.default_size}"


@dataclass(frozen=True)
class TrunkLayer:
    """One built layer of the trunk: its slim scope, its end point ('layer_N') and the module."""

    scope: str
    end_point: str
    module: nn.Module
    records_end_points: bool


def check_output_stride(output_stride: Optional[int]) -> None:
    """slim's mobilenet_base accepts None, 1 or an even number."""
    if output_stride is not None and (output_stride <= 0 or (output_stride > 1 and output_stride % 2)):
        raise ConfigError(f"output_stride={output_stride}: it must be None, 1 or an even number (8, 16, 32)")


def build_trunk(ops: Sequence[Op], in_channels: int, multiplier: float, *, divisible_by: int = 8,
                min_depth: int = 8, output_stride: Optional[int] = None, use_explicit_padding: bool = False,
                norm: NormFactory = None, activation: Activation = relu6_) -> tuple[list[TrunkLayer], int]:
    """Replay slim's mobilenet_base over `ops`: scopes, depths, strides/rates, padding.

    Returns the layers and the trunk's output depth.
    """
    check_output_stride(output_stride)
    padding = "EXPLICIT" if use_explicit_padding else "SAME"
    current_stride, rate = 1, 1
    scope_counts: dict[str, int] = {}
    layers: list[TrunkLayer] = []
    channels = in_channels
    for index, op in enumerate(ops):
        if isinstance(op, ReduceTo1x1Op):
            depth = channels
        else:
            depth = (scaled_depth(op.num_outputs, multiplier, divisible_by, min_depth) if op.scale_depth
                     else int(op.num_outputs))
        if output_stride is not None and current_stride == output_stride:
            layer_stride, layer_rate = 1, rate
            rate *= op.stride
        else:
            layer_stride, layer_rate = op.stride, 1
            current_stride *= op.stride
        # slim applies the rate only to kernels larger than 1x1 (a 1x1 kernel does not care).
        layer_rate = layer_rate if op.kernel_size != 1 else 1
        count = scope_counts.get(op.scope_base, 0)
        scope_counts[op.scope_base] = count + 1
        scope = op.scope_base if count == 0 else f"{op.scope_base}_{count}"
        end_point = f"layer_{index + 1}"
        if isinstance(op, ReduceTo1x1Op):
            if layer_rate > 1:
                # slim hands the rate to slim.avg_pool2d, which has no such argument (TypeError).
                raise ConfigError(f"output_stride={output_stride}: slim's {op.scope_base} layer ({end_point}) "
                                  "would get an atrous rate, which slim.avg_pool2d cannot take; this net "
                                  "needs output_stride=None (or one it never reaches)")
            module = ReduceTo1x1(op.default_size)
            records = False
        elif isinstance(op, ConvOp):
            act = activation if op.activation == "default" else op.activation
            # A 1x1 kernel never pads: VALID is the same and skips per-call padding arithmetic.
            module: nn.Module = Conv2d(channels, depth, op.kernel_size, layer_stride,
                                       padding="VALID" if op.kernel_size == 1 else padding, rate=layer_rate,
                                       normalizer=norm if op.normalizer else None, activation=act)
            records = False
        else:
            inner_act = activation if op.inner_activation == "default" else op.inner_activation
            depthwise_act = inner_act if op.depthwise_activation == "default" else op.depthwise_activation
            expansion_size = op.expansion(channels)
            if (op.fused and layer_stride != op.stride and op.residual and depth == channels
                    and expansion_size > channels):
                # slim's fused conv keeps its stride past output_stride while the residual test
                # sees stride 1: TF then adds maps of different sizes and fails to build.
                raise ConfigError(f"output_stride={output_stride}: slim cannot build {scope} ({end_point}): its "
                                  f"fused conv keeps stride {op.stride} but the residual is still added; "
                                  "use a larger output_stride")
            width = expansion_size if expansion_size > channels else channels
            transform = op.expansion_transform(width) if op.expansion_transform is not None else None
            module = ExpandedConv(channels, depth, expansion_size, op.kernel_size, layer_stride, layer_rate,
                                  residual=op.residual, norm=norm, inner_activation=inner_act,
                                  depthwise_activation=depthwise_act, project_activation=op.project_activation,
                                  expansion_transform=transform, padding=padding,
                                  end_point_prefix=f"{end_point}/",
                                  **(dict(depthwise_location=None, expansion_kernel_size=op.kernel_size,
                                          expansion_stride=op.stride) if op.fused else {}))
            records = True
        layers.append(TrunkLayer(scope, end_point, module, records))
        channels = depth
    return layers, channels


# -------------------------------------------------------------------------------------------------
# slim's mobilenet.mobilenet: the trunk plus its classifier.

class LogitsScope(nn.Module):
    """The MobileNets' 'Logits' scope: holds the 1x1 classifier conv `Conv2d_1c_1x1` (with biases)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.Conv2d_1c_1x1 = Conv2d(in_channels, num_classes, 1, padding="VALID", activation=None, bias=True)


class LogitsHead:
    """The MobileNets' classifier (v1, v2, v3): dropout, then the 1x1 conv under `<scope>/Logits`,
    initialized like the body (truncated normal of `_init_stddev`). Needs `scope`, `num_features`,
    `_keep_prob` and `_init_stddev` set before `_make_head` runs."""

    def _make_head(self, num_classes: int) -> None:
        """dropout and the 'Logits' scope (removed when headless), not yet initialized."""
        body = self._modules[self.scope]
        self.dropout = dropout_module(self._keep_prob) if num_classes else None
        if num_classes:
            body.Logits = LogitsScope(self.num_features, num_classes)
        elif "Logits" in body._modules:
            del body._modules["Logits"]

    def _build_classifier(self, num_classes: int) -> None:
        self._make_head(num_classes)
        if num_classes:
            init_truncated_normal(self._modules[self.scope].Logits, self._init_stddev)


class MobileNet(LogitsHead, SlimNet):
    """slim's nets/mobilenet/mobilenet.py classifier over a `build_trunk` op list.

    forward_endpoints gives slim's end points in slim's order: layer_1 ... layer_N, then each
    block's `layer_N/expansion_output`, `layer_N/depthwise_output`, `layer_N/output`, then
    `global_pool` ([N, C, 1, 1]), `Logits` ([N, classes]) and `Predictions`. Headless
    (num_classes=0): model(x) is the pooled features [N, C].
    """

    def __init__(self, num_classes: int, ops: Sequence[Op], scope: str, depth_multiplier: float = 1.0,
                 min_depth: int = 8, divisible_by: int = 8, output_stride: Optional[int] = None,
                 use_explicit_padding: bool = False, dropout_keep_prob: float = 0.8,
                 norm: NormFactory = None, activation: Activation = relu6_, in_channels: int = 3,
                 init_stddev: float = 0.09) -> None:
        super().__init__(num_classes)
        self.scope = scope
        self.classifier_scope = f"{scope}/Logits/Conv2d_1c_1x1"
        self.classifier_scopes = (f"{scope}/Logits",)
        self.depth_multiplier = check_depth_multiplier(scope, depth_multiplier)
        self.output_stride = output_stride
        self.use_explicit_padding = bool(use_explicit_padding)
        layers, channels = build_trunk(ops, in_channels, self.depth_multiplier, divisible_by=divisible_by,
                                       min_depth=min_depth, output_stride=output_stride,
                                       use_explicit_padding=use_explicit_padding, norm=norm,
                                       activation=activation)
        self.num_features = channels
        body = nn.Module()
        for layer in layers:
            body.add_module(layer.scope, layer.module)
        self._layers = tuple((layer.scope, layer.end_point, layer.records_end_points) for layer in layers)
        self._keep_prob = check_keep_prob(scope, dropout_keep_prob)
        self._init_stddev = init_stddev
        self.add_module(scope, body)
        self._make_head(num_classes)
        init_truncated_normal(self, init_stddev)

    def _forward_features(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """The trunk (slim's mobilenet_base): the last layer's feature map, end points recorded."""
        body = self._modules[self.scope]
        block_end_points: "OrderedDict[str, Tensor]" = OrderedDict()
        net = x
        for scope, end_point, records in self._layers:
            module = body._modules[scope]
            net = module(net, block_end_points) if records else module(net)
            end_points[end_point] = net
        # slim collects the blocks' '*output' tensors after all layer_N entries.
        end_points.update(block_end_points)
        return net

    def _forward_head(self, features: Tensor, end_points: "OrderedDict[str, Tensor]",
                      pre_logits: bool = False) -> Tensor:
        """global_pool, Logits, Predictions; the pooled features [N, C] when headless or pre_logits."""
        # slim's global_pool is an avg_pool over the whole map: [N, C, 1, 1].
        net = end_points["global_pool"] = reduce_mean_hw(features)
        if not self.num_classes or pre_logits:
            return pooled_features(net)
        net = self.dropout(net)
        logits = self._modules[self.scope].Logits.Conv2d_1c_1x1(net).flatten(1)
        end_points["Logits"] = logits
        end_points["Predictions"] = torch.softmax(logits, dim=1)
        return logits
