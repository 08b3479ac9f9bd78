"""The front door: `read_checkpoint(path)` for any supported weight file, `write_tf_checkpoint`.

The format is sniffed from content (magic numbers), not trusted from the extension; a path may
be a V1 file, a V2 prefix or any of its files, a directory (its `checkpoint` state file, else
the only checkpoint inside), or a safetensors / torch / numpy file.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Mapping

from slimtune.checkpoint.base import CheckpointReader
from slimtune.checkpoint.tf_table import MAGIC_BYTES, NO_COMPRESSION
from slimtune.errors import CheckpointError

SUPPORTED = "a TF V1 file or V2 prefix, .safetensors, a torch state_dict (.pth/.pt/.bin), .npy dict or .npz"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npy", ".npz")
# When the bytes match no known magic, the extension picks the parser, so that a damaged file
# gets that parser's specific complaint instead of "unrecognised".
_SUFFIX_FORMATS = {".safetensors": "safetensors", ".pth": "torch", ".pt": "torch", ".npy": "numpy", ".npz": "numpy"}


def read_checkpoint(path: str | os.PathLike, *, verify_checksums: bool = True) -> CheckpointReader:
    """Open any supported checkpoint lazily; raise CheckpointError with one clear line if we can't."""
    from slimtune.checkpoint.tf_v2 import TFV2Reader, strip_v2_suffix

    original = Path(path).expanduser()
    target = _resolve_directory(original) if original.is_dir() else original
    prefix = strip_v2_suffix(str(target))
    if Path(prefix + ".index").is_file():
        return TFV2Reader(prefix, verify_checksums=verify_checksums)
    if not target.is_file():
        if target.exists():   # a fifo would block the sniffing read; a device never ends
            raise CheckpointError(f"checkpoint {original} is not a regular file (a pipe, device or socket)")
        raise CheckpointError(f"checkpoint not found: {original} (no such file, and no {original}.index)")
    kind = sniff_format(target) or _SUFFIX_FORMATS.get(target.suffix.lower())
    if kind == "tf_table":
        from slimtune.checkpoint.tf_v1 import TFV1Reader

        return TFV1Reader(target, verify_checksums=verify_checksums)
    if kind == "safetensors":
        from slimtune.checkpoint.torch_io import SafetensorsReader

        return SafetensorsReader(target)
    if kind == "torch":
        from slimtune.checkpoint.torch_io import TorchReader

        return TorchReader(target, verify_checksums=verify_checksums)
    if kind == "numpy":
        from slimtune.checkpoint.torch_io import NumpyReader

        return NumpyReader(target)
    raise CheckpointError(f"unrecognised checkpoint format: {target} (expected {SUPPORTED})")


def sniff_format(path: Path) -> str | None:
    """Guess a file's format from its bytes: tf_table, safetensors, torch, numpy, or None."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(16)
        tail = b""
        if size >= 48:
            handle.seek(size - 8)
            tail = handle.read(8)
    if tail == MAGIC_BYTES:
        return "tf_table"
    if head.startswith(b"\x93NUMPY"):
        return "numpy"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, NotImplementedError, ValueError, EOFError):
            return None   # the extension's parser says what is wrong
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "numpy"
        return None
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch"   # legacy (non-zip) torch.save: a bare pickle stream
    return None


def _resolve_directory(directory: Path) -> Path:
    """Pick the checkpoint a directory means: the `checkpoint` state file's latest, else the only one."""
    from slimtune.checkpoint.state_file import STATE_FILENAME, read_state_file

    state = directory / STATE_FILENAME
    if state.is_file():
        latest = read_state_file(state).model_checkpoint_path
        if latest:
            named = Path(latest)
            for candidate in (named if named.is_absolute() else directory / named, directory / named.name):
                if candidate.is_file() or Path(f"{candidate}.index").is_file():
                    return candidate
            raise CheckpointError(f"{state} names {named}, which does not exist in {directory}")
    found = list_checkpoints(directory)
    if len(found) == 1:
        return found[0]
    if not found:
        listing = ", ".join(sorted(p.name for p in directory.iterdir())[:20]) or "nothing"
        raise CheckpointError(f"no checkpoint in directory {directory} (it holds: {listing})")
    names = ", ".join(sorted(p.name for p in found))
    raise CheckpointError(f"directory {directory} holds several checkpoints ({names}); pass one of them")


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints directly inside a directory: V2 prefixes, V1 files and weight files."""
    from slimtune.checkpoint.tf_v1 import SHARD_PATTERN

    found: dict[str, Path] = {}
    for entry in sorted(directory.iterdir()):
        if not entry.is_file():
            continue
        name = entry.name
        if name.endswith(".index"):
            found[name[: -len(".index")]] = entry.with_name(name[: -len(".index")])
        elif (re.search(r"\.data-\d{5}-of-\d{5}$", name)
              or name.endswith((".meta", ".state.pt", ".tmp", ".ema.safetensors")) or name == "checkpoint"):
            # a run's training state and unfinished writes hold no weights; moving averages go with theirs
            continue
        elif name.endswith(_WEIGHT_SUFFIXES):
            found[name] = entry
        elif sniff_format(entry) == "tf_table":
            shard = SHARD_PATTERN.match(name)
            found[shard["base"] if shard else name] = entry   # one entry per sharded V1 set
    return list(found.values())


def write_tf_checkpoint(
    prefix_or_path: str | os.PathLike,
    tensors: Mapping[str, object],
    version: int = 2,
    *,
    compression: int = NO_COMPRESSION,
) -> Path:
    """Write tensors (numpy arrays or torch tensors) as a TF checkpoint TensorFlow can read.

    version=2: `<prefix>.index` + `<prefix>.data-00000-of-00001`, returns the prefix.
    version=1: one table file at the path, returns it (`compression` may ask for snappy blocks).
    """
    if version == 2:
        from slimtune.checkpoint.tf_v2 import write_v2

        return write_v2(prefix_or_path, tensors)
    if version == 1:
        from slimtune.checkpoint.tf_v1 import write_v1

        return write_v1(prefix_or_path, tensors, compression=compression)
    raise CheckpointError(f"TF checkpoint version must be 1 or 2, not {version!r}")
