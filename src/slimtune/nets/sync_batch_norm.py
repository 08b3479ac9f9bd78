"""--sync_batch_norm: BatchNorm statistics over the global batch of all processes.

torch.nn.SyncBatchNorm is CUDA-only and replaces torch's own BatchNorm class; slimtune's nets use
`layers.BatchNorm` (slim's names and settings), so the synchronization lives here and works on
any backend (gloo on CPU, NCCL on GPU). In training each layer sums, per channel, its count, the
sum and the sum of squares of its inputs (shifted by the moving mean, which every rank holds
identically, to keep the subtraction well conditioned) and all-reduces them: one collective of
2C+1 numbers per layer. The all-reduce is differentiable (its backward all-reduces the gradient),
so the gradient that flows back through the statistics is the one of the global batch: N
processes x batch B compute what one process computes on batch N x B.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layers import BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the incoming gradient.

    Rank r's loss reaches every rank's inputs through the summed statistics; summing the gradient
    over ranks hands each rank the part of all losses that flows through its own inputs.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total, None


def sync_batch_norm(x: Tensor, norm: BatchNorm, group: Any = None) -> Tensor:
    """Normalize `x` [N, C, ...] with the statistics of the batch across all ranks of `group`.

    Updates `norm`'s moving statistics as F.batch_norm does (mean, and unbiased variance of the
    global batch) and returns what F.batch_norm in training mode would return on the global batch.
    """
    dims = [0] + list(range(2, x.dim()))
    channels = x.shape[1]
    shift = norm.running_mean.detach().to(x.dtype).view(1, channels, *([1] * (x.dim() - 2)))
    centered = x - shift
    count = torch.full((1,), float(x.numel() // channels), dtype=x.dtype, device=x.device)
    local = torch.cat([centered.sum(dims), (centered * centered).sum(dims), count])
    total = _AllReduceSum.apply(local, group)
    n = total[-1]
    mean_offset = total[:channels] / n
    variance = (total[channels:2 * channels] / n - mean_offset * mean_offset).clamp(min=0)
    with torch.no_grad():
        momentum = 1.0 - norm.decay
        mean = norm.running_mean + mean_offset.detach().to(norm.running_mean.dtype)
        unbiased = variance.detach().to(norm.running_var.dtype) * (n / (n - 1).clamp(min=1))
        norm.running_mean.mul_(1 - momentum).add_(mean * momentum)
        norm.running_var.mul_(1 - momentum).add_(unbiased * momentum)
    view = (1, channels, *([1] * (x.dim() - 2)))
    out = (centered - mean_offset.view(view)) * torch.rsqrt(variance + norm.eps).view(view)
    if norm.weight is not None:
        out = out * norm.weight.view(view)
    if norm.bias is not None:
        out = out + norm.bias.view(view)
    return out


def enable_sync_batch_norm(model: nn.Module, group: Any = None) -> int:
    """Make every slimtune BatchNorm of `model` synchronize its training statistics; return how many.

    torch's own BatchNorm layers (in a user's net) are left alone: the caller converts them to
    torch.nn.SyncBatchNorm on CUDA and refuses them elsewhere (see `torch_batch_norms`).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, BatchNorm):
            module.sync_group = group if group is not None else _WORLD
            count += 1
    return count


def torch_batch_norms(model: nn.Module) -> list[str]:
    """Names of torch.nn BatchNorm layers (not slimtune's) in `model`."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


# A BatchNorm's `sync_group` for the default process group, which may not exist yet when the net
# is prepared: it is looked up at each forward.
_WORLD = "world"


def group_of(marker: Any) -> Any:
    """The process group a BatchNorm's `sync_group` stands for (None: the default group)."""
    return None if isinstance(marker, str) and marker == _WORLD else marker
