"""TensorFlow's `checkpoint` state file: the one parser and the one writer.

The file is a text-format `CheckpointState` protobuf naming the latest checkpoint of a directory:

    model_checkpoint_path: "model.ckpt-200"
    all_model_checkpoint_paths: "model.ckpt-100"
    all_model_checkpoint_paths: "model.ckpt-200"
    all_model_checkpoint_timestamps: 1712345678.5
    last_preserved_timestamp: 1712345000.1

Both the reader's directory resolution and train_dir resumption use this module, so a file means the
same thing to both. Strings may use either quote and C escapes (text_format's rules); the bytes they
decode to must be UTF-8. Anything else in the file is refused in one line rather than guessed at.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from slimtune.errors import CheckpointError

STATE_FILENAME = "checkpoint"
# A state file is a few lines per kept checkpoint; anything far larger is not one.
_MAX_BYTES = 1 << 20
_STRING_FIELDS = ("model_checkpoint_path", "all_model_checkpoint_paths")
_NUMBER_FIELDS = ("all_model_checkpoint_timestamps", "last_preserved_timestamp")
_LINE = re.compile(r"""^\s*([A-Za-z_]+)\s*:\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'|([-+0-9.eEinfINFa]+))\s*$""")
_SIMPLE_ESCAPES = {"n": b"\n", "t": b"\t", "r": b"\r", "a": b"\a", "b": b"\b", "f": b"\f", "v": b"\v",
                   "\\": b"\\", "'": b"'", '"': b'"', "?": b"?"}


@dataclass
class CheckpointState:
    """What a `checkpoint` state file says: the latest checkpoint and all those kept."""

    model_checkpoint_path: Optional[str] = None
    all_model_checkpoint_paths: list[str] = field(default_factory=list)


def _unescape(text: str, where: str) -> str:
    """text_format's C escapes (\\n, \\", \\ooo octal, \\xHH) -> bytes -> UTF-8 text."""
    out = bytearray()
    index = 0
    while index < len(text):
        char = text[index]
        if char != "\\":
            out += char.encode("utf-8")
            index += 1
            continue
        nxt = text[index + 1]  # the line pattern guarantees a character after each backslash
        if nxt in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[nxt]
            index += 2
        elif nxt in "01234567":
            digits = re.match(r"[0-7]{1,3}", text[index + 1:]).group(0)
            out.append(int(digits, 8) & 0xFF)
            index += 1 + len(digits)
        elif nxt in "xX" and re.match(r"[0-9A-Fa-f]{1,2}", text[index + 2:]):
            digits = re.match(r"[0-9A-Fa-f]{1,2}", text[index + 2:]).group(0)
            out.append(int(digits, 16))
            index += 2 + len(digits)
        else:
            raise CheckpointError(f"{where}: unknown escape \\{nxt}")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{where}: the path is not UTF-8 text (byte {error.start})") from None


def read_state_file(path: str | os.PathLike) -> CheckpointState:
    """Parse a `checkpoint` state file; one-line CheckpointError for anything that is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_BYTES + 1)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the checkpoint state file ({error.strerror})") from None
    if len(raw) > _MAX_BYTES:
        raise CheckpointError(f"{path}: over {_MAX_BYTES // 1024} KiB, not a checkpoint state file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise CheckpointError(f"{path}: line {line} is not UTF-8 text; not a checkpoint state file") from None
    state = CheckpointState()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}: line {number}"
        match = _LINE.match(line)
        if not match or match.group(1) not in _STRING_FIELDS + _NUMBER_FIELDS:
            raise CheckpointError(f"{where} is not a checkpoint state line ({line.strip()[:60]!r})")
        key = match.group(1)
        quoted = match.group(2) if match.group(2) is not None else match.group(3)
        if key in _STRING_FIELDS:
            if quoted is None:
                raise CheckpointError(f"{where}: {key} needs a quoted path")
            value = _unescape(quoted, where)
            if key == "model_checkpoint_path":
                state.model_checkpoint_path = value
            else:
                state.all_model_checkpoint_paths.append(value)
        elif quoted is not None:
            raise CheckpointError(f"{where}: {key} needs a number")
    return state


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def format_state(latest: str, all_paths: list[str]) -> str:
    """The text of a state file naming `latest` and every kept checkpoint (TF's field order)."""
    lines = [f"model_checkpoint_path: {_quote(latest)}"]
    lines += [f"all_model_checkpoint_paths: {_quote(p)}" for p in all_paths]
    return "\n".join(lines) + "\n"
