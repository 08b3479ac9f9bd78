"""Training-mode BatchNorm and its activation as one C kernel on CPU (`batch_norm_act.c`).

A training step of a mobile net on a 2-core CPU spends a third of its time in BatchNorm and
activations, which only stream memory (mobilenet_v3_large at batch 16, measured 2026-12-04: ~125 ms
of a ~335 ms step, BN backward of one 64-channel 112x112 layer 18 ms). torch runs the two as
separate passes and keeps both their inputs for backward; the kernel reads and writes each tensor
the fewest times the math allows and keeps only the BN input, recomputing the BN output in backward
(see the C file's header). Values and gradients are torch's up to float rounding (the tests compare
them with F.batch_norm followed by the activation), and the running statistics are updated as
F.batch_norm updates them.

It applies on CPU to float32 channels-last (or [N, C]) tensors with more than one value per
channel, for the activations registered in `ACTIVATION_KINDS` (ReLU, ReLU6, hard-swish, none);
anything else runs torch's BatchNorm and activation. `SLIMTUNE_BATCH_NORM_KERNEL=0` turns it off.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .native import capturing_graph, kernel_enabled, load_kernel

_SOURCE = Path(__file__).with_name("batch_norm_act.c")
NONE, RELU, RELU6, HARD_SWISH = 0, 1, 2, 3
#: activation function -> its kind in the C kernel. Nets register their own spellings
#: (register_activation); a function not listed here runs unfused.
ACTIVATION_KINDS: dict[Any, int] = {None: NONE, F.relu: RELU, torch.relu: RELU, torch.relu_: RELU,
                                    F.relu6: RELU6, F.hardswish: HARD_SWISH}
#: How many BatchNorm layers ran through the kernel in this process (tests read it).
kernel_calls = 0

_P, _I = ctypes.c_void_p, ctypes.c_int64
_FUNCTIONS = {
    "batch_norm_act_forward": [_P, _P, _I, _I, _P, _P, _P, _P, ctypes.c_double, ctypes.c_double,
                               ctypes.c_int, ctypes.c_int, _P, _P],
    "batch_norm_act_backward": [_P, _P, _P, _I, _I, _P, _P, _P, _P, ctypes.c_int, ctypes.c_int, _P, _P,
                                _I, _I, _I, _I, _I],
}


def register_activation(function: Callable[[Tensor], Tensor], kind: int) -> Callable[[Tensor], Tensor]:
    """Declare that `function` computes activation `kind` (RELU, RELU6, HARD_SWISH) with torch's
    semantics, so a BatchNorm before it may run fused; returns `function`."""
    ACTIVATION_KINDS[function] = kind
    return function


def activation_kind(function: Any) -> Optional[int]:
    """The kernel's code for `function`, or None when it cannot be fused."""
    try:
        return ACTIVATION_KINDS.get(function)
    except TypeError:  # unhashable callable
        return None


def _enabled() -> bool:
    return kernel_enabled("SLIMTUNE_BATCH_NORM_KERNEL")


def _load() -> Optional[ctypes.CDLL]:
    return load_kernel(_SOURCE, _FUNCTIONS, "BatchNorm + activation run as separate torch operations")


def kernel_available() -> bool:
    """True when the C kernel is enabled and compiled (compiling it now if needed)."""
    return _enabled() and _load() is not None


def _pointer(tensor: Optional[Tensor]) -> Optional[int]:
    return None if tensor is None else tensor.data_ptr()


def _rows(x: Tensor) -> Optional[tuple[int, int]]:
    """(M, C) when x is laid out as M rows of C contiguous channels, else None."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.shape[0] * x.shape[2] * x.shape[3], x.shape[1]
    if x.dim() == 2 and x.is_contiguous():
        return x.shape[0], x.shape[1]
    return None


class _BatchNormAct(torch.autograd.Function):
    """act(F.batch_norm(x, ..., training=True)) in the C kernel."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                running_var: Tensor, momentum: float, eps: float, kind: int) -> Tensor:
        rows, channels = _rows(x)
        y = torch.empty_like(x)
        mean, invstd = torch.empty(channels), torch.empty(channels)
        _load().batch_norm_act_forward(
            x.data_ptr(), y.data_ptr(), rows, channels, _pointer(weight), _pointer(bias),
            running_mean.data_ptr(), running_var.data_ptr(), momentum, eps, kind, torch.get_num_threads(),
            mean.data_ptr(), invstd.data_ptr())
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.kind = kind
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight, bias, mean, invstd = ctx.saved_tensors
        rows, channels = _rows(x)
        if x.dim() == 4:
            if grad.stride(1) != 1 or grad.shape[1] == 1:  # the kernel reads rows of contiguous channels
                grad = grad.contiguous(memory_format=torch.channels_last)
            height, width = x.shape[2:]
            strides = grad.stride(0), grad.stride(2), grad.stride(3)
        else:
            grad = grad.contiguous()
            height = width = 1
            strides = channels, channels, channels
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        dx = torch.empty_like(x) if need_x else None
        dweight = torch.empty(channels) if need_weight else None
        dbias = torch.empty(channels) if need_bias else None
        _load().batch_norm_act_backward(
            x.data_ptr(), grad.data_ptr(), _pointer(dx), rows, channels, _pointer(weight), _pointer(bias),
            mean.data_ptr(), invstd.data_ptr(), ctx.kind, torch.get_num_threads(), _pointer(dweight),
            _pointer(dbias), height, width, *strides)
        return dx, dweight, dbias, None, None, None, None, None


def batch_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                   running_var: Tensor, momentum: float, eps: float,
                   activation: Optional[Callable[[Tensor], Tensor]]) -> Optional[Tensor]:
    """activation(F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)) from
    the C kernel, updating the running statistics; None when the kernel does not apply here (the
    caller then runs torch's operations)."""
    global kernel_calls
    kind = activation_kind(activation)
    if kind is None or x.device.type != "cpu" or x.dtype != torch.float32 or not _enabled():
        return None
    shape = _rows(x)
    if shape is None or shape[0] < 2 or torch.is_autocast_enabled("cpu"):
        return None
    if capturing_graph():
        return None
    for tensor in (weight, bias, running_mean, running_var):
        if tensor is not None and (tensor.dtype != torch.float32 or not tensor.is_contiguous()
                                   or tensor.device.type != "cpu" or tensor.shape != (shape[1],)):
            return None
    if _load() is None:
        return None
    kernel_calls += 1
    return _BatchNormAct.apply(x, weight, bias, running_mean, running_var, float(momentum), float(eps), kind)
