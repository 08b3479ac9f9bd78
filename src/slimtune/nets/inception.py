"""Inception v1-v4 as TF-Slim builds them (tf_slim.nets / research/slim nets/inception_v{1,2,3,4}.py).

The building blocks are public so a user's own network file can reuse them:

- `inception_batch_norm()`: slim's `inception_arg_scope` batch norm (epsilon 0.001, decay 0.9997,
  no gamma);
- the layer specs `conv`, `max_pool`, `avg_pool`, `split` describe one branch of a Mixed block in
  slim's own terms (scope name, depth, kernel, stride, padding);
- `Branch` and `MixedBlock` turn a list of branch specs into modules named as slim's variable
  scopes ('Mixed_5b/Branch_1/Conv2d_0b_5x5'), concatenated on the channel axis;
- `InceptionNet`, the trunk-plus-heads net every Inception shares: an ordered body whose modules
  record slim's end points, `final_endpoint` (build the body only up to that end point, as slim's
  `inception_v3_base` does), an optional auxiliary head (`AuxLogits`), slim's pooling and logits
  heads, and input-size checks that name the smallest size a configuration accepts.

`slimtune.nets.inception_resnet_v2` builds Inception-ResNet-v2 from the same pieces.

Any input size: slim's `_reduced_kernel_size_for_small_input` shrinks v2/v3's final pooling window
and v3's auxiliary convolution to the feature map; v4 and Inception-ResNet-v2 size the auxiliary
convolution and the final pooling to the map. Parameter shapes of the auxiliary head therefore
depend on the input size: these nets take `image_size` (the registry passes the training size),
and v3's auxiliary conv is named after its kernel, as slim names it (`AuxLogits/Conv2d_2a_5x5` at
299, `AuxLogits/Conv2d_2a_3x3` at 224).
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .base import SlimNet, pooled_features
from .layers import (Activation, AvgPool2d, Conv2d, Linear, MaxPool2d, NormFactory, batch_norm_factory, check_keep_prob,
                     dropout_module, flatten_nhwc, reduce_mean_hw, truncated_normal_, variance_scaling_)
from .mobilenet_common import SeparableConv2d
from .registry import register_model

# inception_arg_scope's batch norm: moving averages with decay 0.9997, epsilon 0.001, and no gamma.
BATCH_NORM_DECAY = 0.9997
BATCH_NORM_EPSILON = 0.001

__all__ = [
    "inception_batch_norm", "conv", "max_pool", "avg_pool", "split", "Branch", "MixedBlock", "InceptionNet",
    "AuxHead", "spatial_size", "InceptionV1", "InceptionV2", "InceptionV3", "InceptionV4",
    "inception_v1", "inception_v2", "inception_v3", "inception_v4",
]


def inception_batch_norm(decay: float = BATCH_NORM_DECAY, eps: float = BATCH_NORM_EPSILON,
                         scale: bool = False) -> NormFactory:
    """slim.batch_norm as inception_arg_scope (and inception_resnet_v2_arg_scope) configure it."""
    return batch_norm_factory(eps=eps, decay=decay, scale=scale)


# ReLU in place: every conv output here is a fresh tensor that backward does not need.
relu_ = torch.relu_


# -------------------------------------------------------------------------------------------------
# Layer specs: one branch of a Mixed block, written as slim writes it.

@dataclass(frozen=True)
class ConvSpec:
    """slim.conv2d(net, depth, kernel, stride, padding, scope=name); padding None = the block's default."""

    name: str
    depth: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: Optional[str] = None


@dataclass(frozen=True)
class PoolSpec:
    """slim.max_pool2d / slim.avg_pool2d(net, kernel, stride, padding, scope=name)."""

    kind: str  # 'max' or 'avg'
    name: str
    kernel: tuple[int, int]
    stride: int = 1
    padding: Optional[str] = None


@dataclass(frozen=True)
class SplitSpec:
    """Parallel convs on the same input, concatenated (v3's Mixed_7b/7c, v4's Inception-C)."""

    convs: tuple[ConvSpec, ...]


LayerSpec = Union[ConvSpec, PoolSpec, SplitSpec]


def _kernel(kernel: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(kernel, int):
        return kernel, kernel
    return int(kernel[0]), int(kernel[1])


def conv(name: str, depth: int, kernel: Union[int, Sequence[int]], stride: int = 1,
         padding: Optional[str] = None) -> ConvSpec:
    """A conv layer spec (BN + ReLU as the arg scope adds them)."""
    return ConvSpec(name, depth, _kernel(kernel), stride, padding)


def max_pool(name: str, kernel: Union[int, Sequence[int]], stride: int = 1,
             padding: Optional[str] = None) -> PoolSpec:
    """A max-pool layer spec."""
    return PoolSpec("max", name, _kernel(kernel), stride, padding)


def avg_pool(name: str, kernel: Union[int, Sequence[int]], stride: int = 1,
             padding: Optional[str] = None) -> PoolSpec:
    """An average-pool layer spec (TF's: padded positions are left out of the average)."""
    return PoolSpec("avg", name, _kernel(kernel), stride, padding)


def split(*convs: ConvSpec) -> SplitSpec:
    """Parallel conv specs whose outputs are concatenated."""
    return SplitSpec(tuple(convs))


# -------------------------------------------------------------------------------------------------
# Modules.

DepthFn = Callable[[int], int]


def _identity_depth(depth: int) -> int:
    return depth


def make_conv(in_channels: int, spec: ConvSpec, norm: NormFactory, padding: str, depth: DepthFn = _identity_depth,
              activation: Activation = relu_) -> Conv2d:
    """The Conv2d of a ConvSpec (BN + activation, no bias, as under inception_arg_scope)."""
    return Conv2d(in_channels, depth(spec.depth), spec.kernel, spec.stride, padding=spec.padding or padding,
                  normalizer=norm, activation=activation)


def make_pool(spec: PoolSpec, padding: str) -> nn.Module:
    """The pooling module of a PoolSpec."""
    cls = MaxPool2d if spec.kind == "max" else AvgPool2d
    return cls(spec.kernel, spec.stride, spec.padding or padding)


class Branch(nn.Module):
    """One 'Branch_<i>' scope: its layers run in order; a split runs several convs on one input and
    concatenates them (their scopes sit directly under the branch, as in slim)."""

    def __init__(self, in_channels: int, specs: Sequence[LayerSpec], norm: NormFactory, padding: str = "SAME",
                 depth: DepthFn = _identity_depth, activation: Activation = relu_) -> None:
        super().__init__()
        steps: list[Union[str, tuple[str, ...]]] = []
        channels = in_channels
        for spec in specs:
            if isinstance(spec, ConvSpec):
                self.add_module(spec.name, make_conv(channels, spec, norm, padding, depth, activation))
                channels = depth(spec.depth)
                steps.append(spec.name)
            elif isinstance(spec, PoolSpec):
                self.add_module(spec.name, make_pool(spec, padding))
                steps.append(spec.name)
            else:
                for part in spec.convs:
                    self.add_module(part.name, make_conv(channels, part, norm, padding, depth, activation))
                steps.append(tuple(part.name for part in spec.convs))
                channels = sum(depth(part.depth) for part in spec.convs)
        self.steps = tuple(steps)
        self.out_channels = channels
        self.pooled_after = self._pools_to_move()

    def _pools_to_move(self) -> dict[str, str]:
        """{conv name: average pool name} for each average pool followed by a narrowing 1x1 convolution.

        An average (TF's padding-excluding one included: its weights sum to one at every position) and
        a 1x1 convolution commute, so the convolution runs first and the pool averages its fewer
        output channels (Branch_3 of Inception v3's Mixed_7c: 192 channels instead of 2048). BatchNorm
        and the activation still come after both; in training BatchNorm sees the same tensor.
        """
        moves = {}
        for pool_name, conv_name in zip(self.steps, self.steps[1:]):
            if isinstance(pool_name, tuple) or isinstance(conv_name, tuple):
                continue
            pool, conv = self._modules[pool_name], self._modules[conv_name]
            if (isinstance(pool, AvgPool2d) and type(conv) is Conv2d and conv.kernel_size == (1, 1)
                    and conv.stride == (1, 1) and conv.groups == 1 and conv.out_channels < conv.in_channels):
                moves[conv_name] = pool_name
        return moves

    def forward(self, x: Tensor) -> Tensor:
        """Run the branch's layers in slim's order (a moved average pool inside its 1x1 convolution)."""
        moved = set(self.pooled_after.values())
        for step in self.steps:
            if isinstance(step, tuple):
                x = torch.cat([self._modules[name](x) for name in step], dim=1)
            elif step in self.pooled_after:
                x = self._modules[step](x, then=self._modules[self.pooled_after[step]])
            elif step not in moved:
                x = self._modules[step](x)
        return x

    def output_size(self, size: int) -> int:
        """Spatial size after this branch for an input `size` (0 when a VALID window does not fit)."""
        for step in self.steps:
            size = spatial_size(self._modules[step[0] if isinstance(step, tuple) else step], size)
        return size


class MixedBlock(nn.Module):
    """A 'Mixed_*' scope: branches 'Branch_0'..'Branch_<n>' on the same input, concatenated on channels."""

    def __init__(self, in_channels: int, branches: Sequence[Sequence[LayerSpec]], norm: NormFactory,
                 padding: str = "SAME", depth: DepthFn = _identity_depth, activation: Activation = relu_) -> None:
        super().__init__()
        for index, specs in enumerate(branches):
            self.add_module(f"Branch_{index}", Branch(in_channels, specs, norm, padding, depth, activation))
        self.out_channels = sum(branch.out_channels for branch in self.children())

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate every branch's output (slim's tf.concat on the channel axis)."""
        return torch.cat([branch(x) for branch in self.children()], dim=1)

    def output_size(self, size: int) -> int:
        """Spatial size of the block's output (every branch gives the same)."""
        return self.Branch_0.output_size(size)


def _window_out(size: int, kernel: int, stride: int, padding: str, rate: int = 1) -> int:
    """TF's output length of a window op, 0 when a VALID window does not fit."""
    if size <= 0:
        return 0
    if padding == "SAME":
        return -(-size // stride)
    effective = (kernel - 1) * rate + 1
    if padding == "EXPLICIT":
        size += effective - 1
    return 0 if size < effective else (size - effective) // stride + 1


def spatial_size(module: nn.Module, size: int) -> int:
    """Output height (or width) of one body module for an input of `size`; 0 when it cannot run.

    Modules of a user's own design may define `output_size(size)`; anything without it (and that
    is not a conv or a pool) keeps the size.
    """
    if hasattr(module, "output_size"):
        return module.output_size(size)
    if isinstance(module, Conv2d):
        return _window_out(size, module.kernel_size[0], module.stride[0], module.padding, module.rate[0])
    if isinstance(module, (MaxPool2d, AvgPool2d)):
        return _window_out(size, module.kernel_size[0], module.stride[0], module.padding)
    return size


def init_like_inception_arg_scope(model: nn.Module) -> None:
    """inception_arg_scope's initializers: He (variance scaling) conv kernels, zero biases; the
    classifier layers get slim's truncated normal (stddev 0.001); BatchNorm keeps its constructor values."""
    for module in model.modules():
        weight = getattr(module, getattr(module, "kernel_name", "weight"), None)
        if isinstance(module, (Conv2d, Linear)) and weight is not None and not weight.is_meta:
            if isinstance(module, Linear) or getattr(module, "is_logits", False):
                truncated_normal_(weight, 0.001)
            else:
                variance_scaling_(weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class AuxHead(nn.Module):
    """An 'AuxLogits' scope: average pool 5x5/3 VALID, a 1x1 conv (128), a VALID conv (768) whose
    kernel covers the pooled map, then the classifier: a 1x1 conv (v3: 'Conv2d_2b_1x1', squeezed)
    or flatten + fully connected (v4: 'Aux_logits', Inception-ResNet-v2: 'Logits').

    `kernel` is the 768-conv's kernel, decided from the input size the net is built for; its scope
    is `conv_name` (v3 names it after the kernel).
    """

    def __init__(self, in_channels: int, num_classes: int, norm: NormFactory, kernel: tuple[int, int],
                 conv_name: str, logits_name: str, logits_as_conv: bool, pool_name: str = "AvgPool_1a_5x5",
                 depth: DepthFn = _identity_depth, spatial_squeeze: bool = True,
                 max_kernel: Optional[int] = None) -> None:
        super().__init__()
        self.pool_name, self.conv_name, self.logits_name = pool_name, conv_name, logits_name
        self.kernel = kernel
        self.max_kernel = max_kernel
        self.logits_as_conv = logits_as_conv
        self.spatial_squeeze = spatial_squeeze
        self.pool = AvgPool2d(5, 3, "VALID")
        self.Conv2d_1b_1x1 = Conv2d(in_channels, depth(128), 1, normalizer=norm, activation=relu_)
        self.add_module(conv_name, Conv2d(depth(128), depth(768), kernel, padding="VALID", normalizer=norm,
                                          activation=relu_))
        if logits_as_conv:
            head: nn.Module = Conv2d(depth(768), num_classes, 1, activation=None)
        else:
            head = Linear(depth(768), num_classes, activation=None)
        head.is_logits = True
        self.add_module(logits_name, head)

    def _wanted_kernel(self, height: int, width: int) -> tuple[int, int]:
        """The conv kernel slim would build for a source map of height x width."""
        pooled = (_window_out(height, 5, 3, "VALID"), _window_out(width, 5, 3, "VALID"))
        if self.max_kernel:
            return min(pooled[0], self.max_kernel), min(pooled[1], self.max_kernel)
        return pooled

    def fits(self, source: Tensor) -> bool:
        """True when this head (built for one input size) can run on `source`, the map it branches off."""
        return self._wanted_kernel(source.shape[2], source.shape[3]) == tuple(self.kernel)

    def forward(self, x: Tensor) -> Tensor:
        """Aux logits [N, classes] (v3 without spatial_squeeze: [N, classes, H, W])."""
        wanted = self._wanted_kernel(x.shape[2], x.shape[3])
        x = self.pool(x)
        if tuple(wanted) != tuple(self.kernel):
            raise ConfigError(
                f"the auxiliary head was built for a {self.kernel[0]}x{self.kernel[1]} kernel (from the image_size "
                f"the net was built with) but this input gives a {wanted[0]}x{wanted[1]} one: build the net with "
                "image_size equal to the input size, or create_aux_logits=False")
        x = self.Conv2d_1b_1x1(x)
        x = self._modules[self.conv_name](x)
        head = self._modules[self.logits_name]
        if self.logits_as_conv:
            x = head(x)
            if self.spatial_squeeze:
                if x.shape[2] != 1 or x.shape[3] != 1:
                    raise ConfigError(f"AuxLogits are {x.shape[2]}x{x.shape[3]}, not 1x1, so they cannot be "
                                      "squeezed: pass spatial_squeeze=False or create_aux_logits=False")
                x = x.flatten(1)
            return x
        return head(flatten_nhwc(x))


# -------------------------------------------------------------------------------------------------
# The net.

_ACTIVATIONS: dict[str, Activation] = {"relu": relu_, "relu6": functools.partial(F.hardtanh, min_val=0.0, max_val=6.0)}


def check_depth_multiplier(name: str, depth_multiplier: float) -> float:
    """slim's check: depth_multiplier must be > 0."""
    if not float(depth_multiplier) > 0:
        raise ConfigError(f"{name}: depth_multiplier must be greater than zero, got {depth_multiplier}")
    return float(depth_multiplier)


@dataclass
class HeadSpec:
    """How a net pools and classifies (slim's 'Logits' scope)."""

    pool: str  # 'v1': 7x7/1 VALID; 'reduced': min(map, window) VALID stride 2; 'full': the whole map
    window: int = 8
    pool_end_point: str = "AvgPool_1a"
    logits_as_conv: bool = True  # 1x1 conv ('Conv2d_*c_1x1') or fully connected ('Logits')
    logits_name: str = "Conv2d_1c_1x1"
    pre_logits: Optional[str] = None  # 'PreLogits' (v3, after dropout) or 'PreLogitsFlatten' (v4, IRv2)
    flatten_before_dropout: bool = False  # IRv2 flattens, then drops out; v4 drops out, then flattens


class InceptionNet(SlimNet):
    """A slim Inception: an ordered body of end-point modules, an optional AuxLogits head, and the
    Logits head. Subclasses pass the body (built from the blocks above) and their head layout.

    `body` is a list of (module name, end point or None, module); modules without an end point
    (Inception-ResNet-v2's 'Repeat' stacks) run without being recorded. `final_endpoint` cuts the
    body there (slim's *_base); a cut body has no heads, so it needs num_classes=0.
    """

    #: the end point feeding the aux head, and the default final end point.
    aux_source: str = ""
    default_final_endpoint: str = ""

    def __init__(self, num_classes: int, scope: str, body: Sequence[tuple[str, Optional[str], nn.Module]],
                 head: HeadSpec, norm: NormFactory, image_size: Optional[int], final_endpoint: Optional[str],
                 create_aux_logits: bool, dropout_keep_prob: float, global_pool: bool = False,
                 spatial_squeeze: bool = True, depth: DepthFn = _identity_depth,
                 aux_layout: Optional[dict[str, Any]] = None, default_image_size: int = 299) -> None:
        super().__init__(num_classes)
        self.scope = scope
        self.head_spec = head
        self.global_pool = bool(global_pool)
        self.spatial_squeeze = bool(spatial_squeeze)
        self.create_aux_logits = bool(create_aux_logits)
        self.image_size = int(image_size or default_image_size)
        self._norm, self._depth, self._aux_layout = norm, depth, aux_layout
        names = [end_point for _, end_point, _ in body if end_point]
        final_endpoint = final_endpoint or self.default_final_endpoint
        if final_endpoint not in names:
            raise ConfigError(f"{scope}: unknown final_endpoint {final_endpoint!r}; use one of {', '.join(names)}")
        self.final_endpoint = final_endpoint
        self.truncated = final_endpoint != self.default_final_endpoint
        if self.truncated and num_classes:
            raise ConfigError(f"{scope}: final_endpoint={final_endpoint!r} builds the base network only "
                              "(slim's *_base): pass num_classes=0")
        trunk = nn.Module()
        plan = []
        channels = 0
        for module_name, end_point, module in body:
            trunk.add_module(module_name, module)
            plan.append((module_name, end_point))
            channels = getattr(module, "out_channels", channels)
            if end_point == final_endpoint:
                break
        self._plan = tuple(plan)
        self.num_features = channels
        self._aux_channels = self._channels_at(body, self.aux_source) if self.aux_source else 0
        self.add_module(scope, trunk)
        self.dropout = dropout_module(check_keep_prob(scope, dropout_keep_prob))
        self._check_size(self.image_size, self.image_size, built=True)
        self._build_classifier(num_classes)
        init_like_inception_arg_scope(self)

    @staticmethod
    def _channels_at(body: Sequence[tuple[str, Optional[str], nn.Module]], end_point: str) -> int:
        channels = 0
        for _, point, module in body:
            channels = getattr(module, "out_channels", channels)
            if point == end_point:
                return channels
        return channels

    # Heads ------------------------------------------------------------------------------------
    @property
    def has_aux(self) -> bool:
        """True when the net builds slim's AuxLogits head (create_aux_logits and a classifier)."""
        return bool(self.create_aux_logits and self.num_classes and self._aux_layout and not self.truncated)

    def _build_classifier(self, num_classes: int) -> None:
        trunk = self._modules[self.scope]
        for name in ("AuxLogits", "Logits"):
            if name in trunk._modules:
                delattr(trunk, name)
        main = f"{self.scope}/Logits"
        self.classifier_scope = f"{main}/{self.head_spec.logits_name}" if num_classes else ""
        self.classifier_scopes = (main,) if num_classes else ()
        if not num_classes:
            return
        if self.create_aux_logits and self._aux_layout and not self.truncated:
            layout = {k: v for k, v in self._aux_layout.items() if k != "conv_name_format"}
            kernel, conv_name = self._aux_kernel(self.image_size)
            trunk.AuxLogits = AuxHead(self._aux_channels, num_classes, self._norm, kernel, conv_name,
                                      depth=self._depth, spatial_squeeze=self.spatial_squeeze, **layout)
            self.classifier_scopes = (main, f"{self.scope}/AuxLogits")
        logits = nn.Module()
        if self.head_spec.logits_as_conv:
            layer: nn.Module = Conv2d(self.num_features, num_classes, 1, activation=None)
        else:
            layer = Linear(self.num_features, num_classes, activation=None)
        layer.is_logits = True
        logits.add_module(self.head_spec.logits_name, layer)
        trunk.Logits = logits
        # Initialize only the new layers (the trunk keeps its weights); they follow the net's mode
        # (a head reset on an eval-mode net must not normalize with batch statistics) and live on
        # the body's device and dtype (meta included).
        reference = next(trunk.parameters(), None)
        for module in (trunk._modules.get("AuxLogits"), logits):
            if module is not None:
                init_like_inception_arg_scope(module)
                module.train(self.training)
                if reference is not None:
                    module.to(device=reference.device, dtype=reference.dtype)

    def aux_conv_name(self, image_size: int) -> str:
        """The aux conv's scope for a square input of `image_size` (v3 names it after its kernel:
        'Conv2d_2a_5x5' at 299, 'Conv2d_2a_3x3' at 224; v4 and Inception-ResNet-v2 keep one name)."""
        kernel, name = self._aux_kernel(image_size)
        return name

    def aux_input_sizes(self, kernel: int) -> tuple[int, int]:
        """The smallest and largest square inputs (up to 1024) whose aux conv kernel is kernel x kernel."""
        sizes = [size for size in range(1, 1025) if self._fits(size) and self._aux_kernel(size)[0][0] == kernel]
        return (sizes[0], sizes[-1]) if sizes else (0, 0)

    def explain_restore_plan(self, plan: Any) -> None:
        """Say in plain words when the checkpoint's aux conv has another name because it was built
        for another input size (v3: 'Conv2d_2a_5x5' at 299, 'Conv2d_2a_3x3' at 224), instead of
        leaving a missing tensor and an unused one."""
        layout = self._aux_layout or {}
        if "{" not in layout.get("conv_name_format", "") or not self.has_aux:
            return
        pattern = re.compile(r"^(.*/AuxLogits/)Conv2d_2a_(\d+)x(\d+)/(.+)$")
        unused = {t.name.split(":")[0]: t for t in plan.unused}
        first = True
        for fate in plan.fates:
            match = pattern.match(fate.display) if fate.status == "missing" else None
            if not match:
                continue
            prefix, own, _, leaf = match.groups()
            for name, tensor in list(unused.items()):
                other = pattern.match(name)
                if not other or other.group(1) != prefix or other.group(4) != leaf or other.group(2) == own:
                    continue
                low, high = self.aux_input_sizes(int(other.group(2)))
                fate.status, fate.checkpoint_name, fate.checkpoint_shape = "mismatched", tensor.name, tensor.shape
                fate.scope = f"{self.scope}/AuxLogits"
                fate.note = (f"renamed by the input size: slim names this conv after its kernel, which follows the "
                             f"input size; the checkpoint's Conv2d_2a_{other.group(2)}x{other.group(3)} comes from "
                             f"inputs of {low}x{low} to {high}x{high} (e.g. the published {299}x{299}), this net was "
                             f"built for {self.image_size}x{self.image_size} (Conv2d_2a_{own}x{own}): build it with "
                             f"image_size={max(low, min(high, 299))} to restore the aux head, or exclude "
                             f"{self.scope}/AuxLogits" if first else "renamed by the input size (as above)")
                first = False
                plan.unused.remove(tensor)
                del unused[name]
                break

    def _aux_kernel(self, image_size: int) -> tuple[tuple[int, int], str]:
        """The aux conv's kernel and scope name for a square input of `image_size`."""
        layout = self._aux_layout or {}
        pooled = self._pooled_aux_size(image_size)
        size = min(pooled, layout["max_kernel"]) if layout.get("max_kernel") else pooled
        return (size, size), layout["conv_name_format"].format(size, size)

    def _pooled_aux_size(self, image_size: int) -> int:
        size = self._size_at(image_size, self.aux_source)
        return _window_out(size, 5, 3, "VALID")

    # Sizes ----------------------------------------------------------------------------------------
    def _size_at(self, size: int, end_point: Optional[str] = None) -> int:
        """Spatial size of the body output (or of `end_point`) for an input of `size`."""
        trunk = self._modules[self.scope]
        for module_name, point in self._plan:
            size = spatial_size(trunk._modules[module_name], size)
            if point is not None and point == end_point:
                break
        return size

    def _fits(self, size: int, with_heads: bool = True) -> bool:
        if self._size_at(size) < 1:
            return False
        if not with_heads or self.truncated:
            return True
        if self.has_aux and self._pooled_aux_size(size) < 1:
            return False
        if self.num_classes and self.head_spec.pool == "v1" and not self.global_pool:
            return self._size_at(size) >= 7
        return True

    def smallest_input_size(self) -> int:
        """The smallest square input this configuration accepts."""
        for size in range(1, 4096):
            if self._fits(size):
                return size
        return 4096

    def _check_size(self, height: int, width: int, built: bool = False) -> None:
        if not (self._fits(height) and self._fits(width)):
            smallest = self.smallest_input_size()
            what = f"image_size={height}" if built else f"a {height}x{width} input"
            raise ConfigError(f"{self.scope}: {what} is too small; this configuration needs at least "
                              f"{smallest}x{smallest}")

    # The two hooks -----------------------------------------------------------------------------
    def _forward_features(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """The body up to final_endpoint, recording slim's end points; then AuxLogits (slim records
        them after the base end points)."""
        if x.dim() != 4:
            raise ConfigError(f"{self.scope} expects a 4-D NCHW image batch, got shape {tuple(x.shape)}")
        self._check_size(x.shape[2], x.shape[3])
        trunk = self._modules[self.scope]
        for module_name, end_point in self._plan:
            x = trunk._modules[module_name](x)
            if end_point is not None:
                end_points[end_point] = x
        aux_head = trunk._modules.get("AuxLogits") if self.has_aux else None
        if aux_head is not None:  # None also where an inference copy removed the head (export)
            source = end_points[self.aux_source]
            # Evaluation never uses the aux head: at an input size other than the one the head was
            # built for (e.g. --eval_image_size), eval mode leaves AuxLogits out instead of failing.
            if self.training or aux_head.fits(source):
                end_points["AuxLogits"] = aux_head(source)
        return x

    def _pool(self, net: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        spec = self.head_spec
        if spec.pool == "full":
            net = end_points["global_pool"] = reduce_mean_hw(net)  # a VALID pool over the whole map
        elif self.global_pool:
            net = end_points["global_pool"] = reduce_mean_hw(net)
        elif spec.pool == "v1":
            if net.shape[2] < 7 or net.shape[3] < 7:
                raise ConfigError(f"{self.scope}: the final map is {net.shape[2]}x{net.shape[3]}, smaller than the "
                                  "7x7 average pool: feed at least 193x193 or pass global_pool=True")
            net = end_points[spec.pool_end_point] = F.avg_pool2d(net, 7, 1)
        else:
            kernel = (min(net.shape[2], spec.window), min(net.shape[3], spec.window))
            net = end_points[spec.pool_end_point] = F.avg_pool2d(net, kernel, 2)
        return net

    def _forward_head(self, features: Tensor, end_points: "OrderedDict[str, Tensor]",
                      pre_logits: bool = False) -> Tensor:
        """Pool, drop out, classify, squeeze; Logits and Predictions as slim records them."""
        if self.truncated:
            return pooled_features(features)
        spec = self.head_spec
        net = self._pool(features, end_points)
        if pre_logits or not self.num_classes:
            return pooled_features(net)
        layer = self._modules[self.scope].Logits._modules[spec.logits_name]
        if spec.logits_as_conv:
            net = self.dropout(net)
            if spec.pre_logits:
                end_points[spec.pre_logits] = net
            logits = layer(net)
            if self.spatial_squeeze:
                if logits.shape[2] != 1 or logits.shape[3] != 1:
                    raise ConfigError(f"{self.scope}: the logits are {logits.shape[2]}x{logits.shape[3]}, not 1x1, so "
                                      "they cannot be squeezed: feed the default image size, or pass "
                                      "global_pool=True or spatial_squeeze=False")
                logits = logits.flatten(1)
        else:
            if spec.flatten_before_dropout:
                net = self.dropout(flatten_nhwc(net))
            else:
                net = flatten_nhwc(self.dropout(net))
            end_points[spec.pre_logits or "PreLogitsFlatten"] = net
            logits = layer(net)
        end_points["Logits"] = logits
        end_points["Predictions"] = torch.softmax(logits, dim=1)
        return logits


def _stem(in_channels: int, specs: Sequence[LayerSpec], norm: NormFactory, padding: str, depth: DepthFn,
          ) -> tuple[list[tuple[str, Optional[str], nn.Module]], int]:
    """Plain layers that are end points themselves (Conv2d_1a_3x3, MaxPool_3a_3x3, ...)."""
    body: list[tuple[str, Optional[str], nn.Module]] = []
    channels = in_channels
    for spec in specs:
        if isinstance(spec, ConvSpec):
            module = make_conv(channels, spec, norm, padding, depth)
            channels = depth(spec.depth)
        else:
            module = make_pool(spec, padding)
        module.out_channels = channels
        body.append((spec.name, spec.name, module))
    return body, channels


def _mixed(body: list[tuple[str, Optional[str], nn.Module]], channels: int, name: str,
           branches: Sequence[Sequence[LayerSpec]], norm: NormFactory, padding: str, depth: DepthFn) -> int:
    block = MixedBlock(channels, branches, norm, padding, depth)
    body.append((name, name, block))
    return block.out_channels


def _accepts(name: str, kwargs: dict[str, Any], accepted: Sequence[str]) -> None:
    """Refuse unknown keyword arguments with the list of accepted ones (one line)."""
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"{name}: unknown argument(s) {', '.join(unknown)}; accepted: {', '.join(sorted(accepted))}")


def _depth_fn(depth_multiplier: float, min_depth: int) -> DepthFn:
    def depth(d: int) -> int:
        return max(int(d * depth_multiplier), min_depth)
    return depth


# -------------------------------------------------------------------------------------------------
# Inception v1 (GoogLeNet with batch norm): SAME padding everywhere.

def _v1_mixed(b0: int, b1a: int, b1b: int, b2a: int, b2b: int, b3: int, b2b_name: str = "Conv2d_0b_3x3"):
    return [
        [conv("Conv2d_0a_1x1", b0, 1)],
        [conv("Conv2d_0a_1x1", b1a, 1), conv("Conv2d_0b_3x3", b1b, 3)],
        [conv("Conv2d_0a_1x1", b2a, 1), conv(b2b_name, b2b, 3)],
        [max_pool("MaxPool_0a_3x3", 3), conv("Conv2d_0b_1x1", b3, 1)],
    ]


V1_BLOCKS: tuple[tuple[str, Any], ...] = (
    ("Mixed_3b", _v1_mixed(64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", _v1_mixed(128, 128, 192, 32, 96, 64)),
    ("MaxPool_4a_3x3", max_pool("MaxPool_4a_3x3", 3, 2)),
    ("Mixed_4b", _v1_mixed(192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", _v1_mixed(160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", _v1_mixed(128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", _v1_mixed(112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", _v1_mixed(256, 160, 320, 32, 128, 128)),
    ("MaxPool_5a_2x2", max_pool("MaxPool_5a_2x2", 2, 2)),
    ("Mixed_5b", _v1_mixed(256, 160, 320, 32, 128, 128, b2b_name="Conv2d_0a_3x3")),
    ("Mixed_5c", _v1_mixed(384, 192, 384, 48, 128, 128)),
)


def _sequence(body: list, channels: int, blocks: Sequence[tuple[str, Any]], norm: NormFactory, padding: str,
              depth: DepthFn) -> int:
    for name, layout in blocks:
        if isinstance(layout, (ConvSpec, PoolSpec)):
            layers, channels = _stem(channels, [layout], norm, padding, depth)
            body += layers
        else:
            channels = _mixed(body, channels, name, layout, norm, padding, depth)
    return channels


class InceptionV1(InceptionNet):
    """slim's inception_v1 (scope 'InceptionV1'): 224 px, a 7x7/1 VALID average pool, the 1x1-conv
    classifier 'Logits/Conv2d_0c_1x1'. slim's v1 has no depth_multiplier. Without global_pool the
    7x7 pool needs a final map of at least 7x7 (inputs of 193 and up)."""

    default_final_endpoint = "Mixed_5c"

    def __init__(self, num_classes: int = 1001, dropout_keep_prob: float = 0.8, spatial_squeeze: bool = True,
                 global_pool: bool = False, final_endpoint: Optional[str] = None, in_channels: int = 3,
                 image_size: Optional[int] = None) -> None:
        norm = inception_batch_norm()
        body, channels = _stem(in_channels, [
            conv("Conv2d_1a_7x7", 64, 7, 2), max_pool("MaxPool_2a_3x3", 3, 2), conv("Conv2d_2b_1x1", 64, 1),
            conv("Conv2d_2c_3x3", 192, 3), max_pool("MaxPool_3a_3x3", 3, 2)], norm, "SAME", _identity_depth)
        _sequence(body, channels, V1_BLOCKS, norm, "SAME", _identity_depth)
        head = HeadSpec(pool="v1", pool_end_point="AvgPool_0a_7x7", logits_name="Conv2d_0c_1x1")
        super().__init__(num_classes, "InceptionV1", body, head, norm, image_size, final_endpoint,
                         create_aux_logits=False, dropout_keep_prob=dropout_keep_prob, global_pool=global_pool,
                         spatial_squeeze=spatial_squeeze, default_image_size=224)


# -------------------------------------------------------------------------------------------------
# Inception v2 (BN-Inception): SAME padding everywhere, a separable 7x7 root conv.

def _v2_mixed(b0: Optional[int], b1a: int, b1b: int, b2a: int, b2b: int, b3: int, pool: str = "avg",
              reduction: bool = False):
    if reduction:  # Mixed_4a / Mixed_5a: stride-2 3x3s and a max pool, no 1x1 branch
        return [
            [conv("Conv2d_0a_1x1", b1a, 1), conv("Conv2d_1a_3x3", b1b, 3, 2)],
            [conv("Conv2d_0a_1x1", b2a, 1), conv("Conv2d_0b_3x3", b2b, 3), conv("Conv2d_1a_3x3", b2b, 3, 2)],
            [max_pool("MaxPool_1a_3x3", 3, 2)],
        ]
    pooling = avg_pool("AvgPool_0a_3x3", 3) if pool == "avg" else max_pool("MaxPool_0a_3x3", 3)
    return [
        [conv("Conv2d_0a_1x1", b0, 1)],
        [conv("Conv2d_0a_1x1", b1a, 1), conv("Conv2d_0b_3x3", b1b, 3)],
        [conv("Conv2d_0a_1x1", b2a, 1), conv("Conv2d_0b_3x3", b2b, 3), conv("Conv2d_0c_3x3", b2b, 3)],
        [pooling, conv("Conv2d_0b_1x1", b3, 1)],
    ]


V2_BLOCKS: tuple[tuple[str, Any], ...] = (
    ("Mixed_3b", _v2_mixed(64, 64, 64, 64, 96, 32)),
    ("Mixed_3c", _v2_mixed(64, 64, 96, 64, 96, 64)),
    ("Mixed_4a", _v2_mixed(None, 128, 160, 64, 96, 0, reduction=True)),
    ("Mixed_4b", _v2_mixed(224, 64, 96, 96, 128, 128)),
    ("Mixed_4c", _v2_mixed(192, 96, 128, 96, 128, 128)),
    ("Mixed_4d", _v2_mixed(160, 128, 160, 128, 160, 96)),
    ("Mixed_4e", _v2_mixed(96, 128, 192, 160, 192, 96)),
    ("Mixed_5a", _v2_mixed(None, 128, 192, 192, 256, 0, reduction=True)),
    ("Mixed_5b", _v2_mixed(352, 192, 320, 160, 224, 128)),
    ("Mixed_5c", _v2_mixed(352, 192, 320, 192, 224, 128, pool="max")),
)


class InceptionV2(InceptionNet):
    """slim's inception_v2 (scope 'InceptionV2'): 224 px; depth_multiplier / min_depth thin every
    layer as max(int(d * multiplier), min_depth); use_separable_conv (default, as slim) makes the
    root 'Conv2d_1a_7x7' a separable conv with bias and ReLU but no batch norm, as slim's arg scope
    leaves it; the final average pool is min(map, 7) wide with stride 2."""

    default_final_endpoint = "Mixed_5c"

    def __init__(self, num_classes: int = 1001, dropout_keep_prob: float = 0.8, min_depth: int = 16,
                 depth_multiplier: float = 1.0, spatial_squeeze: bool = True, global_pool: bool = False,
                 use_separable_conv: bool = True, final_endpoint: Optional[str] = None, in_channels: int = 3,
                 image_size: Optional[int] = None) -> None:
        depth_multiplier = check_depth_multiplier("InceptionV2", depth_multiplier)
        depth = _depth_fn(depth_multiplier, min_depth)
        self.depth_multiplier, self.min_depth = depth_multiplier, min_depth
        norm = inception_batch_norm()
        if use_separable_conv:
            multiplier = min(int(depth(64) / 3), 8)
            if multiplier < 1:
                raise ConfigError("InceptionV2: depth(64) < 3 leaves the separable root conv no depthwise channel; "
                                  "raise depth_multiplier/min_depth or pass use_separable_conv=False")
            root: nn.Module = SeparableConv2d(in_channels, depth(64), 7, 2, "SAME", depth_multiplier=multiplier,
                                              activation=relu_)
        else:
            root = Conv2d(in_channels, depth(64), 7, 2, padding="SAME", normalizer=norm, activation=relu_)
        root.out_channels = depth(64)
        body: list = [("Conv2d_1a_7x7", "Conv2d_1a_7x7", root)]
        stem, channels = _stem(depth(64), [
            max_pool("MaxPool_2a_3x3", 3, 2), conv("Conv2d_2b_1x1", 64, 1), conv("Conv2d_2c_3x3", 192, 3),
            max_pool("MaxPool_3a_3x3", 3, 2)], norm, "SAME", depth)
        body += stem
        _sequence(body, channels, V2_BLOCKS, norm, "SAME", depth)
        head = HeadSpec(pool="reduced", window=7)
        super().__init__(num_classes, "InceptionV2", body, head, norm, image_size, final_endpoint,
                         create_aux_logits=False, dropout_keep_prob=dropout_keep_prob, global_pool=global_pool,
                         spatial_squeeze=spatial_squeeze, depth=depth, default_image_size=224)


# -------------------------------------------------------------------------------------------------
# Inception v3: VALID stem, then SAME Mixed blocks with stride-2 VALID reductions.

def _v3_5x(b1_names: tuple[str, str], b3: int):
    return [
        [conv("Conv2d_0a_1x1", 64, 1)],
        [conv(b1_names[0], 48, 1), conv(b1_names[1], 64, 5)],
        [conv("Conv2d_0a_1x1", 64, 1), conv("Conv2d_0b_3x3", 96, 3), conv("Conv2d_0c_3x3", 96, 3)],
        [avg_pool("AvgPool_0a_3x3", 3), conv("Conv2d_0b_1x1", b3, 1)],
    ]


def _v3_6x(width: int):
    return [
        [conv("Conv2d_0a_1x1", 192, 1)],
        [conv("Conv2d_0a_1x1", width, 1), conv("Conv2d_0b_1x7", width, (1, 7)), conv("Conv2d_0c_7x1", 192, (7, 1))],
        [conv("Conv2d_0a_1x1", width, 1), conv("Conv2d_0b_7x1", width, (7, 1)), conv("Conv2d_0c_1x7", width, (1, 7)),
         conv("Conv2d_0d_7x1", width, (7, 1)), conv("Conv2d_0e_1x7", 192, (1, 7))],
        [avg_pool("AvgPool_0a_3x3", 3), conv("Conv2d_0b_1x1", 192, 1)],
    ]


def _v3_7x(second_split: str):
    return [
        [conv("Conv2d_0a_1x1", 320, 1)],
        [conv("Conv2d_0a_1x1", 384, 1), split(conv("Conv2d_0b_1x3", 384, (1, 3)), conv(second_split, 384, (3, 1)))],
        [conv("Conv2d_0a_1x1", 448, 1), conv("Conv2d_0b_3x3", 384, 3),
         split(conv("Conv2d_0c_1x3", 384, (1, 3)), conv("Conv2d_0d_3x1", 384, (3, 1)))],
        [avg_pool("AvgPool_0a_3x3", 3), conv("Conv2d_0b_1x1", 192, 1)],
    ]


V3_BLOCKS: tuple[tuple[str, Any], ...] = (
    ("Mixed_5b", _v3_5x(("Conv2d_0a_1x1", "Conv2d_0b_5x5"), 32)),
    ("Mixed_5c", _v3_5x(("Conv2d_0b_1x1", "Conv_1_0c_5x5"), 64)),
    ("Mixed_5d", _v3_5x(("Conv2d_0a_1x1", "Conv2d_0b_5x5"), 64)),
    ("Mixed_6a", [
        [conv("Conv2d_1a_1x1", 384, 3, 2, "VALID")],
        [conv("Conv2d_0a_1x1", 64, 1), conv("Conv2d_0b_3x3", 96, 3), conv("Conv2d_1a_1x1", 96, 3, 2, "VALID")],
        [max_pool("MaxPool_1a_3x3", 3, 2, "VALID")],
    ]),
    ("Mixed_6b", _v3_6x(128)),
    ("Mixed_6c", _v3_6x(160)),
    ("Mixed_6d", _v3_6x(160)),
    ("Mixed_6e", _v3_6x(192)),
    ("Mixed_7a", [
        [conv("Conv2d_0a_1x1", 192, 1), conv("Conv2d_1a_3x3", 320, 3, 2, "VALID")],
        [conv("Conv2d_0a_1x1", 192, 1), conv("Conv2d_0b_1x7", 192, (1, 7)), conv("Conv2d_0c_7x1", 192, (7, 1)),
         conv("Conv2d_1a_3x3", 192, 3, 2, "VALID")],
        [max_pool("MaxPool_1a_3x3", 3, 2, "VALID")],
    ]),
    ("Mixed_7b", _v3_7x("Conv2d_0b_3x1")),
    ("Mixed_7c", _v3_7x("Conv2d_0c_3x1")),
)


class InceptionV3(InceptionNet):
    """slim's inception_v3 (scope 'InceptionV3'): 299 px, VALID stem, the AuxLogits head on
    Mixed_6e (its 'Conv2d_2a_{k}x{k}' kernel min(map, 5), named after it), a min(map, 8) average pool
    with stride 2, dropout ('PreLogits') and the 1x1-conv classifier 'Logits/Conv2d_1c_1x1'."""

    aux_source = "Mixed_6e"
    default_final_endpoint = "Mixed_7c"

    def __init__(self, num_classes: int = 1001, dropout_keep_prob: float = 0.8, min_depth: int = 16,
                 depth_multiplier: float = 1.0, spatial_squeeze: bool = True, create_aux_logits: bool = True,
                 global_pool: bool = False, final_endpoint: Optional[str] = None, in_channels: int = 3,
                 image_size: Optional[int] = None) -> None:
        depth_multiplier = check_depth_multiplier("InceptionV3", depth_multiplier)
        depth = _depth_fn(depth_multiplier, min_depth)
        self.depth_multiplier, self.min_depth = depth_multiplier, min_depth
        norm = inception_batch_norm()
        body, channels = _stem(in_channels, [
            conv("Conv2d_1a_3x3", 32, 3, 2), conv("Conv2d_2a_3x3", 32, 3), conv("Conv2d_2b_3x3", 64, 3, 1, "SAME"),
            max_pool("MaxPool_3a_3x3", 3, 2), conv("Conv2d_3b_1x1", 80, 1), conv("Conv2d_4a_3x3", 192, 3),
            max_pool("MaxPool_5a_3x3", 3, 2)], norm, "VALID", depth)
        _sequence(body, channels, V3_BLOCKS, norm, "SAME", depth)
        head = HeadSpec(pool="reduced", window=8, pre_logits="PreLogits")
        aux = {"logits_name": "Conv2d_2b_1x1", "logits_as_conv": True, "max_kernel": 5,
               "conv_name_format": "Conv2d_2a_{0}x{1}"}
        super().__init__(num_classes, "InceptionV3", body, head, norm, image_size, final_endpoint,
                         create_aux_logits=create_aux_logits, dropout_keep_prob=dropout_keep_prob,
                         global_pool=global_pool, spatial_squeeze=spatial_squeeze, depth=depth, aux_layout=aux)


# -------------------------------------------------------------------------------------------------
# Inception v4: the Inception-A/B/C and Reduction-A/B blocks.

INCEPTION_A = [
    [conv("Conv2d_0a_1x1", 96, 1)],
    [conv("Conv2d_0a_1x1", 64, 1), conv("Conv2d_0b_3x3", 96, 3)],
    [conv("Conv2d_0a_1x1", 64, 1), conv("Conv2d_0b_3x3", 96, 3), conv("Conv2d_0c_3x3", 96, 3)],
    [avg_pool("AvgPool_0a_3x3", 3), conv("Conv2d_0b_1x1", 96, 1)],
]
REDUCTION_A = [
    [conv("Conv2d_1a_3x3", 384, 3, 2, "VALID")],
    [conv("Conv2d_0a_1x1", 192, 1), conv("Conv2d_0b_3x3", 224, 3), conv("Conv2d_1a_3x3", 256, 3, 2, "VALID")],
    [max_pool("MaxPool_1a_3x3", 3, 2, "VALID")],
]
INCEPTION_B = [
    [conv("Conv2d_0a_1x1", 384, 1)],
    [conv("Conv2d_0a_1x1", 192, 1), conv("Conv2d_0b_1x7", 224, (1, 7)), conv("Conv2d_0c_7x1", 256, (7, 1))],
    [conv("Conv2d_0a_1x1", 192, 1), conv("Conv2d_0b_7x1", 192, (7, 1)), conv("Conv2d_0c_1x7", 224, (1, 7)),
     conv("Conv2d_0d_7x1", 224, (7, 1)), conv("Conv2d_0e_1x7", 256, (1, 7))],
    [avg_pool("AvgPool_0a_3x3", 3), conv("Conv2d_0b_1x1", 128, 1)],
]
REDUCTION_B = [
    [conv("Conv2d_0a_1x1", 192, 1), conv("Conv2d_1a_3x3", 192, 3, 2, "VALID")],
    [conv("Conv2d_0a_1x1", 256, 1), conv("Conv2d_0b_1x7", 256, (1, 7)), conv("Conv2d_0c_7x1", 320, (7, 1)),
     conv("Conv2d_1a_3x3", 320, 3, 2, "VALID")],
    [max_pool("MaxPool_1a_3x3", 3, 2, "VALID")],
]
INCEPTION_C = [
    [conv("Conv2d_0a_1x1", 256, 1)],
    [conv("Conv2d_0a_1x1", 384, 1), split(conv("Conv2d_0b_1x3", 256, (1, 3)), conv("Conv2d_0c_3x1", 256, (3, 1)))],
    [conv("Conv2d_0a_1x1", 384, 1), conv("Conv2d_0b_3x1", 448, (3, 1)), conv("Conv2d_0c_1x3", 512, (1, 3)),
     split(conv("Conv2d_0d_1x3", 256, (1, 3)), conv("Conv2d_0e_3x1", 256, (3, 1)))],
    [avg_pool("AvgPool_0a_3x3", 3), conv("Conv2d_0b_1x1", 256, 1)],
]

V4_BLOCKS: tuple[tuple[str, Any], ...] = (
    ("Mixed_3a", [[max_pool("MaxPool_0a_3x3", 3, 2, "VALID")], [conv("Conv2d_0a_3x3", 96, 3, 2, "VALID")]]),
    ("Mixed_4a", [
        [conv("Conv2d_0a_1x1", 64, 1), conv("Conv2d_1a_3x3", 96, 3, 1, "VALID")],
        [conv("Conv2d_0a_1x1", 64, 1), conv("Conv2d_0b_1x7", 64, (1, 7)), conv("Conv2d_0c_7x1", 64, (7, 1)),
         conv("Conv2d_1a_3x3", 96, 3, 1, "VALID")],
    ]),
    ("Mixed_5a", [[conv("Conv2d_1a_3x3", 192, 3, 2, "VALID")], [max_pool("MaxPool_1a_3x3", 3, 2, "VALID")]]),
    *((f"Mixed_5{c}", INCEPTION_A) for c in "bcde"),
    ("Mixed_6a", REDUCTION_A),
    *((f"Mixed_6{c}", INCEPTION_B) for c in "bcdefgh"),
    ("Mixed_7a", REDUCTION_B),
    *((f"Mixed_7{c}", INCEPTION_C) for c in "bcd"),
)


class InceptionV4(InceptionNet):
    """slim's inception_v4 (scope 'InceptionV4'): 299 px, AuxLogits on Mixed_6h ('Conv2d_2a' sized
    to the pooled map, fully connected 'Aux_logits'), an average pool over the whole final map
    ('global_pool'), dropout, flatten ('PreLogitsFlatten') and fully connected 'Logits/Logits'."""

    aux_source = "Mixed_6h"
    default_final_endpoint = "Mixed_7d"

    def __init__(self, num_classes: int = 1001, dropout_keep_prob: float = 0.8, create_aux_logits: bool = True,
                 final_endpoint: Optional[str] = None, in_channels: int = 3, image_size: Optional[int] = None) -> None:
        norm = inception_batch_norm()
        body, channels = _stem(in_channels, [
            conv("Conv2d_1a_3x3", 32, 3, 2, "VALID"), conv("Conv2d_2a_3x3", 32, 3, 1, "VALID"),
            conv("Conv2d_2b_3x3", 64, 3)], norm, "SAME", _identity_depth)
        _sequence(body, channels, V4_BLOCKS, norm, "SAME", _identity_depth)
        head = HeadSpec(pool="full", logits_as_conv=False, logits_name="Logits", pre_logits="PreLogitsFlatten")
        aux = {"logits_name": "Aux_logits", "logits_as_conv": False, "conv_name_format": "Conv2d_2a"}
        super().__init__(num_classes, "InceptionV4", body, head, norm, image_size, final_endpoint,
                         create_aux_logits=create_aux_logits, dropout_keep_prob=dropout_keep_prob, aux_layout=aux)


# -------------------------------------------------------------------------------------------------
# Registration: slim's model-zoo rows (1001 classes, inception preprocessing).

_V1_ARGS = ("dropout_keep_prob", "spatial_squeeze", "global_pool", "final_endpoint", "in_channels", "image_size")
_V2_ARGS = _V1_ARGS + ("min_depth", "depth_multiplier", "use_separable_conv")
_V3_ARGS = _V1_ARGS + ("min_depth", "depth_multiplier", "create_aux_logits")
_V4_ARGS = ("dropout_keep_prob", "create_aux_logits", "final_endpoint", "in_channels", "image_size")


@register_model(default_image_size=224, preprocessing="inception", checkpoint_num_classes=1001, scope="InceptionV1",
                published_checkpoint="inception_v1_2016_08_28.tar.gz", published_top1=69.8, published_top5=89.6,
                classifier_scopes=("InceptionV1/Logits",), first_conv="InceptionV1/Conv2d_1a_7x7",
                min_image_size=193, sized_by_input=True)
def inception_v1(num_classes: int = 1001, **kwargs: Any) -> InceptionV1:
    """Inception V1 (slim nets/inception_v1.py, scope 'InceptionV1'); 224 px, 1001-class checkpoint."""
    _accepts("inception_v1", kwargs, _V1_ARGS)
    return InceptionV1(num_classes, **kwargs)


@register_model(default_image_size=224, preprocessing="inception", checkpoint_num_classes=1001, scope="InceptionV2",
                published_checkpoint="inception_v2_2016_08_28.tar.gz", published_top1=73.9, published_top5=91.8,
                classifier_scopes=("InceptionV2/Logits",), first_conv="InceptionV2/Conv2d_1a_7x7",
                min_image_size=1, sized_by_input=True)
def inception_v2(num_classes: int = 1001, **kwargs: Any) -> InceptionV2:
    """Inception V2 / BN-Inception (slim nets/inception_v2.py, scope 'InceptionV2'); 224 px, 1001 classes."""
    _accepts("inception_v2", kwargs, _V2_ARGS)
    return InceptionV2(num_classes, **kwargs)


@register_model(default_image_size=299, preprocessing="inception", checkpoint_num_classes=1001, scope="InceptionV3",
                published_checkpoint="inception_v3_2016_08_28.tar.gz", published_top1=78.0, published_top5=93.9,
                classifier_scopes=("InceptionV3/Logits", "InceptionV3/AuxLogits"),
                first_conv="InceptionV3/Conv2d_1a_3x3", min_image_size=107, sized_by_input=True)
def inception_v3(num_classes: int = 1001, **kwargs: Any) -> InceptionV3:
    """Inception V3 (slim nets/inception_v3.py, scope 'InceptionV3'); 299 px, 1001-class checkpoint."""
    _accepts("inception_v3", kwargs, _V3_ARGS)
    return InceptionV3(num_classes, **kwargs)


@register_model(default_image_size=299, preprocessing="inception", checkpoint_num_classes=1001, scope="InceptionV4",
                published_checkpoint="inception_v4_2016_09_09.tar.gz", published_top1=80.2, published_top5=95.2,
                classifier_scopes=("InceptionV4/Logits", "InceptionV4/AuxLogits"),
                first_conv="InceptionV4/Conv2d_1a_3x3", min_image_size=107, sized_by_input=True)
def inception_v4(num_classes: int = 1001, **kwargs: Any) -> InceptionV4:
    """Inception V4 (slim nets/inception_v4.py, scope 'InceptionV4'); 299 px, 1001-class checkpoint."""
    _accepts("inception_v4", kwargs, _V4_ARGS)
    return InceptionV4(num_classes, **kwargs)
