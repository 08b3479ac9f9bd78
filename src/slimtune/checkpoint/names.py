"""slim variable names <-> torch parameter names, and TF <-> torch tensor layouts (the one place).

The naming contract: a torch parameter path is the slim variable name with '/' -> '.' and the
leaf renamed (weights -> weight, biases -> bias, depthwise_weights -> depthwise_weight, BatchNorm
gamma/beta/moving_mean/moving_variance -> weight/bias/running_mean/running_var).

Layouts: TF stores conv kernels HWIO, depthwise kernels [H, W, C, M], dense kernels [in, out];
torch wants OIHW, [C*M, 1, H, W] and [out, in]. A dense kernel restored into a conv (or back) is
reshaped when the element counts agree: the TF side flattens in HWC order (NHWC activations), the
torch side in CHW order (NCHW activations), so the conversion goes through the 4-D kernel.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import numpy as np

# slim leaf -> torch leaf. gamma/beta map onto a norm module's weight/bias.
_SLIM_TO_TORCH_LEAF = {
    "weights": "weight",
    "biases": "bias",
    "depthwise_weights": "depthwise_weight",
    "pointwise_weights": "pointwise_weight",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}
_TORCH_TO_SLIM_LEAF = {
    "weight": "weights",
    "bias": "biases",
    "depthwise_weight": "depthwise_weights",
    "pointwise_weight": "pointwise_weights",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}
_TORCH_TO_SLIM_NORM_LEAF = {"weight": "gamma", "bias": "beta"}

# A scope that holds a normalization layer: slim's `BatchNorm`, NASNet's `beginning_bn` /
# `bn_sep_3x3_1`, torch-style `bn1`, and the other norm layers' default scopes.
# slim's ResNet v2 names its standalone batch norms `preact` and `postnorm` (no BatchNorm scope).
_NORM_SCOPE = re.compile(r"BatchNorm|LayerNorm|GroupNorm|InstanceNorm|(^|_)bn(\d+)?(_|$)|^preact$|^postnorm$",
                         re.IGNORECASE)

# Suffixes that are not part of a variable's name: TF's output index and TF2's object-graph path.
_TENSOR_SUFFIXES = (":0", "/.ATTRIBUTES/VARIABLE_VALUE")
# Wrappers that torch adds in front of (or inside) parameter paths.
_WRAPPER_PREFIX = "module."
_COMPILE_COMPONENT = "_orig_mod."

DEPTHWISE_LEAVES = frozenset({"depthwise_weights", "depthwise_weight", "depthwise_kernel"})


def strip_tensor_suffix(name: str) -> str:
    """Drop ':0' and TF2's '/.ATTRIBUTES/VARIABLE_VALUE' from a checkpoint tensor name."""
    for suffix in _TENSOR_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def strip_wrappers(name: str) -> str:
    """Remove DataParallel/DDP's leading 'module.' and torch.compile's '_orig_mod.' components."""
    while name.startswith(_WRAPPER_PREFIX):
        name = name[len(_WRAPPER_PREFIX):]
    if _COMPILE_COMPONENT in name:
        name = ".".join(part for part in name.split(".") if part != "_orig_mod")
    return name


def is_norm_scope(scope_component: str) -> bool:
    """True when a scope name looks like a normalization layer (BatchNorm, bn1, beginning_bn...)."""
    return bool(_NORM_SCOPE.search(scope_component))


def slim_to_torch(name: str) -> str:
    """'vgg_16/fc8/weights:0' -> 'vgg_16.fc8.weight' (names without '/' come back unchanged)."""
    name = strip_tensor_suffix(name)
    if "/" not in name:
        return name
    parts = name.split("/")
    parts[-1] = _SLIM_TO_TORCH_LEAF.get(parts[-1], parts[-1])
    return ".".join(parts)


def torch_to_slim(name: str, is_norm: Optional[bool] = None) -> str:
    """'vgg_16.fc8.weight' -> 'vgg_16/fc8/weights'; a norm layer's weight/bias -> gamma/beta.

    `is_norm` says whether the parameter belongs to a normalization module; None guesses it from
    the parent scope's name (`BatchNorm`, `*_bn`, `bn*`), which is exact for slimtune's nets.
    """
    name = strip_wrappers(name)
    if "." not in name:
        return name
    parts = name.split(".")
    leaf = parts[-1]
    if is_norm is None:
        is_norm = len(parts) > 1 and is_norm_scope(parts[-2])
    if is_norm and leaf in _TORCH_TO_SLIM_NORM_LEAF:
        parts[-1] = _TORCH_TO_SLIM_NORM_LEAF[leaf]
    else:
        parts[-1] = _TORCH_TO_SLIM_LEAF.get(leaf, leaf)
    return "/".join(parts)


def leaf_of(name: str) -> str:
    """The last component of a name in either spelling, without ':0'."""
    return re.split(r"[/.]", strip_tensor_suffix(name))[-1]


# ---------------------------------------------------------------------------------------------
# Layouts. Each conversion is a permutation and/or reshape, computed once for the shapes and then
# applied to the data, so shape-only callers (the automatic mapping) never touch tensor data.


def _is_depthwise(name: str) -> bool:
    return leaf_of(name) in DEPTHWISE_LEAVES


def _product(shape: Sequence[int]) -> int:
    return int(math.prod(shape)) if shape else 1


class _Layout:
    """A conversion: optional reshape before, optional permutation, optional reshape after."""

    def __init__(self, before: Optional[tuple[int, ...]] = None, axes: Optional[tuple[int, ...]] = None,
                 after: Optional[tuple[int, ...]] = None) -> None:
        self.before, self.axes, self.after = before, axes, after

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        if self.before is not None:
            shape = self.before
        if self.axes is not None:
            shape = tuple(shape[a] for a in self.axes)
        if self.after is not None:
            shape = self.after
        return shape

    def apply(self, array: Any) -> Any:
        if self.before is not None:
            array = array.reshape(self.before)
        if self.axes is not None:
            array = array.permute(*self.axes) if hasattr(array, "permute") else array.transpose(self.axes)
        if self.after is not None:
            array = array.reshape(self.after)
        return array


def _tf_to_torch_layout(name: str, shape: Sequence[int], target_shape: Optional[Sequence[int]]) -> _Layout:
    shape = tuple(int(s) for s in shape)
    target = tuple(int(s) for s in target_shape) if target_shape is not None else None
    ndim = len(shape)
    if ndim <= 1:
        return _Layout()
    if ndim == 2:
        natural = _Layout(axes=(1, 0))
        # A dense [in, out] kernel restored into a conv [O, I, H, W]: `in` is HWC-flattened.
        if target is not None and len(target) == 4 and natural.shape(shape) != target:
            out, i, h, w = target
            if shape[1] == out and shape[0] == i * h * w:
                return _Layout(before=(h, w, i, out), axes=(3, 2, 0, 1))
        return natural
    if ndim == 3:  # conv1d [W, I, O] -> [O, I, W]
        return _Layout(axes=(2, 1, 0))
    if ndim == 4:
        h, w, c, m = shape
        depthwise = _Layout(axes=(2, 3, 0, 1), after=(c * m, 1, h, w))
        regular = _Layout(axes=(3, 2, 0, 1))
        first, second = (depthwise, regular) if _is_depthwise(name) else (regular, depthwise)
        if target is None or first.shape(shape) == target:
            return first
        if second.shape(shape) == target:
            return second
        # A conv kernel (1x1 or kxk) restored into a dense [out, in]: torch flattens CHW.
        if len(target) == 2 and target[0] == m and target[1] == h * w * c:
            return _Layout(axes=(3, 2, 0, 1), after=target)
        return first
    if ndim == 5:  # conv3d [T, H, W, I, O] -> [O, I, T, H, W]
        return _Layout(axes=(4, 3, 0, 1, 2))
    return _Layout()


def _torch_to_tf_layout(name: str, shape: Sequence[int], target_shape: Optional[Sequence[int]]) -> _Layout:
    shape = tuple(int(s) for s in shape)
    target = tuple(int(s) for s in target_shape) if target_shape is not None else None
    ndim = len(shape)
    if ndim <= 1:
        return _Layout()
    if ndim == 2:
        natural = _Layout(axes=(1, 0))
        # A torch dense [out, C*H*W] written into a TF conv kernel [H, W, I, O].
        if target is not None and len(target) == 4 and natural.shape(shape) != target:
            h, w, i, out = target
            if shape[0] == out and shape[1] == i * h * w:
                return _Layout(before=(out, i, h, w), axes=(2, 3, 1, 0))
        return natural
    if ndim == 3:
        return _Layout(axes=(2, 1, 0))
    if ndim == 4:
        out, i, h, w = shape
        regular = _Layout(axes=(2, 3, 1, 0))
        if target is not None and len(target) == 2:
            if target[1] == out and target[0] == h * w * i:
                return _Layout(axes=(2, 3, 1, 0), after=target)
            return regular
        if i == 1 and (_is_depthwise(name) or (target is not None and regular.shape(shape) != target)):
            multiplier = target[3] if target is not None and len(target) == 4 else 1
            if multiplier > 0 and out % multiplier == 0:
                channels = out // multiplier
                return _Layout(before=(channels, multiplier, h, w), axes=(2, 3, 0, 1))
        return regular
    if ndim == 5:
        return _Layout(axes=(2, 3, 4, 1, 0))
    return _Layout()


def tf_to_torch_shape(name: str, shape: Sequence[int], target_shape: Optional[Sequence[int]] = None) -> tuple[int, ...]:
    """The torch-layout shape `tf_to_torch_array` would produce, without touching data."""
    return _tf_to_torch_layout(name, shape, target_shape).shape(shape)


def tf_to_torch_array(name: str, array: Any, target_shape: Optional[Sequence[int]] = None) -> Any:
    """Convert a TF-layout tensor (HWIO, [H,W,C,M], [in,out]) to torch layout.

    `name` (either spelling) tells depthwise kernels apart; `target_shape` (the torch tensor the
    value goes into) picks dense<->conv reshapes and resolves depthwise vs regular when the name
    cannot. Works on numpy arrays and torch tensors; returns the same kind.
    """
    return _tf_to_torch_layout(name, array.shape, target_shape).apply(array)


def torch_to_tf_shape(name: str, shape: Sequence[int], target_shape: Optional[Sequence[int]] = None) -> tuple[int, ...]:
    """The TF-layout shape `torch_to_tf_array` would produce, without touching data."""
    return _torch_to_tf_layout(name, shape, target_shape).shape(shape)


def torch_to_tf_array(name: str, array: Any, target_shape: Optional[Sequence[int]] = None) -> Any:
    """Convert a torch-layout tensor back to TF layout (the exact inverse of `tf_to_torch_array`).

    A depthwise kernel [C*M, 1, H, W] needs `target_shape` [H, W, C, M] to know M when M > 1
    (slim's published nets all use M = 1, the default).
    """
    return _torch_to_tf_layout(name, array.shape, target_shape).apply(array)


def fit_torch_array(array: Any, target_shape: Sequence[int]) -> Any:
    """Reshape a torch-layout tensor into `target_shape` when only dense vs conv differ.

    [out, C*H*W] <-> [out, C, H, W] (the same output count, the same number of elements); any
    other difference is returned unchanged for the caller to report.
    """
    target = tuple(int(s) for s in target_shape)
    shape = tuple(array.shape)
    if shape == target or len(shape) < 2 or len(target) < 2:
        return array
    if {len(shape), len(target)} <= {2, 4} and shape[0] == target[0] and _product(shape) == _product(target):
        return array.reshape(target)
    return array


def fit_torch_shape(shape: Sequence[int], target_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape `fit_torch_array` would produce."""
    shape = tuple(int(s) for s in shape)
    target = tuple(int(s) for s in target_shape)
    if shape == target or len(shape) < 2 or len(target) < 2:
        return shape
    if {len(shape), len(target)} <= {2, 4} and shape[0] == target[0] and _product(shape) == _product(target):
        return target
    return shape


def as_numpy(value: Any) -> np.ndarray:
    """A numpy view of a checkpoint value (numpy array, torch tensor or array-like)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def adapt_input_channels(kernel: Any, in_chans: int) -> Any:
    """A first-conv kernel (torch layout, input channels on axis 1) adapted to `in_chans` inputs.

    timm's rule, so a 3-channel (RGB) checkpoint serves other inputs: 1 channel sums the RGB
    kernels (a gray image then gives what the RGB net gave the same gray as three channels);
    more (or 2) repeat the kernels cyclically and scale by 3 / in_chans (for a multiple of 3, an
    image made of copies of an RGB image then gives the RGB result; otherwise only the scale is
    kept, as in timm). Works on numpy arrays and torch tensors.
    """
    channels = int(kernel.shape[1])
    in_chans = int(in_chans)
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if in_chans == channels:
        return kernel
    if in_chans == 1:
        return kernel.sum(1, keepdims=True) if isinstance(kernel, np.ndarray) else kernel.sum(1, keepdim=True)
    repeats = math.ceil(in_chans / channels)
    if isinstance(kernel, np.ndarray):
        tiled = np.concatenate([kernel] * repeats, axis=1)[:, :in_chans]
    else:
        tiled = kernel.repeat(1, repeats, *([1] * (kernel.dim() - 2)))[:, :in_chans]
    return tiled * (channels / in_chans)


class InputChannelsAdapter(Mapping):
    """A read-only view of a checkpoint whose first-conv kernel is adapted to `in_chans` inputs.

    Restoring a 3-channel (RGB) checkpoint into a 1-channel net goes through this view, so the
    restore engine sees a kernel of the net's shape and plans and loads it like any other tensor.
    `kernel_name` is the checkpoint's name of that kernel (slim: '<first_conv>/weights', TF
    layout HWIO, input channels on axis 2; a torch name: OIHW, axis 1).
    """

    def __init__(self, checkpoint: Any, kernel_name: str, in_chans: int) -> None:
        self._checkpoint = checkpoint
        self._kernel_name = kernel_name
        self._in_chans = int(in_chans)
        self._tf_layout = "/" in kernel_name

    def _adapted_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = [int(d) for d in shape]
        shape[2 if self._tf_layout else 1] = self._in_chans
        return tuple(shape)

    def __getitem__(self, name: str) -> Any:
        value = self._checkpoint[name]
        if name != self._kernel_name:
            return value
        array = as_numpy(value)
        if self._tf_layout:  # HWIO -> channels on axis 1 for the rule, and back
            return np.ascontiguousarray(adapt_input_channels(array.transpose(3, 2, 0, 1), self._in_chans)
                                        .transpose(2, 3, 1, 0))
        return adapt_input_channels(array, self._in_chans)

    def shape(self, name: str) -> tuple[int, ...]:
        getter = getattr(self._checkpoint, "shape", None)
        shape = tuple(getter(name)) if callable(getter) else tuple(np.shape(self._checkpoint[name]))
        return self._adapted_shape(shape) if name == self._kernel_name else shape

    def dtype(self, name: str) -> Any:
        getter = getattr(self._checkpoint, "dtype", None)
        return getter(name) if callable(getter) else None

    def keys(self) -> Any:
        return self._checkpoint.keys()

    def __iter__(self) -> Any:
        return iter(self._checkpoint.keys())

    def __len__(self) -> int:
        return len(self._checkpoint)

    def __contains__(self, name: object) -> bool:
        return name in self._checkpoint

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self._checkpoint else default

    def items(self) -> Any:
        return ((name, self[name]) for name in self.keys())

    def close(self) -> None:
        closer = getattr(self._checkpoint, "close", None)
        if callable(closer):
            closer()
