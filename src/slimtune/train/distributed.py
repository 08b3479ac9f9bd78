"""What training needs to run on many processes properly (torchrun, DDP), kept out of the loop.

- Resuming at another world size: the global batch (processes x --batch_size) and the images of an
  epoch are properties of the run, saved with each checkpoint; a resumed run keeps them, so the
  global step, the sample position and the schedule carry over (`resume_batch_size`).
- One outcome for every rank: a mistake found while preparing (a train_dir of another class count,
  a world size that cannot keep the global batch) stops every rank with the same line instead of
  leaving the others waiting in a collective (`agree_on_setup`).
- A rank that stops answering (timeout) or dies (connection closed) is named (`lost_ranks_error`).
- DistributedDataParallel with the options that matter at scale (`wrap_ddp`).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import errors
from ..errors import ConfigError, SlimtuneError
from ..runtime import Runtime

_MESSAGE_BYTES = 2048


class DistributedError(SlimtuneError):
    """Another rank failed, or stopped answering: every rank stops with this one line."""


# ---------------------------------------------------------------------------------------------
# Resuming at another world size.

def epoch_samples(num_samples: int, world_size: int) -> int:
    """Images one epoch trains on: all of them, less the remainder that would leave ranks uneven."""
    return num_samples - num_samples % world_size if world_size > 1 else num_samples


def run_shape(state: dict[str, Any]) -> Optional[tuple[int, int, int]]:
    """(world size, per-process batch, epoch images) a checkpoint's run trained with; None for
    checkpoints written before they were recorded."""
    try:
        return int(state["world_size"]), int(state["batch_size"]), int(state["epoch_samples"])
    except (KeyError, TypeError, ValueError):
        return None


def resume_batch_size(saved: tuple[int, int, int], batch_size: int, world_size: int,
                      train_dir: Any) -> tuple[int, Optional[str]]:
    """The per-process batch that keeps the saved run's global batch at `world_size`, and a line
    saying so when it differs from --batch_size.

    Rerunning the same command with fewer (or more) processes resumes: --batch_size as first given
    is taken as the old per-process batch and scaled. Any other --batch_size would change the global
    batch, hence the meaning of every step, the schedule and the sample position: refused in one line.
    """
    saved_world, saved_batch, _ = saved
    global_batch = saved_world * saved_batch
    if world_size == saved_world and batch_size == saved_batch:
        return batch_size, None
    if batch_size not in (saved_batch, global_batch // world_size) or global_batch % world_size:
        fits = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
        if global_batch % world_size:
            raise ConfigError(f"{train_dir} trains with a global batch of {global_batch} ({saved_world} processes x "
                              f"{saved_batch}), which {world_size} processes cannot split evenly: resume with "
                              f"{_or_list(fits[:12])} processes, or start a new --train_dir from it "
                              f"(--checkpoint_path {train_dir})")
        raise ConfigError(f"{train_dir} trains with a global batch of {global_batch} ({saved_world} processes x "
                          f"{saved_batch}); --batch_size {batch_size} with {world_size} processes would make it "
                          f"{batch_size * world_size}: pass --batch_size {global_batch // world_size} (or the "
                          f"original {saved_batch}), or start a new --train_dir from it (--checkpoint_path {train_dir})")
    adjusted = global_batch // world_size
    return adjusted, (f"Resuming a run of {saved_world} processes x {saved_batch} images with {world_size} "
                      f"process{'es' if world_size > 1 else ''}: --batch_size {adjusted} per process keeps the "
                      f"global batch of {global_batch} (same steps, schedule and sample position)")


def check_even_epoch(samples: int, batch_size: int, world_size: int) -> None:
    """Refuse an epoch that `world_size` ranks would take in different numbers of steps (a rank
    with one step more would wait for the others forever)."""
    counts = {math.ceil(len(range(rank, samples, world_size)) / batch_size) for rank in range(world_size)}
    if len(counts) > 1:
        raise ConfigError(f"an epoch of {samples} images does not split into equal steps over {world_size} "
                          f"processes of {batch_size}; resume with a world size that divides {samples}")


def _or_list(values: list[int], word: str = "or") -> str:
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else f"{', '.join(text[:-1])} {word} {text[-1]}"


# ---------------------------------------------------------------------------------------------
# The same outcome on every rank.

def _encode(message: Optional[str], device: torch.device) -> torch.Tensor:
    data = (message or "").encode("utf-8")[:_MESSAGE_BYTES - 1]
    row = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    if message is not None:
        row[0] = 1
        row[1:1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return row.to(device)


def _decode(row: torch.Tensor) -> Optional[str]:
    if int(row[0]) == 0:
        return None
    data = bytes(row[1:].cpu().tolist()).rstrip(b"\0")
    return data.decode("utf-8", errors="replace")


def agree_on_setup(runtime: Runtime, error: Optional[BaseException]) -> Optional[BaseException]:
    """Collective: every rank says how its preparation ended; returns the error this rank raises.

    Called once by every rank, either with None (prepared) or with the error it hit. When any rank
    failed, all raise the error of the lowest failing rank: a slimtune error with the same class and
    text, anything else (a bug) as one line naming the rank (that rank keeps its own traceback).
    """
    if not runtime.distributed:
        return error
    if error is None:
        text = None
    elif isinstance(error, SlimtuneError):
        text = f"{type(error).__name__}\0{error}"
    else:
        text = f"\0rank {runtime.rank} failed before training started: {type(error).__name__}: " \
               f"{str(error).splitlines()[0] if str(error) else ''}"
    rows = [torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8, device=runtime.device) for _ in range(runtime.world_size)]
    dist.all_gather(rows, _encode(text, runtime.device))
    failures = [message for message in map(_decode, rows) if message is not None]
    if not failures:
        return None
    class_name, _, message = failures[0].partition("\0")
    if error is not None and not isinstance(error, SlimtuneError) and not class_name \
            and message.startswith(f"rank {runtime.rank} "):
        return error  # this rank's own bug: its traceback is the useful report
    kind = getattr(errors, class_name, None) if class_name else None
    if not (isinstance(kind, type) and issubclass(kind, SlimtuneError)):
        kind = DistributedError
    return kind(message)


_LOST_MARKERS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                 "communicator was aborted", "nccl", "gloo")


def looks_like_lost_rank(error: BaseException) -> bool:
    """A collective that failed because a peer stopped answering or went away."""
    if isinstance(error, SlimtuneError):
        return False
    text = str(error).lower()
    backend_error = getattr(dist, "DistBackendError", None)
    return (backend_error is not None and isinstance(error, backend_error)) or any(m in text for m in _LOST_MARKERS)


def _store() -> Any:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001  (no group, or a torch without this private helper: no names then)
        return None


def lost_ranks_error(error: BaseException, runtime: Runtime, timeout_secs: Optional[float], step: int,
                     grace_secs: Optional[float] = None) -> DistributedError:
    """One line naming the ranks that did not answer after a collective failed.

    The collective itself cannot say who was missing; the rendezvous store can: every rank whose
    collective failed checks in there, waits a little for the others, and names the ranks that never
    checked in (stuck, or dead). The store lives in torchrun's agent (or rank 0's process), so this
    works while the group's own connections are broken.
    """
    cause = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    waited = f"--distributed_timeout {timeout_secs:g} s" if timeout_secs else "the collective timeout"
    store = _store()
    missing: Optional[list[int]] = None
    if store is not None:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefix = f"slimtune/lost/{attempt}"
        grace = grace_secs if grace_secs is not None else min(max(5.0, 0.5 * (timeout_secs or 10.0)), 60.0)
        try:
            store.set(f"{prefix}/{runtime.rank}", str(step))
            deadline = time.monotonic() + grace
            while True:
                present = [rank for rank in range(runtime.world_size) if store.check([f"{prefix}/{rank}"])]
                if len(present) == runtime.world_size or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            missing = [rank for rank in range(runtime.world_size) if rank not in present]
        except Exception:  # noqa: BLE001  (the store went too, its host being the stuck process: say what we know)
            missing = None
    if missing:
        who = f"rank {missing[0]}" if len(missing) == 1 else f"ranks {_or_list(missing, 'and')}"
        verb = "stopped responding" if "time" in cause.lower() else "stopped responding or exited"
        return DistributedError(f"{who} {verb} (rank {runtime.rank} waited at step {step} for {waited}): "
                                f"check that process (out of memory, a stuck disk or network, a crash above); "
                                f"raise --distributed_timeout for slow steps [{cause}]")
    return DistributedError(f"a collective failed at step {step} on rank {runtime.rank} and no other rank could "
                            f"be reached to tell which one stopped (rank 0 hosts the rendezvous store when "
                            f"torchrun does not) after {waited} [{cause}]")


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel with the options that matter at scale.

def wrap_ddp(module: nn.Module, runtime: Runtime, find_unused_parameters: bool = False,
             bucket_cap_mb: float = 25.0) -> DistributedDataParallel:
    """DDP over `module`: gradients are all-reduced in buckets of `bucket_cap_mb` while backward
    still runs (a bucket goes as soon as all its gradients exist), straight from the gradients'
    memory (gradient_as_bucket_view: no second copy).

    find_unused_parameters costs a graph traversal every step; frozen scopes never need it (frozen
    tensors are not DDP's), nor does an aux head without loss weight (the caller freezes it).
    """
    return DistributedDataParallel(module, device_ids=[runtime.device] if runtime.device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters, bucket_cap_mb=bucket_cap_mb,
                                   gradient_as_bucket_view=True)


def unused_parameters(model: nn.Module) -> list[str]:
    """Trainable parameters without a gradient after a backward: DDP (without
    find_unused_parameters) would wait for them forever at the next step."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad and parameter.grad is None]


def unused_parameters_error(names: list[str]) -> ConfigError:
    """The one line for trainable tensors the loss never reaches."""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return ConfigError(f"{len(names)} trainable tensors get no gradient from the loss ({shown}): freeze them with "
                       f"--trainable_scopes, or pass --find_unused_parameters (slower: it searches the graph "
                       f"every step)")


def rank0_then_wait(runtime: Runtime) -> None:
    """Every rank waits here until rank 0 has finished writing (a checkpoint): nobody leaves a
    collective decision (stop, finish) while rank 0 is still saving, so torchrun never tears rank 0
    down mid-save because another rank already exited."""
    if runtime.distributed:
        dist.barrier()
