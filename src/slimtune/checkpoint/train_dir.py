"""Run checkpoints in a train_dir: safetensors weights + training state, never half-written.

Written by `train`, read by train (resume), eval, predict and features; it sits below all of them.

Layout (one pair per saved step, plus TF's `checkpoint` state file naming the latest):
    model.ckpt-<step>.safetensors   weights (torch names) with metadata: model_name, num_classes, step
    model.ckpt-<step>.ema.safetensors  with --moving_average_decay: the same weights file with the moving
                                    averages in place of the raw weights (eval/predict/export prefer it)
    model.ckpt-<step>.state.pt      optimizer, step, epoch position, RNG (loaded with weights_only=True)
    checkpoint                      model_checkpoint_path: "model.ckpt-<step>.safetensors" (TF's format)
Each file is written to a temporary name, flushed to disk and renamed; the state file is updated
last, so a run killed at any moment leaves the previous checkpoint intact and referenced.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimtune.checkpoint.reader import list_checkpoints
from slimtune.checkpoint.state_file import STATE_FILENAME, format_state, read_state_file
from slimtune.errors import CheckpointError, ConfigError, DiskFullError

_CKPT_RE = re.compile(r"^model\.ckpt-(\d+)\.safetensors$")


@dataclass
class TrainCheckpoint:
    """A saved training step: its weight file and its state file."""

    weights: Path
    state: Path
    step: int

    def metadata(self) -> dict[str, str]:
        """The metadata stored inside the weights file."""
        return read_metadata(self.weights)

    @property
    def averages(self) -> Optional[Path]:
        """The moving-average weights saved with this step, or None (a run without averages)."""
        path = averages_path(self.weights)
        return path if path.is_file() else None


def averages_path(weights: Path) -> Path:
    """Where the moving averages of a run's weights file live: model.ckpt-N.ema.safetensors."""
    return weights.with_name(weights.name.replace(".safetensors", ".ema.safetensors"))


_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EFBIG: "file size limit reached (ulimit -f)"}
_MB = 1024 * 1024


class _RecordingFile(io.RawIOBase):
    """A write-only file that keeps the OSError of a failed write.

    torch.save reports a failed write as a RuntimeError without the errno; through this wrapper the
    original error (ENOSPC, EFBIG) is still known.
    """

    def __init__(self, handle: Any) -> None:
        super().__init__()
        self.handle, self.error = handle, None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise


def _errno_of(error: BaseException, recorded: Optional[OSError]) -> Optional[int]:
    if isinstance(error, OSError) and error.errno:
        return error.errno
    if recorded is not None:
        return recorded.errno
    match = re.search(r"os error (\d+)", str(error))  # safetensors' Rust writer
    return int(match.group(1)) if match else None


def _free_mb(directory: Path) -> float:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize / _MB


def _file_mode() -> int:
    """What a plain open() would give a new file: 0o666 less the umask (torch/safetensors use 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: Path, write: Callable[[Any, Path], None], needed_bytes: int) -> None:
    """Write through a temporary file, fsync, rename; on failure remove the temporary and say why.

    `write` gets an open binary file object and its path (for writers that open the path
    themselves; fsync on our handle flushes their writes too). A full disk or a file-size limit ends in DiskFullError
    with the sizes; the previous file of that name (if any) is untouched.
    """
    temporary = path.with_name(path.name + ".tmp")
    recorder = None
    try:
        with open(temporary, "wb") as handle:
            recorder = _RecordingFile(handle)
            write(recorder, temporary)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, _file_mode())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        code = _errno_of(error, recorder.error if recorder is not None else None)
        if code in _DISK_FULL:
            raise DiskFullError(f"{_DISK_FULL[code]} writing {path}: {needed_bytes / _MB:.1f} MB needed, "
                                f"{_free_mb(path.parent):.1f} MB free") from None
        if isinstance(error, (OSError, RuntimeError)) and not isinstance(error, KeyboardInterrupt):
            raise CheckpointError(f"cannot write {path}: {error}") from error
        raise


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors inside a (nested) state; the size a save needs, give or take headers."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size() + 256
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values()) + 64
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value) + 64
    return 64


def _remove_stale_temporaries(train_dir: Path) -> None:
    """Temporary files of a save that was killed (SIGKILL, power loss) are not checkpoints: drop them."""
    for path in train_dir.glob("model.ckpt-*.tmp"):
        path.unlink(missing_ok=True)
    (train_dir / (STATE_FILENAME + ".tmp")).unlink(missing_ok=True)


def read_metadata(weights: Path) -> dict[str, str]:
    """Metadata of a safetensors file (empty dict if none)."""
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{weights}: not a readable safetensors file ({error})") from error


def save_checkpoint(train_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    metadata: dict[str, str], keep: int = 5,
                    averages: Optional[dict[str, torch.Tensor]] = None) -> TrainCheckpoint:
    """Write weights and state for `step`, point `checkpoint` at them, prune old ones.

    `averages` (a full state_dict of moving-average weights) goes to model.ckpt-N.ema.safetensors
    with the same metadata. Order: weights, averages, state, then the `checkpoint` state file, each
    through a temporary file and a rename. A failure (full disk, file-size limit) removes what this
    save wrote and raises DiskFullError in one line; the previous checkpoint stays complete and named
    by the state file.
    The free space is checked first, so a save that cannot fit writes nothing.
    """
    train_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(train_dir)
    weights_path = train_dir / f"model.ckpt-{step}.safetensors"
    state_path = train_dir / f"model.ckpt-{step}.state.pt"
    averages_file = averages_path(weights_path)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    averaged = ({name: tensor.detach().contiguous().cpu() for name, tensor in averages.items()}
                if averages is not None else None)
    info = {**{k: str(v) for k, v in metadata.items()}, "step": str(step), "format": "slimtune"}
    full_state = {**state, "step": step}
    weights_bytes, state_bytes = _tensor_bytes(tensors) + 8 * len(json.dumps(info)), _tensor_bytes(full_state)
    needed = weights_bytes * (2 if averaged is not None else 1) + state_bytes
    if needed / _MB > _free_mb(train_dir):
        raise DiskFullError(f"no space left on device writing {weights_path}: {needed / _MB:.1f} MB needed, "
                            f"{_free_mb(train_dir):.1f} MB free; nothing was written, the previous checkpoint "
                            f"is intact")
    previous = {c.step for c in run_checkpoints(train_dir)}
    try:
        # safetensors' writer streams from the tensors (no second copy in memory); Rust errors carry the errno.
        _atomic_write(weights_path, lambda f, p: save_file(tensors, str(p), metadata=info), needed)
        if averaged is not None:
            _atomic_write(averages_file, lambda f, p: save_file(averaged, str(p), metadata={
                **info, "moving_averages": "true"}), needed)
        else:
            averages_file.unlink(missing_ok=True)  # averages of an earlier save of this step are stale
        _atomic_write(state_path, lambda f, p: torch.save(full_state, f), needed)
    except BaseException:
        # Never leave a new weights file without its state (nor a pair the state file doesn't name).
        if step not in previous:
            weights_path.unlink(missing_ok=True)
            averages_file.unlink(missing_ok=True)
            state_path.unlink(missing_ok=True)
        raise
    checkpoints = run_checkpoints(train_dir)
    kept = [c for c in checkpoints if c.step != step][-(keep - 1):] if keep > 1 else []
    kept.append(TrainCheckpoint(weights_path, state_path, step))
    text = format_state(weights_path.name, [c.weights.name for c in kept]).encode("utf-8")
    _atomic_write(train_dir / STATE_FILENAME, lambda f, p: f.write(text), len(text))
    kept_steps = {c.step for c in kept}
    for old in checkpoints:
        if old.step not in kept_steps:
            old.weights.unlink(missing_ok=True)
            averages_path(old.weights).unlink(missing_ok=True)
            old.state.unlink(missing_ok=True)
    return TrainCheckpoint(weights_path, state_path, step)


def run_checkpoints(train_dir: Path) -> list[TrainCheckpoint]:
    """Complete run checkpoints (weights and state present) in a train_dir, oldest first.

    Built on the reader's `list_checkpoints` (the one listing of a directory's checkpoints), kept to
    the files a run writes.
    """
    if not train_dir.is_dir():
        return []
    found = []
    for path in list_checkpoints(train_dir):
        match = _CKPT_RE.match(path.name)
        if match:
            state = path.with_name(path.name.replace(".safetensors", ".state.pt"))
            if state.is_file():
                found.append(TrainCheckpoint(path, state, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(train_dir: Path) -> Optional[TrainCheckpoint]:
    """The checkpoint named by the state file, else the newest complete one, else None."""
    state_file = train_dir / STATE_FILENAME
    if state_file.is_file():
        named = read_state_file(state_file).model_checkpoint_path
        if named:
            weights = train_dir / Path(named).name
            step_match = _CKPT_RE.match(weights.name)
            state = weights.with_name(weights.name.replace(".safetensors", ".state.pt"))
            if step_match and weights.is_file() and state.is_file():
                return TrainCheckpoint(weights, state, int(step_match.group(1)))
    checkpoints = run_checkpoints(train_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_weights(path: str | Path) -> Path:
    """A weights file from a checkpoint file or a train_dir (its latest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path} holds no slimtune checkpoint (model.ckpt-<step>.safetensors)")
        return latest.weights
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def check_same_model(checkpoint: TrainCheckpoint, model_name: str, num_classes: int) -> None:
    """Refuse to resume a train_dir whose checkpoint belongs to another net or class count."""
    meta = checkpoint.metadata()
    stored_model, stored_classes = meta.get("model_name"), meta.get("num_classes")
    if stored_model and stored_model != model_name:
        raise ConfigError(f"train_dir {checkpoint.weights.parent} holds a checkpoint of {stored_model}, "
                          f"not {model_name}: use another --train_dir or --model_name {stored_model}")
    if stored_classes and int(stored_classes) != num_classes:
        raise ConfigError(f"train_dir {checkpoint.weights.parent} holds a {stored_classes}-class checkpoint but "
                          f"this run has {num_classes} classes: use another --train_dir")


def load_state(checkpoint: TrainCheckpoint) -> dict[str, Any]:
    """The training state (optimizer, step, RNG) without unpickling arbitrary objects."""
    try:
        return torch.load(checkpoint.state, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{checkpoint.state}: cannot read training state ({error})") from error


def load_weights_into(model: torch.nn.Module, weights: Path) -> None:
    """Load a slimtune weights file into a model of the same architecture (strict)."""
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not fit this model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}; was it written for another --model_name?")


def load_run_weights(model: torch.nn.Module, weights: Path, moving_average: bool = True) -> Path:
    """Load a run's weights file, or the moving averages saved beside it when there are some and
    `moving_average` is set (slim's eval used the averages); returns the file loaded."""
    averaged = averages_path(weights)
    chosen = averaged if moving_average and weights.name.endswith(".safetensors") and averaged.is_file() \
        else weights
    load_weights_into(model, chosen)
    return chosen


def metadata_json(value: Any) -> str:
    """Encode structured metadata (e.g. class names) for a safetensors header."""
    return json.dumps(value)
