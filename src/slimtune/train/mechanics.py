"""The pieces of one optimizer step that flags switch: precision, compilation, accumulation, clipping.

Kept out of loop.py so that the loop reads as the order of business and these rules can be tested
on their own.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..compiled_inference import check_compiler  # noqa: F401  (the loop's --compile check)
from ..errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def cpu_has_bf16() -> bool:
    """Whether this processor computes bfloat16 natively (AVX512-BF16 or AMX), as oneDNN sees it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(precision: str, amp: bool, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for --precision on this device (None: plain float32).

    The deprecated --amp means what it always did: bfloat16 on CPU, float16 on CUDA. float16 needs
    CUDA (its narrow range needs loss scaling, which slimtune does with CUDA's GradScaler only).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if amp and precision == "fp32":
        precision = "bf16" if device.type == "cpu" else "fp16"
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError(f"--precision fp16 needs a CUDA device (this run is on {device.type}); "
                              f"valid choices here: fp32, bf16")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bfloat16 support; valid choices here: fp32, fp16")
    if device.type == "cpu" and not cpu_has_bf16():
        print("slimtune: warning: this processor has no bfloat16 instructions (avx512_bf16 or AMX): "
              "--precision bf16 runs emulated, usually slower than fp32", file=sys.stderr, flush=True)
    return torch.bfloat16


def micro_batch_groups(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive groups of `size` batches (the last group of an epoch may be shorter): the
    micro-batches of one optimizer step under --accumulate_steps."""
    group: list[Any] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def loss_shares(targets: Sequence[torch.Tensor], multi_label: bool) -> list[float]:
    """Weight of each micro-batch's mean loss so that their sum is the mean over the whole group.

    Softmax losses average over images; the sigmoid loss averages over labelled (non -1)
    entries, so those are what is counted there. Equal micro-batches get 1/N each.
    """
    counts = [int((t >= 0).sum()) if multi_label else int(t.shape[0]) for t in targets]
    total = sum(counts)
    if total == 0:
        return [1.0 / len(counts)] * len(counts)
    return [count / total for count in counts]


@torch.no_grad()
def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float, mode: str = "per_tensor") -> torch.Tensor:
    """Clip gradients in place; returns the global gradient norm before clipping.

    per_tensor is slim's create_train_op(clip_gradient_norm=...): each gradient scaled by
    max_norm / max(its own L2 norm, max_norm) (tf.clip_by_norm). global is torch's
    clip_grad_norm_: all gradients together scaled so that their joint norm is at most max_norm.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    if mode == "global":
        factor = max_norm / torch.clamp(total, min=max_norm)
        torch._foreach_mul_(grads, factor.to(grads[0].dtype))
    elif mode == "per_tensor":
        torch._foreach_mul_(grads, [max_norm / torch.clamp(n, min=max_norm) for n in norms])
    else:
        raise ConfigError(f"--clip_gradient_mode {mode!r} is not one of per_tensor, global")
    return total
