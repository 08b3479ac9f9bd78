"""NASNet-A and PNASNet-5 as research/slim builds them (nets/nasnet/nasnet.py, nasnet_utils.py, pnasnet.py).

Both families stack searched *cells*. A cell takes the previous output `net` and the one before it
(`prev_layer`), brings `prev_layer` to the cell's resolution and width (a factorized reduction when
the resolution differs, else a 1x1 conv when the width differs), runs `net` through relu + 1x1 +
`beginning_bn`, then five `comb_iter_k` blocks each add two operations (stacked separable convs,
SAME pools, identity) applied to earlier hidden states; the unused hidden states are concatenated.
A reduction cell (stride 2) strides only the operations that read the two original inputs.

slim builds these nets without an enclosing variable scope: the variables are `conv0/weights`,
`cell_stem_0/...`, `cell_0/comb_iter_0/left/separable_5x5_1/depthwise_weights`, `aux_7/aux_logits/...`,
`final_layer/FC/weights`; the torch modules sit at the top of the net under the same names.

Differences between the nets are slim's hyper-parameters (`NasNetConfig`): NASNet-A cifar / mobile /
large and PNASNet-5 mobile / large. Every field can be overridden by keyword (e.g. a reduced
`num_cells`), as slim's `config=` argument allows.

Training-only parts, as in slim: the auxiliary head (`AuxLogits`, built in slim only when
is_training) runs only in train mode, and drop path (`drop_path_keep_prob` < 1) scales each cell's
keep probability by its depth and linearly by training progress; the net learns the current step from
`set_training_step` (the training loop calls it before every step).

The auxiliary head ends in a conv whose kernel covers its whole input map, so its shape depends on
the image size (4x4 at 224, 6x6 at 331, 4x4 for cifar at 32): the `image_size` keyword (default the
net's default size) fixes it, like slim's graph built for one size.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..errors import ConfigError
from .base import SlimNet
from .depthwise_grad import depthwise_conv2d
from .layers import (AvgPool2d, BatchNorm, Conv2d, Linear, MaxPool2d, can_fold_batch_norm, concat_channels,
                     fold_batch_norm, folded_batch_norm, inference_cached, pad2d, reduce_mean_hw, same_padding,
                     truncated_normal_)
from .registry import register_model


@dataclass(frozen=True)
class NasNetConfig:
    """slim's HParams of one NASNet/PNASNet variant (cifar_config, mobile_imagenet_config, ...)."""

    stem_multiplier: float
    drop_path_keep_prob: float
    num_cells: int
    use_aux_head: int
    num_conv_filters: int
    dense_dropout_keep_prob: float
    filter_scaling_rate: float
    num_reduction_layers: int
    skip_reduction_layer_input: int
    total_training_steps: int
    use_bounded_activation: bool = False


NASNET_CIFAR = NasNetConfig(stem_multiplier=3.0, drop_path_keep_prob=0.6, num_cells=18, use_aux_head=1,
                            num_conv_filters=32, dense_dropout_keep_prob=1.0, filter_scaling_rate=2.0,
                            num_reduction_layers=2, skip_reduction_layer_input=0, total_training_steps=937500)
NASNET_MOBILE = NasNetConfig(stem_multiplier=1.0, drop_path_keep_prob=1.0, num_cells=12, use_aux_head=1,
                             num_conv_filters=44, dense_dropout_keep_prob=0.5, filter_scaling_rate=2.0,
                             num_reduction_layers=2, skip_reduction_layer_input=0, total_training_steps=250000)
NASNET_LARGE = NasNetConfig(stem_multiplier=3.0, drop_path_keep_prob=0.7, num_cells=18, use_aux_head=1,
                            num_conv_filters=168, dense_dropout_keep_prob=0.5, filter_scaling_rate=2.0,
                            num_reduction_layers=2, skip_reduction_layer_input=1, total_training_steps=250000)
PNASNET_MOBILE = NasNetConfig(stem_multiplier=1.0, drop_path_keep_prob=1.0, num_cells=9, use_aux_head=1,
                              num_conv_filters=54, dense_dropout_keep_prob=0.5, filter_scaling_rate=2.0,
                              num_reduction_layers=2, skip_reduction_layer_input=1, total_training_steps=250000)
PNASNET_LARGE = NasNetConfig(stem_multiplier=3.0, drop_path_keep_prob=0.6, num_cells=12, use_aux_head=1,
                             num_conv_filters=216, dense_dropout_keep_prob=0.5, filter_scaling_rate=2.0,
                             num_reduction_layers=2, skip_reduction_layer_input=1, total_training_steps=250000)

# Batch norm of each arg scope (all with scale=True): cifar's, and mobile/large's (pnasnet reuses those).
CIFAR_BATCH_NORM = {"decay": 0.9, "eps": 1e-5}
IMAGENET_BATCH_NORM = {"decay": 0.9997, "eps": 1e-3}
CLIP_BY_VALUE_CAP = 6.0


@dataclass(frozen=True)
class CellSpec:
    """The searched part of a cell: operations, which hidden states they read, which get used."""

    operations: tuple[str, ...]
    used_hiddenstates: tuple[int, ...]
    hiddenstate_indices: tuple[int, ...]


NASNET_A_NORMAL = CellSpec(
    ("separable_5x5_2", "separable_3x3_2", "separable_5x5_2", "separable_3x3_2", "avg_pool_3x3",
     "none", "avg_pool_3x3", "avg_pool_3x3", "separable_3x3_2", "none"),
    (1, 0, 0, 0, 0, 0, 0), (0, 1, 1, 1, 0, 1, 1, 1, 0, 0))
NASNET_A_REDUCTION = CellSpec(
    ("separable_5x5_2", "separable_7x7_2", "max_pool_3x3", "separable_7x7_2", "avg_pool_3x3",
     "separable_5x5_2", "none", "avg_pool_3x3", "separable_3x3_2", "max_pool_3x3"),
    (1, 1, 1, 0, 0, 0, 0), (0, 1, 0, 1, 0, 1, 3, 2, 2, 0))
PNASNET_5 = CellSpec(
    ("separable_5x5_2", "max_pool_3x3", "separable_7x7_2", "max_pool_3x3", "separable_5x5_2",
     "separable_3x3_2", "separable_3x3_2", "max_pool_3x3", "separable_3x3_2", "none"),
    (1, 1, 0, 0, 0, 0, 0), (1, 1, 0, 0, 0, 0, 4, 0, 1, 0))


def calc_reduction_layers(num_cells: int, num_reduction_layers: int) -> list[int]:
    """slim's nasnet_utils.calc_reduction_layers: the cell indices that get a reduction."""
    return [int(float(pool_num) / (num_reduction_layers + 1) * num_cells)
            for pool_num in range(1, num_reduction_layers + 1)]


def drop_path_keep_prob(drop_path_keep_prob: float, cell_num: int, total_num_cells: int, current_step: float,
                        total_training_steps: int) -> float:
    """slim's _apply_drop_path ('v3'): the keep probability of cell `cell_num` at `current_step`.

    The cell's depth scales the drop rate (layer_ratio = (cell_num + 1) / total_num_cells), then
    training progress does (min(1, current_step / total_training_steps)).
    """
    if drop_path_keep_prob >= 1.0:
        return 1.0
    layer_ratio = (cell_num + 1) / float(total_num_cells)
    keep = 1 - layer_ratio * (1 - drop_path_keep_prob)
    current_ratio = min(1.0, float(current_step) / total_training_steps)
    return 1 - current_ratio * (1 - keep)


def drop_path(x: Tensor, keep_prob: float) -> Tensor:
    """slim's nasnet_utils.drop_path: zero whole examples with probability 1 - keep_prob, scale the rest."""
    if keep_prob >= 1.0:
        return x
    mask = torch.floor(keep_prob + torch.rand((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device))
    return x * (1.0 / keep_prob) * mask


def _activation(x: Tensor, bounded: bool) -> Tensor:
    return F.relu6(x) if bounded else F.relu(x)


def _conv(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, padding: str = "SAME") -> Conv2d:
    """slim.conv2d under NASNet's arg scope: no bias, no activation (the BN is a separate scope)."""
    return Conv2d(in_channels, out_channels, kernel, stride, padding=padding, normalizer=None, activation=None,
                  bias=False)


class SeparableConv2d(nn.Module):
    """slim.separable_conv2d(num_outputs, depth_multiplier=1) without bias or activation: a 'SAME'
    depthwise conv (which carries the stride) then a 1x1 pointwise conv, as TF's separable_conv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.depthwise_weight = nn.Parameter(torch.empty(in_channels, 1, kernel_size, kernel_size))
        self.pointwise_weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Depthwise (TF 'SAME' padding, stride), then pointwise."""
        return F.conv2d(self._depthwise(x), self.pointwise_weight)

    def _depthwise(self, x: Tensor) -> Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = same_padding(x.shape[-1], self.kernel_size, self.stride)
        if top == bottom and left == right:
            padding: tuple[int, int] = (top, left)
        else:
            x, padding = pad2d(x, (left, right, top, bottom)), (0, 0)
        return depthwise_conv2d(x, self.depthwise_weight, (self.stride, self.stride), padding, (1, 1))

    def folded_forward(self, x: Tensor, norm: BatchNorm) -> Tensor:
        """norm(self(x)) at inference, `norm`'s moving statistics folded into the pointwise kernel
        (the BN is a separate slim scope, so the layer itself cannot own it)."""
        pointwise, bias = folded_batch_norm(self.pointwise_weight, None, norm)
        return F.conv2d(self._depthwise(x), pointwise, bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={self.kernel_size}, stride={self.stride}"


def _conv_bn(conv: nn.Module, norm: nn.Module, x: Tensor, activation: Optional[Callable[[Tensor], Tensor]] = None
             ) -> Tensor:
    """activation(norm(conv(x))) for NASNet's separately scoped conv + BN pairs; at inference the
    moving statistics go into the conv's kernel, saving a pass over the output; in training the BN
    and the activation run as one pass where batch_norm_act applies."""
    if not can_fold_batch_norm(norm):
        if isinstance(norm, BatchNorm):
            return norm.normalize_and_activate(conv(x), activation)
        x = norm(conv(x))
    elif isinstance(conv, SeparableConv2d):
        x = conv.folded_forward(x, norm)
    else:
        kernel, bias = folded_batch_norm(conv.weight, conv.bias, norm)
        x = conv.convolve(x, kernel, bias, normalize=False)
    return activation(x) if activation is not None else x


def _factorized_reduction_modules(owner: nn.Module, in_channels: int, out_channels: int, stride: int,
                                  norm: Any) -> None:
    """Add slim's factorized_reduction variables to `owner` (it has no scope of its own)."""
    if stride == 1:
        owner.path_conv = _conv(in_channels, out_channels)
        owner.path_bn = norm(out_channels)
        return
    owner.path1_conv = _conv(in_channels, out_channels // 2)
    # An odd number of filters gives the extra one to the second path.
    owner.path2_conv = _conv(in_channels, out_channels // 2 + out_channels % 2)
    owner.final_path_bn = norm(out_channels)


def _factorized_reduction(owner: nn.Module, x: Tensor, stride: int) -> Tensor:
    """slim's factorized_reduction: two 1x1/2 paths, the second shifted by one pixel, concatenated."""
    if stride == 1:
        return _conv_bn(owner.path_conv, owner.path_bn, x)
    even = x[:, :, ::2, ::2]
    if x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0:
        odd = x[:, :, 1::2, 1::2]
    else:
        # slim pads bottom/right and drops the first row and column: the odd pixels, then a zero row
        # and column at an odd end. Padding the odd pixels alone copies a quarter of the map.
        odd = x[:, :, 1::2, 1::2]
        odd = pad2d(odd, (0, even.shape[-1] - odd.shape[-1], 0, even.shape[-2] - odd.shape[-2]))
    norm = owner.final_path_bn
    if not can_fold_batch_norm(norm):
        return norm.normalize_and_activate(torch.cat([owner.path1_conv(even), owner.path2_conv(odd)], dim=1), None)
    # Inference: the BN over the concatenation folded into the two convs, each taking its channels.
    split = owner.path1_conv.out_channels

    def fold() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        kernel, bias = fold_batch_norm(torch.cat([owner.path1_conv.weight, owner.path2_conv.weight]), None, norm)
        return kernel[:split], bias[:split], kernel[split:], bias[split:]

    kernel1, bias1, kernel2, bias2 = inference_cached(
        norm, "fold_paths", (owner.path1_conv.weight, owner.path2_conv.weight, norm.weight, norm.bias,
                             norm.running_mean, norm.running_var), fold)
    return torch.cat([owner.path1_conv.convolve(even, kernel1, bias1, normalize=False),
                      owner.path2_conv.convolve(odd, kernel2, bias2, normalize=False)], dim=1)


def _parse_separable(operation: str) -> tuple[int, int]:
    """'separable_5x5_2' -> (kernel 5, 2 layers)."""
    parts = operation.split("_")
    kernel = int(parts[1].split("x")[0])
    layers = 1 if "x" in parts[-1] else int(parts[-1])
    return kernel, layers


class Operation(nn.Module):
    """One searched operation of a cell (slim's _apply_conv_operation) under `left` or `right`."""

    def __init__(self, operation: str, in_channels: int, filter_size: int, stride: int, bounded: bool,
                 norm: Any) -> None:
        super().__init__()
        self.operation, self.stride, self.bounded = operation, stride, bounded
        self.out_channels = filter_size
        self.projects = False
        if operation.startswith("separable"):
            kernel, layers = _parse_separable(operation)
            self._layer_names = []
            channels = in_channels
            for layer in range(1, layers + 1):
                conv, bn = f"separable_{kernel}x{kernel}_{layer}", f"bn_sep_{kernel}x{kernel}_{layer}"
                self.add_module(conv, SeparableConv2d(channels, filter_size, kernel, stride if layer == 1 else 1))
                self.add_module(bn, norm(filter_size))
                self._layer_names.append((conv, bn))
                channels = filter_size
        elif operation == "none":
            self.projects = stride > 1 or in_channels != filter_size
            if not self.projects:
                self.out_channels = in_channels
        elif "pool" in operation:
            kind, size = operation.split("_")[0], int(operation.split("_")[-1].split("x")[0])
            if kind not in ("avg", "max"):
                raise ConfigError(f"NASNet: unknown pooling {operation!r}")
            self.pool = (AvgPool2d if kind == "avg" else MaxPool2d)(size, stride, padding="SAME")
            self.projects = in_channels != filter_size
        else:
            raise ConfigError(f"NASNet: unknown operation {operation!r}")
        if self.projects:
            self.add_module("1x1", _conv(in_channels, filter_size, 1, stride if operation == "none" else 1))
            self.bn_1 = norm(filter_size)

    @property
    def reads_activated_input(self) -> bool:
        """True when the operation starts with the cell's activation (relu, or relu6 when bounded)."""
        if self.operation.startswith("separable"):
            return True
        if self.operation == "none":
            return self.bounded or self.projects
        return self.bounded

    def forward(self, x: Tensor, keep_prob: float, activated: Optional[Tensor] = None) -> Tensor:
        """Apply the operation, then drop path (every operation but 'none').

        `activated` is `_activation(x)` when the cell already has it: several operations of a cell
        read the same hidden state, and slim's graph optimizer computes its ReLU once as well.
        """
        bounded = self.bounded
        if self.reads_activated_input:
            x = activated if activated is not None else _activation(x, bounded)
        if self.operation.startswith("separable"):
            # Every layer but the last is followed by the activation that starts the next one.
            inner_activation = F.relu6 if bounded else F.relu
            for layer, (conv, bn) in enumerate(self._layer_names):
                last = layer == len(self._layer_names) - 1
                x = _conv_bn(self._modules[conv], self._modules[bn], x, None if last else inner_activation)
            if bounded:
                x = x.clamp(-CLIP_BY_VALUE_CAP, CLIP_BY_VALUE_CAP)
        elif self.operation == "none":
            if self.projects:
                x = _conv_bn(self._modules["1x1"], self.bn_1, x)
                if bounded:
                    x = x.clamp(-CLIP_BY_VALUE_CAP, CLIP_BY_VALUE_CAP)
        else:
            x = self.pool(x)
            if self.projects:
                x = _conv_bn(self._modules["1x1"], self.bn_1, x)
            if bounded:
                x = x.clamp(-CLIP_BY_VALUE_CAP, CLIP_BY_VALUE_CAP)
        if self.operation != "none" and self.training:
            x = drop_path(x, keep_prob)
        return x


class Cell(nn.Module):
    """slim's NasNetABaseCell (NASNet-A normal/reduction, PNASNet-5) under its scope.

    Shapes are planned at construction: `in_level`/`prev_level` count the stride-2 reductions
    before the inputs, so that the variables (factorized reduction or prev_1x1) are slim's.
    """

    def __init__(self, spec: CellSpec, in_channels: int, in_level: int, prev_channels: Optional[int],
                 prev_level: Optional[int], filter_size: int, stride: int, cell_num: int, bounded: bool,
                 norm: Any) -> None:
        super().__init__()
        self.spec, self.stride, self.cell_num, self.bounded = spec, stride, cell_num, bounded
        self.filter_size = filter_size
        # _reduce_prev_layer: without a previous layer, the cell's input stands in for it.
        self.prev_mode = "same"
        if prev_channels is None:
            prev_channels, prev_level = in_channels, in_level
            self.prev_mode = "input"
        elif prev_level != in_level:
            if prev_level != in_level - 1:
                raise ConfigError(f"NASNet: a cell's previous input is {in_level - prev_level} reductions back")
            _factorized_reduction_modules(self, prev_channels, filter_size, 2, norm)
            prev_channels, prev_level = filter_size, in_level
            self.prev_mode = "reduce"
        elif prev_channels != filter_size:
            self.add_module("prev_1x1", _conv(prev_channels, filter_size))
            self.prev_bn = norm(filter_size)
            prev_channels = filter_size
            self.prev_mode = "project"
        # _cell_base.
        self.add_module("1x1", _conv(in_channels, filter_size))
        self.beginning_bn = norm(filter_size)
        channels = [filter_size, prev_channels]
        levels = [in_level, prev_level]
        ops, indices = spec.operations, spec.hiddenstate_indices
        for iteration in range(5):
            block = nn.Module()
            level = None
            for side, position in (("left", 2 * iteration), ("right", 2 * iteration + 1)):
                index = indices[position]
                op_stride = stride if index < 2 else 1
                operation = Operation(ops[position], channels[index], filter_size, op_stride, bounded, norm)
                block.add_module(side, operation)
                side_level = levels[index] + (1 if op_stride > 1 else 0)
                if level is not None and side_level != level:
                    raise ConfigError("NASNet: a combination adds maps of different resolutions")
                level = side_level
            self.add_module(f"comb_iter_{iteration}", block)
            channels.append(filter_size)
            levels.append(level)
        # _combine_unused_states.
        output = nn.Module()
        self._reductions: dict[int, int] = {}
        final_channels, final_level = channels[-1], levels[-1]
        out_channels = 0
        for index, used in enumerate(spec.used_hiddenstates):
            if used:
                continue
            if final_channels != channels[index] or final_level != levels[index]:
                reduce_stride = 2 if final_level != levels[index] else 1
                scope = nn.Module()
                _factorized_reduction_modules(scope, channels[index], final_channels, reduce_stride, norm)
                output.add_module(f"reduction_{index}", scope)
                self._reductions[index] = reduce_stride
                channels[index] = final_channels
            out_channels += channels[index]
        self.cell_output = output
        self.out_channels, self.out_level = out_channels, final_level

    def forward(self, net: Tensor, prev: Optional[Tensor], keep_prob: float,
                activations: Optional[ActivationCache] = None) -> Tensor:
        """Run the cell on its input and the previous cell's output (None for the first stem cell).

        `activations` holds the activations of cell outputs already computed in this forward: every
        cell output is read, activated, by the next two cells (as their input and as their previous
        layer), and slim's graph optimizer computes that activation once as well."""
        bounded = self.bounded

        def activate_input(x: Tensor) -> Tensor:
            if activations is None:
                return _activation(x, bounded)
            hit = activations.get(id(x))
            if hit is None or hit[0] is not x:
                hit = activations[id(x)] = (x, _activation(x, bounded))
            return hit[1]

        if self.prev_mode == "input" or prev is None:
            prev = net
        elif self.prev_mode == "reduce":
            if prev.shape[-1] == net.shape[-1]:
                raise ConfigError(f"NASNet: the input is too small (a {net.shape[-1]}-pixel map no longer halves)")
            prev = _factorized_reduction(self, activate_input(prev), 2)
        elif self.prev_mode == "project":
            prev = _conv_bn(self._modules["prev_1x1"], self.prev_bn, activate_input(prev))
        activated_net = activate_input(net)
        hidden = [_conv_bn(self._modules["1x1"], self.beginning_bn, activated_net), prev]
        # Hidden state index -> its activation, computed once however many operations read it.
        activated: dict[int, Tensor] = {}

        def run(operation: Operation, index: int) -> Tensor:
            if not operation.reads_activated_input:
                return operation(hidden[index], keep_prob)
            if index not in activated:  # state 1 may be a cell output (or the input) read elsewhere too
                activated[index] = activate_input(hidden[index]) if index == 1 else _activation(hidden[index], bounded)
            return operation(hidden[index], keep_prob, activated[index])

        indices = self.spec.hiddenstate_indices
        for iteration in range(5):
            block = self._modules[f"comb_iter_{iteration}"]
            left = run(block.left, indices[2 * iteration])
            right = run(block.right, indices[2 * iteration + 1])
            combined = left + right
            if bounded:
                combined = F.relu6(combined)
            hidden.append(combined)
        for index, reduce_stride in self._reductions.items():
            hidden[index] = _factorized_reduction(self.cell_output._modules[f"reduction_{index}"], hidden[index],
                                                  reduce_stride)
        return concat_channels([h for h, used in zip(hidden, self.spec.used_hiddenstates) if not used])


#: id(cell output) -> (that output, its activation), for the outputs the next cells still read.
ActivationCache = dict[int, tuple[Tensor, Tensor]]


@contextmanager
def _frozen_batch_norm_statistics(module: nn.Module) -> Iterator[None]:
    """Keep BN moving statistics unchanged (decay 1) while a checkpointed cell is recomputed."""
    norms = [m for m in module.modules() if isinstance(m, BatchNorm)]
    decays = [m.decay for m in norms]
    for m in norms:
        m.decay = 1.0
    try:
        yield
    finally:
        for m, decay in zip(norms, decays):
            m.decay = decay


def _run_checkpointed(cell: Cell, net: Tensor, prev: Optional[Tensor], keep_prob: float) -> Tensor:
    """Run `cell` keeping only its inputs for backward; recompute it there (same drop-path draws:
    the RNG state is restored; the moving statistics are updated once, not twice)."""
    calls = [0]

    def run(net: Tensor, prev: Optional[Tensor]) -> Tensor:
        calls[0] += 1
        if calls[0] == 1:
            return cell(net, prev, keep_prob)
        with _frozen_batch_norm_statistics(cell):
            return cell(net, prev, keep_prob)

    return _checkpoint(run, net, prev, use_reentrant=False, preserve_rng_state=True)


def _spatial_after(size: int, reductions: int) -> int:
    for _ in range(reductions):
        size = -(-size // 2)
    return size


class NASNet(SlimNet):
    """slim's NASNet-A (build_nasnet_cifar / _mobile / _large) and PNASNet-5 (build_pnasnet_*).

    `kind` is 'nasnet' or 'pnasnet', `stem` 'imagenet' or 'cifar'; `config` is slim's HParams and
    any of its fields may be overridden by keyword. `image_size` sizes the auxiliary head's conv
    (its kernel covers its input map). `gradient_checkpointing=True` recomputes each cell in backward
    instead of keeping its activations (same gradients, far less memory for the large nets).
    """

    scope = ""  # slim's NASNet variables have no enclosing net scope
    classifier_scope = "final_layer/FC"

    def __init__(self, num_classes: int, kind: str, stem: str, config: NasNetConfig, batch_norm: dict,
                 default_image_size: int, image_size: Optional[int] = None, in_channels: int = 3,
                 gradient_checkpointing: bool = False, **overrides: Any) -> None:
        super().__init__(num_classes)
        names = {f.name for f in fields(NasNetConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"{kind}: unknown option(s) {unknown}; slim's hyper-parameters are {sorted(names)}")
        config = replace(config, **overrides)
        if config.num_cells < 1 or config.num_conv_filters < 1:
            raise ConfigError(f"{kind}: num_cells and num_conv_filters must be >= 1")
        if not 0.0 < config.drop_path_keep_prob <= 1.0 or not 0.0 < config.dense_dropout_keep_prob <= 1.0:
            raise ConfigError(f"{kind}: keep probabilities must be in (0, 1]")
        self.kind, self.stem_type, self.config = kind, stem, config
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.image_size = int(image_size or default_image_size)
        self.training_step = 0
        bounded = bool(config.use_bounded_activation)
        self.bounded = bounded
        norm_settings = dict(batch_norm)

        def norm(channels: int) -> BatchNorm:
            return BatchNorm(channels, eps=norm_settings["eps"], decay=norm_settings["decay"], scale=True)

        self._norm = norm
        reduction_indices = calc_reduction_layers(config.num_cells, config.num_reduction_layers)
        self.reduction_indices = reduction_indices
        # total_num_cells for drop path: the normal cells, + 2 for the reduction cells (NASNet), + 2
        # for the ImageNet stem cells; PNASNet counts its cells plus the two stem cells.
        if kind == "pnasnet":
            self.total_num_cells = config.num_cells + 2
        else:
            self.total_num_cells = config.num_cells + 2 + (2 if stem == "imagenet" else 0)
        normal_spec = PNASNET_5 if kind == "pnasnet" else NASNET_A_NORMAL
        reduction_spec = PNASNET_5 if kind == "pnasnet" else NASNET_A_REDUCTION

        def filters(scaling: float) -> int:
            return int(config.num_conv_filters * scaling)

        # outputs: (channels, level) of slim's cell_outputs list; steps: how to run each cell.
        self._steps: list[tuple[str, str, int, Optional[int]]] = []   # (module, end point, cell_num, prev index)
        if stem == "imagenet":
            stem_filters = int(32 * config.stem_multiplier)
            self.conv0 = _conv(in_channels, stem_filters, 3, 2, padding="VALID")
            self.conv0_bn = norm(stem_filters)
            outputs: list[Optional[tuple[int, int]]] = [None, (stem_filters, 1)]
            scaling = 1.0 / config.filter_scaling_rate ** 2
            for cell_num in range(2):
                self._add_cell(f"cell_stem_{cell_num}", "", reduction_spec, outputs, len(outputs) - 2,
                               filters(scaling), 2, cell_num, bounded, norm)
                scaling *= config.filter_scaling_rate
            true_cell_num = 2
        elif stem == "cifar":
            stem_filters = int(config.num_conv_filters * config.stem_multiplier)
            self.l1_stem_3x3 = _conv(in_channels, stem_filters, 3)
            self.l1_stem_bn = norm(stem_filters)
            outputs = [None, (stem_filters, 0)]
            true_cell_num = 0
        else:
            raise ConfigError(f"{kind}: unknown stem {stem!r}")
        self._stem_outputs = len(outputs)
        self.aux_cell = reduction_indices[1] - 1 if len(reduction_indices) >= 2 else None
        self._aux_after_step: Optional[int] = None
        self._aux_level = 0
        self._aux_channels = 0
        scaling = 1.0
        prev_index: Optional[int] = None
        for cell_num in range(config.num_cells):
            if kind == "pnasnet":
                is_reduction = cell_num in reduction_indices
                if is_reduction:
                    scaling *= config.filter_scaling_rate
                if config.skip_reduction_layer_input or not is_reduction:
                    prev_index = len(outputs) - 2
                self._add_cell(f"cell_{cell_num}", f"Cell_{cell_num}", normal_spec, outputs, prev_index,
                               filters(scaling), 2 if is_reduction else 1, true_cell_num, bounded, norm)
            else:
                if config.skip_reduction_layer_input:
                    prev_index = len(outputs) - 2
                if cell_num in reduction_indices:
                    scaling *= config.filter_scaling_rate
                    k = reduction_indices.index(cell_num)
                    self._add_cell(f"reduction_cell_{k}", f"Reduction_Cell_{k}", reduction_spec, outputs,
                                   len(outputs) - 2, filters(scaling), 2, true_cell_num, bounded, norm)
                    true_cell_num += 1
                if not config.skip_reduction_layer_input:
                    prev_index = len(outputs) - 2
                self._add_cell(f"cell_{cell_num}", f"Cell_{cell_num}", normal_spec, outputs, prev_index,
                               filters(scaling), 1, true_cell_num, bounded, norm)
            true_cell_num += 1
            if cell_num == self.aux_cell and config.use_aux_head:
                self._aux_after_step = len(self._steps) - 1
                self._aux_channels, self._aux_level = outputs[-1]
        self.num_features, self._final_level = outputs[-1]
        # The smallest input whose every reduction still halves the map (else slim builds other variables).
        self.min_image_size = self._min_image_size()
        self.dropout = nn.Dropout(1.0 - config.dense_dropout_keep_prob) if config.dense_dropout_keep_prob < 1 else None
        self._build_classifier(self.num_classes)
        self.apply(_init_weights)

    # Construction helpers -----------------------------------------------------------------
    def _add_cell(self, name: str, end_point: str, spec: CellSpec, outputs: list, prev_index: Optional[int],
                  filter_size: int, stride: int, cell_num: int, bounded: bool, norm: Any) -> None:
        in_channels, in_level = outputs[-1]
        prev = outputs[prev_index] if prev_index is not None else None
        cell = Cell(spec, in_channels, in_level, prev[0] if prev else None, prev[1] if prev else None,
                    filter_size, stride, cell_num, bounded, norm)
        self.add_module(name, cell)
        self._steps.append((name, end_point, cell_num, prev_index))
        outputs.append((cell.out_channels, cell.out_level))

    def _level_size(self, size: int, level: int) -> int:
        if self.stem_type == "imagenet":
            size = (size - 3) // 2 + 1
            return _spatial_after(size, level - 1)
        return _spatial_after(size, level)

    def _min_image_size(self) -> int:
        smallest = 3 if self.stem_type == "imagenet" else 1
        size = smallest
        while self._level_size(size, max(self._final_level - 1, 0)) < 2 and self._final_level > 0:
            size += 1
        return size

    def _aux_kernel(self) -> int:
        size = self._level_size(self.image_size, self._aux_level)
        if size < 5:
            raise ConfigError(f"{self.kind}: the auxiliary head needs a map of at least 5x5 but image_size "
                              f"{self.image_size} gives {size}x{size}; use a larger image_size or use_aux_head=0")
        return (size - 5) // 3 + 1

    def _build_classifier(self, num_classes: int) -> None:
        """final_layer/FC and, with an aux head, aux_<k>/aux_logits (proj, Conv, FC) for num_classes > 0."""
        self.final_layer = nn.Module()
        aux_name = f"aux_{self.aux_cell}"
        if num_classes:
            self.final_layer.FC = Linear(self.num_features, num_classes, activation=None, bias=True)
            _init_weights(self.final_layer.FC)
        if self._aux_after_step is None or not num_classes:
            if hasattr(self, aux_name):
                delattr(self, aux_name)
            self.classifier_scopes = ("final_layer/FC",) if num_classes else ()
            return
        if not hasattr(self, aux_name):
            kernel = self._aux_kernel()
            head = nn.Module()
            head.proj = _conv(self._aux_channels, 128, 1)
            head.aux_bn0 = self._norm(128)
            head.Conv = _conv(128, 768, kernel, padding="VALID")
            head.aux_bn1 = self._norm(768)
            scope = nn.Module()
            scope.aux_logits = head
            self.add_module(aux_name, scope)
            scope.apply(_init_weights)
        head = getattr(self, aux_name).aux_logits
        head.FC = Linear(768, num_classes, activation=None, bias=True)
        _init_weights(head.FC)
        self.classifier_scopes = ("final_layer/FC", f"{aux_name}/aux_logits/FC")

    # Training step -----------------------------------------------------------------------------
    def cell_keep_prob(self, cell_num: int) -> float:
        """The drop-path keep probability of cell `cell_num` at the current training step."""
        return drop_path_keep_prob(self.config.drop_path_keep_prob, cell_num, self.total_num_cells,
                                   self.training_step, self.config.total_training_steps)

    # The two hooks ------------------------------------------------------------------------------
    def _forward_features(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """Stem, then the cells in slim's order; AuxLogits (train mode only, as slim) after its cell."""
        if x.shape[-1] < self.min_image_size or x.shape[-2] < self.min_image_size:
            raise ConfigError(f"{self.kind}: input {x.shape[-2]}x{x.shape[-1]} is smaller than the "
                              f"{self.min_image_size}x{self.min_image_size} this net accepts")
        if self.stem_type == "imagenet":
            net = _conv_bn(self.conv0, self.conv0_bn, x)
        else:
            net = _conv_bn(self.l1_stem_3x3, self.l1_stem_bn, x)
        outputs: list[Optional[Tensor]] = [None, net]
        stem_done = self.stem_type != "imagenet"
        if stem_done:
            end_points["Stem"] = net
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        activations: ActivationCache = {}
        for step_index, (name, end_point, cell_num, prev_index) in enumerate(self._steps):
            cell = self._modules[name]
            prev = outputs[prev_index] if prev_index is not None else None
            keep = self.cell_keep_prob(cell_num) if self.training else 1.0
            if checkpointing:
                net = _run_checkpointed(cell, net, prev, keep)
            else:
                net = cell(net, prev, keep, activations)
                # Keep the activations of the two latest outputs only: the next cells read no others.
                live = (id(net), id(outputs[-1]))
                activations = {key: value for key, value in activations.items() if key in live}
            outputs.append(net)
            if not end_point:
                if name == "cell_stem_1":
                    end_points["Stem"] = net
                continue
            end_points[end_point] = net
            if step_index == self._aux_after_step and self.training and self.num_classes:
                end_points["AuxLogits"] = self._aux_head(_activation(net, self.bounded))
        return net

    def _aux_head(self, x: Tensor) -> Tensor:
        head = self._modules[f"aux_{self.aux_cell}"].aux_logits
        x = F.avg_pool2d(x, 5, 3)
        x = _activation(head.aux_bn0(head.proj(x)), self.bounded)
        kernel = head.Conv.kernel_size
        if tuple(x.shape[-2:]) != kernel:
            raise ConfigError(f"{self.kind}: the auxiliary head was built for image_size {self.image_size} "
                              f"(a {kernel[0]}x{kernel[1]} map) but gets a {x.shape[-2]}x{x.shape[-1]} map; "
                              "build the net with image_size set to the training size")
        x = _activation(head.aux_bn1(head.Conv(x)), self.bounded)
        return head.FC(x.flatten(1))

    def _forward_head(self, features: Tensor, end_points: "OrderedDict[str, Tensor]",
                      pre_logits: bool = False) -> Tensor:
        """final_layer: activation, global average pool, dropout, FC, softmax."""
        net = end_points["global_pool"] = reduce_mean_hw(_activation(features, self.bounded), keepdim=False)
        if pre_logits or not self.num_classes:
            return net
        if self.dropout is not None:
            net = self.dropout(net)
        logits = end_points["Logits"] = self.final_layer.FC(net)
        end_points["Predictions"] = torch.softmax(logits, dim=1)
        return logits


def _init_weights(module: nn.Module) -> None:
    """slim's variance_scaling_initializer(mode='FAN_OUT'): truncated normal, stddev sqrt(1.3 * 2 / fan_out)."""
    def fill(tensor: Tensor, fan_out: int) -> None:
        truncated_normal_(tensor, math.sqrt(1.3 * 2.0 / max(fan_out, 1)))

    if isinstance(module, SeparableConv2d):
        fill(module.depthwise_weight, module.kernel_size * module.kernel_size)
        fill(module.pointwise_weight, module.out_channels)
    elif isinstance(module, Conv2d):
        kernel = module.weight
        fill(kernel, kernel.shape[0] * kernel.shape[2] * kernel.shape[3])
    elif isinstance(module, Linear):
        fill(module.weight, module.weight.shape[0])


def _register(name: str, kind: str, stem: str, config: NasNetConfig, batch_norm: dict, size: int, classes: int,
              preprocessing: str, published: Optional[str], top1: Optional[float], top5: Optional[float],
              min_size: int):
    def build(num_classes: int = classes, **kwargs: Any) -> NASNet:
        return NASNet(num_classes, kind, stem, config, batch_norm, size, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{'PNASNet-5' if kind == 'pnasnet' else 'NASNet-A'} {name.split('_')[1]} "
                     f"(slim nets/nasnet/{kind}.py, no net scope); {preprocessing} preprocessing at {size}, "
                     f"{classes}-class checkpoints.")
    aux_cell = calc_reduction_layers(config.num_cells, config.num_reduction_layers)[1] - 1
    return register_model(name, default_image_size=size, preprocessing=preprocessing, checkpoint_num_classes=classes,
                          scope="", published_checkpoint=published, sized_by_input=True,
                          classifier_scopes=("final_layer/FC", f"aux_{aux_cell}/aux_logits/FC"), first_conv="l1_stem_3x3" if stem == "cifar" else "conv0",
                          published_top1=top1, published_top5=top5, min_image_size=min_size)(build)


# slim's model zoo table (research/slim/README.md): checkpoints and ImageNet top-1 / top-5.
nasnet_cifar = _register("nasnet_cifar", "nasnet", "cifar", NASNET_CIFAR, CIFAR_BATCH_NORM, 32, 10, "cifarnet",
                         None, None, None, 3)
nasnet_mobile = _register("nasnet_mobile", "nasnet", "imagenet", NASNET_MOBILE, IMAGENET_BATCH_NORM, 224, 1001,
                          "inception", "nasnet-a_mobile_04_10_2017.tar.gz", 74.0, 91.6, 19)
nasnet_large = _register("nasnet_large", "nasnet", "imagenet", NASNET_LARGE, IMAGENET_BATCH_NORM, 331, 1001,
                         "inception", "nasnet-a_large_04_10_2017.tar.gz", 82.7, 96.2, 19)
pnasnet_mobile = _register("pnasnet_mobile", "pnasnet", "imagenet", PNASNET_MOBILE, IMAGENET_BATCH_NORM, 224, 1001,
                           "inception", "pnasnet-5_mobile_2017_12_13.tar.gz", 74.2, 91.9, 19)
pnasnet_large = _register("pnasnet_large", "pnasnet", "imagenet", PNASNET_LARGE, IMAGENET_BATCH_NORM, 331, 1001,
                          "inception", "pnasnet-5_large_2017_12_13.tar.gz", 82.9, 96.2, 19)
