"""Inference max / average pooling of channels-last maps in a small C kernel (`pool2d.c`).

torch 2.14's channels-last pooling vectorizes over channels only, and for channel counts that are
a multiple of its vector width; NASNet's and PNASNet's cells pool 11 to 88 channels and ran 3-14x
slower there (a 16x22x56x56 3x3 max pool: 4.3 ms, 0.5 ms here). The kernel vectorizes over whole
rows of pixels and channels (a strided row is first split into its column phases). It computes TF's
windows directly (padded positions never win a max and are not counted in an average), so it needs
no padded copy either. The layers use it for every stride-1 pooling and for strided pooling of
fewer than 64 channels (see layers._pool_kernel). It runs without autograd only (training keeps
torch's pooling and its gradient), on CPU float32 channels-last maps; `SLIMTUNE_POOL_KERNEL=0`
turns it off.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .native import capturing_graph, kernel_enabled, load_kernel

_SOURCE = Path(__file__).with_name("pool2d.c")
_I = ctypes.c_int64
_FUNCTIONS = {"pool2d_nhwc": [ctypes.c_void_p] * 3 + [_I] * 12 + [ctypes.c_int, ctypes.c_int]}
#: How many poolings the kernel computed in this process (tests read it).
kernel_calls = 0


def _enabled() -> bool:
    return kernel_enabled("SLIMTUNE_POOL_KERNEL")


def _load() -> Optional[ctypes.CDLL]:
    return load_kernel(_SOURCE, _FUNCTIONS, "pooling runs in torch's kernels")


def pool2d(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], top: int, left: int,
           out_size: tuple[int, int], is_max: bool) -> Optional[Tensor]:
    """Max- or average-pool x [N, C, H, W] (channels-last) with TF's windows: output pixel (i, j)
    covers input rows i*stride - top .. + kernel - 1 and columns likewise, clipped to the input.
    None when the kernel does not apply (autograd, device, dtype, layout, not compiled)."""
    global kernel_calls
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or not _enabled():
        return None
    if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
        return None  # plain NCHW (or a map where both layouts coincide): torch's kernels
    if capturing_graph():
        return None
    library = _load()
    if library is None:
        return None
    batch, channels, height, width = x.shape
    out = torch.empty((batch, channels, *out_size), dtype=x.dtype, memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    # a strided row is split into its column phases in a per-thread buffer (see pool2d.c)
    scratch = torch.empty(threads * stride[1] * -(-width // stride[1]) * channels if stride[1] > 1 else 0)
    library.pool2d_nhwc(x.data_ptr(), out.data_ptr(), scratch.data_ptr(), batch, height, width, channels,
                        out_size[0], out_size[1], kernel[0], kernel[1], stride[0], stride[1], top, left, int(is_max),
                        threads)
    kernel_calls += 1
    return out
