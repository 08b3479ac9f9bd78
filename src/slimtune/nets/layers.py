"""TensorFlow-compatible building blocks shared by every slim network.

Each module owns its parameters under slim's leaf names (``weight``/``bias`` for ``weights``/
``biases``, a ``BatchNorm`` child for slim's batch norm), so a module tree that mirrors slim's
variable scopes has state_dict keys equal to slim's variable names with '/' -> '.'.

TF's 'SAME' padding puts the extra pixel *after* when the total is odd (bottom/right), unlike a
symmetric torch padding; that asymmetry is computed per input size here.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .batch_norm_act import batch_norm_act
from .depthwise_grad import depthwise_conv2d
from .native import capturing_graph
from .pool2d import pool2d

IntPair = Union[int, Sequence[int]]
Activation = Optional[Callable[[Tensor], Tensor]]
Cached = TypeVar("Cached")


def _pair(value: IntPair) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def same_padding(size: int, kernel: int, stride: int, rate: int = 1) -> tuple[int, int]:
    """Padding (before, after) that TF's 'SAME' applies along one axis."""
    effective = (kernel - 1) * rate + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def explicit_padding(kernel: int, rate: int = 1) -> tuple[int, int]:
    """Input-size independent padding of slim's `conv2d_same` / mobilenet's `use_explicit_padding`."""
    effective = (kernel - 1) * rate + 1
    total = effective - 1
    return total // 2, total - total // 2


def _same_pads(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
               rate: tuple[int, int]) -> tuple[int, int, int, int]:
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0], rate[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1], rate[1])
    return left, right, top, bottom


def _is_channels_last(x: Tensor) -> bool:
    """True for a 4-D tensor laid out channels-last and not also plain contiguous (C or H*W of 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def pad2d(x: Tensor, pads: tuple[int, int, int, int], value: float = 0.0) -> Tensor:
    """F.pad(x, (left, right, top, bottom), value=value) for an NCHW-shaped tensor.

    For a channels-last tensor F.pad fills the whole output and then copies the input over it, at a
    fraction of a copy's speed (8.5 ms vs 1.4 ms for a 16x32x111x111 map on one core); here only the
    border is filled, and the input copied once into the interior.
    """
    if not _is_channels_last(x) or min(pads) < 0:
        return F.pad(x, pads, value=value)
    if torch.is_grad_enabled() and x.requires_grad:
        return _BorderPad.apply(x, pads, value)
    return _border_pad(x, pads, value)


def _border_pad(x: Tensor, pads: tuple[int, int, int, int], value: float) -> Tensor:
    left, right, top, bottom = pads
    batch, channels, height, width = x.shape
    out = torch.empty((batch, channels, height + top + bottom, width + left + right), dtype=x.dtype,
                      device=x.device, memory_format=torch.channels_last)
    for border in (out[:, :, :top], out[:, :, top + height:], out[:, :, top:top + height, :left],
                   out[:, :, top:top + height, left + width:]):
        if border.numel():
            border.fill_(value)
    out[:, :, top:top + height, left:left + width].copy_(x)
    return out


class _BorderPad(torch.autograd.Function):
    """pad2d under autograd: the gradient is the interior slice of the output's, as for F.pad (an
    in-place copy recorded by autograd would hand back a contiguous NCHW gradient instead)."""

    @staticmethod
    def forward(ctx, x: Tensor, pads: tuple[int, int, int, int], value: float) -> Tensor:  # type: ignore[override]
        ctx.pads, ctx.size = pads, x.shape[-2:]
        return _border_pad(x, pads, value)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        left, _, top, _ = ctx.pads
        height, width = ctx.size
        return grad[:, :, top:top + height, left:left + width], None, None


def _torch_pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length of torch's pooling (its ceil_mode drops a last window that starts in the padding)."""
    span = size + 2 * padding - kernel
    count = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (count - 1) * stride >= size + padding:
        count -= 1
    return count


def _torch_pool_windows(size: int, kernel: int, stride: int, before: int) -> Optional[tuple[int, bool]]:
    """(padding, ceil_mode) under which torch's pooling windows are TF's 'SAME' windows, or None.

    TF's windows start at -before + i * stride for i < ceil(size / stride); torch's start at
    -padding + i * stride, so padding = before and only the window count remains to match. Padded
    positions never count in a max (or a count_include_pad=False average), wherever a window ends.
    """
    if 2 * before > kernel:
        return None
    wanted = -(-size // stride)
    for ceil_mode in (False, True):
        if _torch_pool_output_size(size, kernel, stride, before, ceil_mode) == wanted:
            return before, ceil_mode
    return None


class BatchNorm(nn.Module):
    """slim.batch_norm: `scale` adds gamma (slim's default is no gamma), `center` adds beta.

    `decay` is slim's moving-average decay (torch momentum = 1 - decay). Setting `frozen`
    keeps the module on its moving statistics and stops updating them even in train mode: the
    structural freeze that `model.train()` cannot undo.
    """

    def __init__(self, num_features: int, eps: float = 0.001, decay: float = 0.999,
                 scale: bool = False, center: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.decay = decay
        self.frozen = False
        # Set by sync_batch_norm.enable_sync_batch_norm (--sync_batch_norm): the process group whose
        # global batch gives the training statistics; None = this process's batch only.
        self.sync_group: Any = None
        self.weight = nn.Parameter(torch.ones(num_features)) if scale else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if center else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        """Normalize with batch statistics in training (unless frozen), moving ones otherwise."""
        use_batch_stats = self.training and not self.frozen
        if use_batch_stats and self.sync_group is not None and _distributed():
            from .sync_batch_norm import group_of, sync_batch_norm

            return sync_batch_norm(x, self, group_of(self.sync_group))
        weight = self.weight
        if weight is None and self.bias is not None and x.is_cuda:
            # slim's default BN (beta, no gamma) is rare in torch: torch 2.11's CUDA backward of a
            # channels-last batch norm without a weight returned an empty bias gradient (an error
            # at backward, seen on an H200). A constant gamma of ones computes the same values.
            weight = _ones(self.num_features, x)
        return F.batch_norm(x, self.running_mean, self.running_var, weight, self.bias,
                            use_batch_stats, 1.0 - self.decay, self.eps)

    def normalize_and_activate(self, x: Tensor, activation: Activation) -> Tensor:
        """activation(self(x)): in training on CPU as one fused C pass when batch_norm_act applies
        (same values and gradients, a third of the memory traffic), else torch's two operations."""
        if (self.training and not self.frozen and not (self.sync_group is not None and _distributed())
                and not self._forward_hooks and not self._forward_pre_hooks):
            fused = batch_norm_act(x, self.weight, self.bias, self.running_mean, self.running_var,
                                   1.0 - self.decay, self.eps, activation)
            if fused is not None:
                return fused
        x = self(x)
        return activation(x) if activation is not None else x

    def train(self, mode: bool = True) -> "BatchNorm":
        """Switch mode; entering training drops what inference folded from this BN (see inference_cached)."""
        if mode:
            _INFERENCE_CACHE.pop(self, None)
        return super().train(mode)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, decay={self.decay}, "
                f"scale={self.weight is not None}, center={self.bias is not None}, frozen={self.frozen}")


def _ones(size: int, like: Tensor) -> Tensor:
    """A constant vector of ones on `like`'s device and dtype (no gradient)."""
    return torch.ones(size, dtype=like.dtype, device=like.device)


def _cuda_padded_pool_gradient_is_unsafe(x: Tensor) -> bool:
    """True when torch's own padding in an average pooling would meet a torch bug: on CUDA the
    channels-last backward of avg_pool2d with padding > 0 returned silently wrong input gradients
    (pytorch/pytorch#188344, fixed in mid-2026; seen in torch 2.11 on an H200: NASNet's first
    gradient off by 100%). The padding is then made explicit, where torch's padding is 0."""
    return x.is_cuda and torch.is_grad_enabled() and x.requires_grad and _is_channels_last(x)


def _distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


NormFactory = Optional[Callable[[int], nn.Module]]


def batch_norm_factory(eps: float = 0.001, decay: float = 0.999, scale: bool = False,
                       center: bool = True) -> Callable[[int], BatchNorm]:
    """Return a constructor of BatchNorm with a net's arg-scope settings."""
    def make(num_features: int) -> BatchNorm:
        return BatchNorm(num_features, eps=eps, decay=decay, scale=scale, center=center)
    return make


def can_fold_batch_norm(norm: Optional[nn.Module]) -> bool:
    """True when `norm` is a slimtune BatchNorm acting as a fixed affine map that can go into the
    kernel before it: moving statistics, no autograd. Inference only: training keeps slim's
    separate BN (its gradients and statistics updates)."""
    return (isinstance(norm, BatchNorm) and not torch.is_grad_enabled()
            and not (norm.training and not norm.frozen))


# owner module -> {slot: (sources, their versions, value)}; weak so that a dropped net frees its entries,
# and outside the module's __dict__ so that deepcopy / pickling never carry derived tensors along.
_INFERENCE_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[str, tuple]]" = weakref.WeakKeyDictionary()


def _unchanged(kept: tuple, versions: tuple, sources: tuple) -> bool:
    """True when every source is the same memory, unmodified since it was kept. `kept` holds a
    detached alias of each source: the old storage stays allocated, so an equal data pointer means
    the same storage (not a new tensor at a reused address), and an equal version counter means no
    in-place write (optimizer step, load_state_dict, copy_) since."""
    for old, version, new in zip(kept, versions, sources):
        if old is None or new is None:
            if old is not new:
                return False
        elif (old.data_ptr() != new.data_ptr() or old.shape != new.shape or old.stride() != new.stride()
              or new._version != version):
            return False
    return True


def inference_cached(owner: nn.Module, slot: str, sources: Sequence[Optional[Tensor]],
                     compute: Callable[[], Cached]) -> Cached:
    """`compute()`, remembered on `owner` across inference calls while every tensor in `sources`
    (all it reads) is unchanged: slim's BN folds cost ~8 small ops per layer on every call otherwise
    (~1,600 of NASNet-A Mobile's ~2,400 ops per forward) and a pass over every kernel.

    Only without autograd (a result kept across calls must not join a graph) and never while
    tracing or compiling (export, torch.compile: the fold must stay in the graph, computed from the
    parameters). Entries go when `owner` leaves inference (BatchNorm.train) or is garbage-collected.
    """
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return compute()
    sources = tuple(sources)
    try:
        versions = tuple(None if t is None else t._version for t in sources)
    except RuntimeError:  # inference-mode tensors have no version counter: nothing to key on
        return compute()
    slots = _INFERENCE_CACHE.setdefault(owner, {})
    entry = slots.get(slot)
    if entry is not None and _unchanged(entry[0], entry[1], sources):
        return entry[2]
    value = compute()
    slots[slot] = (tuple(None if t is None else t.detach() for t in sources), versions, value)
    return value


def folded_batch_norm(kernel: Tensor, bias: Optional[Tensor], norm: BatchNorm) -> tuple[Tensor, Tensor]:
    """fold_batch_norm(kernel, bias, norm), computed once per set of weights at inference
    (inference_cached on the BN)."""
    return inference_cached(norm, "fold", (kernel, bias, norm.weight, norm.bias, norm.running_mean,
                                           norm.running_var), lambda: fold_batch_norm(kernel, bias, norm))


def fold_batch_norm(kernel: Tensor, bias: Optional[Tensor], norm: BatchNorm) -> tuple[Tensor, Tensor]:
    """A kernel (output channels first) and bias with an inference-mode BatchNorm folded in.

    conv(x, k, b) followed by BN on moving statistics equals conv(x, k * s, (b - mean) * s + beta)
    with s = gamma / sqrt(var + eps): the one place this algebra lives (inference folding, export).
    """
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if bias is not None:
        shift = shift + bias * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return kernel * scale.view(-1, *([1] * (kernel.dim() - 1))), shift


class Conv2d(nn.Module):
    """slim.conv2d: convolution, then optional BatchNorm (replacing the bias), then activation.

    padding: 'SAME' (TF semantics, asymmetric when needed), 'VALID', or 'EXPLICIT' (pad
    symmetrically by the kernel's effective size, then VALID: slim's conv2d_same for stride > 1).
    """

    kernel_name = "weight"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: str = "SAME", rate: IntPair = 1, normalizer: NormFactory = None,
                 activation: Activation = F.relu, bias: Optional[bool] = None, groups: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.rate = _pair(rate)
        self.padding = padding.upper()
        self.groups = groups
        self.activation = activation
        kernel = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        nn.init.kaiming_normal_(kernel, mode="fan_in", nonlinearity="relu")
        self.register_parameter(self.kernel_name, kernel)
        use_bias = normalizer is None if bias is None else bias
        self.bias = nn.Parameter(torch.zeros(out_channels)) if use_bias else None
        self.BatchNorm = normalizer(out_channels) if normalizer is not None else None
        self._static_padding = self._symmetric_static_padding()

    def _symmetric_static_padding(self) -> Optional[tuple[int, int]]:
        """Torch's own (symmetric) padding when it equals what TF does for every input size."""
        if self.padding == "VALID":
            return 0, 0
        pads = []
        for kernel, stride, rate in zip(self.kernel_size, self.stride, self.rate):
            effective = (kernel - 1) * rate + 1
            if self.padding == "EXPLICIT":
                before, after = explicit_padding(kernel, rate)
            elif stride == 1:
                before, after = (effective - 1) // 2, effective - 1 - (effective - 1) // 2
            else:
                return None
            if before != after:
                return None
            pads.append(before)
        return pads[0], pads[1]

    def _pad(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if self._static_padding is not None:
            return x, self._static_padding
        if self.padding == "EXPLICIT":
            top, bottom = explicit_padding(self.kernel_size[0], self.rate[0])
            left, right = explicit_padding(self.kernel_size[1], self.rate[1])
            pads = (left, right, top, bottom)
        else:
            pads = _same_pads(x, self.kernel_size, self.stride, self.rate)
        if pads[0] == pads[1] and pads[2] == pads[3]:
            return x, (pads[2], pads[0])
        return pad2d(x, pads), (0, 0)

    def _covers_whole_input(self, x: Tensor) -> bool:
        """True when one unpadded window sees the whole input, so the conv is a matrix product."""
        return (self.groups == 1 and self._static_padding == (0, 0) and self.rate == (1, 1)
                and x.shape[-2] == self.kernel_size[0] and x.shape[-1] == self.kernel_size[1])

    def _conv_as_linear(self, x: Tensor, kernel: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The conv of a kernel-sized input as F.linear: [N, out, 1, 1].

        slim's conv-as-FC layers (VGG's 7x7 fc6 on a 7x7 map, every 1x1 conv on a pooled 1x1 map)
        run several times faster as one GEMM than through oneDNN's convolution, which also
        reorders a weight as big as fc6's (400 MB) on every call. The kernel is flattened in its
        own memory order (a free view), and the input in the same (h, w, c) or (c, h, w) order.
        """
        if kernel.is_contiguous() or not kernel.is_contiguous(memory_format=torch.channels_last):
            flat_kernel, flat_x = kernel.reshape(kernel.shape[0], -1), x.reshape(x.shape[0], -1)
        else:
            flat_kernel = kernel.permute(0, 2, 3, 1).reshape(kernel.shape[0], -1)
            flat_x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        return F.linear(flat_x, flat_kernel, bias)[:, :, None, None]

    def _folds_batch_norm(self) -> bool:
        """True when this layer's BN is a fixed affine map that can go into the kernel (see can_fold_batch_norm)."""
        return can_fold_batch_norm(self.BatchNorm)

    def _folded(self, kernel: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """The kernel (output channels first) and bias with this layer's BN folded in."""
        return folded_batch_norm(kernel, bias, self.BatchNorm)

    def forward(self, x: Tensor, then: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        """Convolve (with TF padding), normalize, activate; `then` (see convolve) runs after the convolution."""
        kernel, bias = getattr(self, self.kernel_name), self.bias
        fold = self._folds_batch_norm()
        if fold:
            kernel, bias = self._folded(kernel, bias)
        return self.convolve(x, kernel, bias, normalize=not fold, then=then)

    def convolve(self, x: Tensor, kernel: Tensor, bias: Optional[Tensor], normalize: bool = True,
                 then: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        """This layer's computation with a given kernel and bias (e.g. with a BN folded in): the
        TF-padded convolution, `then` (an operation that commutes with it, e.g. an average pool after a
        1x1 convolution), its BatchNorm when `normalize`, then its activation."""
        normalize = normalize and self.BatchNorm is not None
        if self._covers_whole_input(x):
            x = self._conv_as_linear(x, kernel, bias)
        else:
            x, padding = self._pad(x)
            if bias is None and self.groups > 1 and self.groups == self.in_channels == self.out_channels:
                x = depthwise_conv2d(x, kernel, self.stride, padding, self.rate)
            else:
                x = F.conv2d(x, kernel, bias, self.stride, padding, self.rate, self.groups)
        if then is not None:
            x = then(x)
        if normalize and isinstance(self.BatchNorm, BatchNorm):
            return self.BatchNorm.normalize_and_activate(x, self.activation)
        if normalize:
            x = self.BatchNorm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, rate={self.rate}, groups={self.groups}")


class DepthwiseConv2d(Conv2d):
    """The depthwise half of slim.separable_conv2d(num_outputs=None): parameter `depthwise_weight`."""

    # slim names this variable `depthwise_weights`.
    kernel_name = "depthwise_weight"

    def __init__(self, channels: int, kernel_size: IntPair, stride: IntPair = 1, padding: str = "SAME",
                 rate: IntPair = 1, depth_multiplier: int = 1, normalizer: NormFactory = None,
                 activation: Activation = F.relu, bias: Optional[bool] = None) -> None:
        super().__init__(channels, channels * depth_multiplier, kernel_size, stride, padding, rate,
                         normalizer, activation, bias, groups=channels)


class Linear(nn.Module):
    """slim.fully_connected on a flat input: weight [out, in], bias, optional BN, activation."""

    def __init__(self, in_features: int, out_features: int, normalizer: NormFactory = None,
                 activation: Activation = F.relu, bias: Optional[bool] = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        use_bias = normalizer is None if bias is None else bias
        self.bias = nn.Parameter(torch.zeros(out_features)) if use_bias else None
        self.BatchNorm = normalizer(out_features) if normalizer is not None else None
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Affine map, normalize, activate."""
        x = F.linear(x, self.weight, self.bias)
        if self.BatchNorm is not None:
            x = self.BatchNorm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}"


#: Strided pooling goes to the C kernel below this many channels: there it was 1.0-5.8x torch's
#: (16x11x111x111 3x3/2 max pool: 3.7 ms in torch, 0.63 ms), while from 64 channels torch's
#: channel-vectorized loop was as fast or faster (averages 0.5-0.8x) (2026-12-04, batch 16).
STRIDED_POOL_KERNEL_MAX_CHANNELS = 63


def _pool_kernel(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: str,
                 is_max: bool) -> Optional[Tensor]:
    """TF's SAME / VALID pooling from pool2d's C kernel (inference, channels-last), or None. Every
    stride-1 pooling (1.3-14x torch's over NASNet's, PNASNet's and Inception's pools, 2026-12-04,
    batch 16) and strided pooling of few channels (see STRIDED_POOL_KERNEL_MAX_CHANNELS)."""
    if x.dim() != 4 or capturing_graph():  # an exported graph keeps torch's pooling
        return None
    if stride != (1, 1) and x.shape[1] > STRIDED_POOL_KERNEL_MAX_CHANNELS:
        return None
    height, width = x.shape[-2:]
    if padding == "SAME":
        left, _, top, _ = _same_pads(x, kernel, stride, (1, 1))
        out_size = (-(-height // stride[0]), -(-width // stride[1]))
    else:
        top = left = 0
        out_size = ((height - kernel[0]) // stride[0] + 1, (width - kernel[1]) // stride[1] + 1)
    if min(out_size) < 1:
        return None  # torch's error for a window larger than the input
    return pool2d(x, kernel, stride, top, left, out_size, is_max)


class MaxPool2d(nn.Module):
    """slim.max_pool2d with TF padding (padded positions never win)."""

    def __init__(self, kernel_size: IntPair, stride: IntPair = 2, padding: str = "VALID") -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), padding.upper()

    def forward(self, x: Tensor) -> Tensor:
        """Max-pool."""
        pooled = _pool_kernel(x, self.kernel_size, self.stride, self.padding, is_max=True)
        if pooled is not None:
            return pooled
        if self.padding != "SAME":
            return F.max_pool2d(x, self.kernel_size, self.stride)
        left, right, top, bottom = _same_pads(x, self.kernel_size, self.stride, (1, 1))
        rows = _torch_pool_windows(x.shape[-2], self.kernel_size[0], self.stride[0], top)
        cols = _torch_pool_windows(x.shape[-1], self.kernel_size[1], self.stride[1], left)
        if rows is not None and cols is not None and rows[1] == cols[1]:
            # Torch's own -inf padding and ceil_mode give TF's windows: no padded copy of the input.
            return F.max_pool2d(x, self.kernel_size, self.stride, (rows[0], cols[0]), ceil_mode=rows[1])
        x = pad2d(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class AvgPool2d(nn.Module):
    """slim.avg_pool2d with TF padding: padded positions are left out of each average."""

    def __init__(self, kernel_size: IntPair, stride: IntPair = 2, padding: str = "VALID") -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), padding.upper()

    def forward(self, x: Tensor) -> Tensor:
        """Average-pool."""
        pooled = _pool_kernel(x, self.kernel_size, self.stride, self.padding, is_max=False)
        if pooled is not None:
            return pooled
        if self.padding != "SAME":
            return F.avg_pool2d(x, self.kernel_size, self.stride)
        left, right, top, bottom = _same_pads(x, self.kernel_size, self.stride, (1, 1))
        rows = _torch_pool_windows(x.shape[-2], self.kernel_size[0], self.stride[0], top)
        cols = _torch_pool_windows(x.shape[-1], self.kernel_size[1], self.stride[1], left)
        if (rows is not None and cols is not None and rows[1] == cols[1]
                and not (max(rows[0], cols[0]) > 0 and _cuda_padded_pool_gradient_is_unsafe(x))):
            # Torch's windows are TF's, and count_include_pad=False divides by the pixels each
            # window covers inside the input (TF's count), wherever the window ends.
            return F.avg_pool2d(x, self.kernel_size, self.stride, (rows[0], cols[0]), ceil_mode=rows[1],
                                count_include_pad=False)
        pads = (left, right, top, bottom)
        window = self.kernel_size[0] * self.kernel_size[1]
        sums = F.avg_pool2d(pad2d(x, pads), self.kernel_size, self.stride) * window
        ones = torch.ones((1, 1) + tuple(x.shape[-2:]), dtype=x.dtype, device=x.device)
        counts = F.avg_pool2d(F.pad(ones, pads), self.kernel_size, self.stride) * window
        return sums / counts


class _SpatialMean(torch.autograd.Function):
    """x.mean over H and W whose gradient keeps x's memory format.

    Autograd's own gradient of a mean is a stride-0 broadcast; an elementwise backward fed with it
    and a channels-last tensor (hard-swish's, ReLU's) writes a contiguous NCHW gradient, and the
    BatchNorm backward that receives it together with its channels-last input takes a slow path
    plus copies: that was a third of a mobilenet_v3_large training step.
    """

    @staticmethod
    def forward(ctx, x: Tensor, keepdim: bool) -> Tensor:  # type: ignore[override]
        ctx.shape, ctx.channels_last = x.shape, _is_channels_last(x)
        return x.mean(dim=(2, 3), keepdim=keepdim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        batch, channels, height, width = ctx.shape
        grad = (grad.reshape(batch, channels, 1, 1) / (height * width)).expand(ctx.shape)
        memory_format = torch.channels_last if ctx.channels_last else torch.contiguous_format
        return grad.contiguous(memory_format=memory_format), None


class _ConcatChannels(torch.autograd.Function):
    """torch.cat along channels whose backward hands each input a compact gradient.

    Autograd's own backward of a concatenation gives every input a channel slice of the output's
    gradient; for a channels-last tensor a slice is strided (each pixel's channels sit among the
    other inputs' ones), and a BatchNorm backward reading such a gradient runs ~3x slower than on
    a compact one (0.55 vs 0.18 ms at 16x176x7x7, one core) while the copy costs 0.01 ms.
    """

    @staticmethod
    def forward(ctx, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        ctx.sizes = [t.shape[1] for t in tensors]
        return torch.cat(tensors, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        memory_format = torch.channels_last if _is_channels_last(grad) else torch.contiguous_format
        return tuple(part.contiguous(memory_format=memory_format) for part in grad.split(ctx.sizes, dim=1))


def concat_channels(tensors: Sequence[Tensor]) -> Tensor:
    """torch.cat(tensors, dim=1); under autograd each input's gradient is compact (see _ConcatChannels)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _ConcatChannels.apply(*tensors)
    return torch.cat(list(tensors), dim=1)


def reduce_mean_hw(x: Tensor, keepdim: bool = True) -> Tensor:
    """tf.reduce_mean over height and width (slim's global_pool); its gradient keeps x's memory format."""
    if x.dim() == 4 and torch.is_grad_enabled() and x.requires_grad:
        return _SpatialMean.apply(x, keepdim)
    return x.mean(dim=(2, 3), keepdim=keepdim)


def flatten_nhwc(x: Tensor) -> Tensor:
    """slim.flatten of an NHWC tensor, on an NCHW one: same element order as TF."""
    return x.permute(0, 2, 3, 1).flatten(1)


def local_response_norm(x: Tensor, depth_radius: int = 5, bias: float = 1.0, alpha: float = 1.0,
                        beta: float = 0.5) -> Tensor:
    """tf.nn.lrn: x / (bias + alpha * sum of squares over 2r+1 neighbouring channels) ** beta."""
    squares = (x * x).unsqueeze(1)
    squares = F.pad(squares, (0, 0, 0, 0, depth_radius, depth_radius))
    window = 2 * depth_radius + 1
    sums = F.avg_pool3d(squares, (window, 1, 1), stride=1).squeeze(1) * window
    return x / (bias + alpha * sums).pow(beta)


def check_keep_prob(name: str, dropout_keep_prob: float) -> float:
    """slim's dropout keep probability as a float in (0, 1], or a ConfigError naming the net."""
    try:
        value = float(dropout_keep_prob)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise ConfigError(f"{name}: dropout_keep_prob must be in (0, 1], got {dropout_keep_prob!r}")
    return value


def dropout_module(keep_prob: float) -> nn.Dropout:
    """slim.dropout's keep probability as a torch Dropout."""
    return nn.Dropout(p=1.0 - keep_prob)


_PHI_MINUS_2 = 0.5 * (1.0 + math.erf(-2.0 / math.sqrt(2.0)))


@torch.no_grad()
def truncated_normal_(tensor: Tensor, stddev: float) -> Tensor:
    """TF's truncated_normal_initializer: normal cut at two standard deviations.

    Drawn by inverse CDF in one pass: torch's trunc_normal_ resamples the whole tensor several
    times, which costs seconds on fc layers of 100M weights.
    """
    low, high = 2 * _PHI_MINUS_2 - 1, 1 - 2 * _PHI_MINUS_2
    tensor.uniform_(low, high).erfinv_().mul_(stddev * math.sqrt(2.0))
    return tensor.clamp_(-2 * stddev, 2 * stddev)


def xavier_uniform_(tensor: Tensor) -> Tensor:
    """slim's default xavier_initializer (Glorot uniform) for HWIO-equivalent fans."""
    return nn.init.xavier_uniform_(tensor)


def variance_scaling_(tensor: Tensor, scale: float = 2.0) -> Tensor:
    """slim.variance_scaling_initializer(factor=2.0, mode='FAN_IN') (He), truncated like TF."""
    fan_in = tensor[0].numel()
    stddev = math.sqrt(scale / fan_in) / 0.87962566103423978
    return truncated_normal_(tensor, stddev)
