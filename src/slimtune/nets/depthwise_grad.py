"""Depthwise convolution whose weight gradient runs in a small C kernel on CPU.

On x86 CPUs torch 2.14 computes the weight gradient of a 5x5 or 7x7 depthwise convolution at about
10 GFLOP/s, 7-10x slower than the layer's forward (measured 2026-12-04, 2 cores, batch 16,
channels-last: NASNet's 44-channel 56x56 5x5 layer 0.93 ms forward, 9.6 ms weight gradient). NASNet
and MobileNet v3 are made of such layers, so in a training step they spend about as long there as in
every other convolution together. `depthwise_conv2d` computes the same forward and input gradient
with torch and only the weight gradient with `depthwise_grad.c` (see its header for the loop order).

The C file is compiled once per machine (see native.py). Without a compiler, or for what the
kernel does not cover (another dtype or device, a channel multiplier, a non-channels-last input,
double backward), torch computes the gradient as before: the kernel is a speed-up, never a
requirement. The first fallback caused by a missing compiler says so in one warning.
`SLIMTUNE_DEPTHWISE_KERNEL=0` turns it off.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .native import kernel_enabled, load_kernel

_SOURCE = Path(__file__).with_name("depthwise_grad.c")
#: torch's own weight gradient is the faster one up to 3x3 kernels (oneDNN has a dedicated 3x3 path;
#: measured 2026-12-04 at batch 16: 0.2 ms vs the C kernel's 0.5 ms for 44 channels at 28x28), the C
#: kernel from 5x5 up (2.2-5.9x faster over NASNet's and MobileNet v3's 5x5 and 7x7 layers).
MAX_TORCH_KERNEL_AREA = 9
#: How many weight gradients the C kernel computed in this process (tests read it).
kernel_calls = 0


def _enabled() -> bool:
    return kernel_enabled("SLIMTUNE_DEPTHWISE_KERNEL")


def _load() -> Optional[ctypes.CDLL]:
    """The compiled kernel, compiling it on first use; None (with one warning) when that is impossible."""
    return load_kernel(_SOURCE, {"depthwise_weight_grad": [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 15},
                       "depthwise weight gradients fall back to torch's slower kernel")


def kernel_available() -> bool:
    """True when the C kernel is enabled and compiled (compiling it now if needed)."""
    return _enabled() and _load() is not None


def _weight_grad(x: Tensor, grad: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int]) -> Optional[Tensor]:
    """dL/dW [C, 1, kh, kw] from the C kernel, or None when it does not apply here."""
    global kernel_calls
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and grad.dtype == torch.float32):
        return None
    if not x.is_contiguous(memory_format=torch.channels_last) or not _enabled():
        return None
    library = _load()
    if library is None:
        return None
    grad = grad.contiguous(memory_format=torch.channels_last)
    batch, channels, height, width = x.shape
    out_height, out_width = grad.shape[-2:]
    kh, kw = kernel_size
    threads = max(1, min(torch.get_num_threads(), batch))
    partial = torch.zeros(threads, kh, kw, channels)
    library.depthwise_weight_grad(x.data_ptr(), grad.data_ptr(), partial.data_ptr(), threads, batch,
                                           height, width, channels, out_height, out_width, kh, kw,
                                           stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    kernel_calls += 1
    # Threads' sums added in a fixed order: the result depends on the thread count only.
    total = partial[0]
    for index in range(1, threads):
        total = total + partial[index]
    return total.permute(2, 0, 1).unsqueeze(1).contiguous()


class _DepthwiseConv2d(torch.autograd.Function):
    """F.conv2d(x, weight, groups=C); the weight gradient from the C kernel when it applies."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding, dilation
        return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        need_input, need_weight = ctx.needs_input_grad[:2]
        weight_grad = None
        if need_weight:
            weight_grad = _weight_grad(x, grad, tuple(weight.shape[-2:]), stride, padding, dilation)
        torch_mask = [need_input, need_weight and weight_grad is None, False]
        input_grad = None
        if any(torch_mask):
            input_grad, torch_weight_grad, _ = torch.ops.aten.convolution_backward(
                grad, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], x.shape[1],
                torch_mask)
            if weight_grad is None:
                weight_grad = torch_weight_grad
        return input_grad, weight_grad, None, None, None


def depthwise_conv2d(x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                     dilation: tuple[int, int]) -> Tensor:
    """F.conv2d(x, weight, None, stride, padding, dilation, groups=channels), channel multiplier 1.

    Same forward and input gradient as torch; the weight gradient of a kernel larger than 3x3 comes
    from the C kernel on CPU (see the module docstring). Other cases go straight to F.conv2d.
    """
    if (torch.is_grad_enabled() and weight.requires_grad and weight.shape[0] == x.shape[1]
            and weight.shape[1] == 1 and weight.shape[-2] * weight.shape[-1] > MAX_TORCH_KERNEL_AREA
            and x.device.type == "cpu" and _enabled()):
        return _DepthwiseConv2d.apply(x, weight, tuple(stride), tuple(padding), tuple(dilation))
    return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])
