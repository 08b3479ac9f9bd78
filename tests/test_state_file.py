"""TF's `checkpoint` state file: one parser for the reader and for train_dir resumption."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from slimtune.checkpoint.reader import read_checkpoint
from slimtune.checkpoint.state_file import format_state, read_state_file
from slimtune.errors import CheckpointError

# Written by TensorFlow 2 (checkpoint_management.update_checkpoint_state) with a name holding
# quotes, a backslash and non-ASCII letters, plus the timestamp fields TF adds.
TF_WRITTEN = Path(__file__).parent / "fixtures" / "state_file" / "checkpoint"
TRICKY = 'model "q\\uotes" ünï.ckpt-20'


def test_parses_the_file_tensorflow_wrote():
    state = read_state_file(TF_WRITTEN)
    assert state.model_checkpoint_path == TRICKY
    assert state.all_model_checkpoint_paths == ["model.ckpt-10", TRICKY]


def test_what_we_write_reads_back_as_tensorflow_wrote_it(tmp_path):
    # TF's own reader was checked on this output when the fixture was made (same two names back).
    (tmp_path / "checkpoint").write_text(format_state(TRICKY, ["model.ckpt-10", TRICKY]), encoding="utf-8")
    assert (tmp_path / "checkpoint").read_bytes().splitlines() == TF_WRITTEN.read_bytes().splitlines()[:3]
    assert read_state_file(tmp_path / "checkpoint") == read_state_file(TF_WRITTEN)


def test_octal_and_single_quoted_escapes_as_text_format_reads_them(tmp_path):
    (tmp_path / "checkpoint").write_bytes(b"model_checkpoint_path: 'a\\303\\274\\x62'\n")
    assert read_state_file(tmp_path / "checkpoint").model_checkpoint_path == "a\u00fcb"


@pytest.mark.parametrize("content, message", [
    (b'model_checkpoint_path: "model.ckpt-\xff"\n', "line 1 is not UTF-8"),
    (b'all_model_checkpoint_paths: "a"\nmodel_checkpoint_path: "\\377"\n', "line 2: the path is not UTF-8"),
    (b"this is not a state file\n", "line 1 is not a checkpoint state line"),
    (b'model_checkpoint_path: 12\n', "needs a quoted path"),
    (b'model_checkpoint_path: "unterminated\n', "line 1 is not a checkpoint state line"),
])
def test_a_damaged_state_file_is_one_line(tmp_path, content, message):
    (tmp_path / "checkpoint").write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as raised:
        read_state_file(tmp_path / "checkpoint")
    assert "\n" not in str(raised.value)
    # The reader's directory resolution goes through the same parser.
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(tmp_path)


def test_the_reader_follows_the_state_file_to_the_named_checkpoint(tmp_path):
    fixtures = Path(__file__).parent / "fixtures" / "tf_checkpoints"
    for part in (fixtures / "dtypes_v2").iterdir():
        shutil.copy(part, tmp_path / part.name)
    shutil.copy(fixtures / "dtypes_v1.ckpt", tmp_path / "dtypes_v1.ckpt")
    (tmp_path / "checkpoint").write_text(format_state("model.ckpt", ["dtypes_v1.ckpt", "model.ckpt"]))
    assert type(read_checkpoint(tmp_path)).__name__ == "TFV2Reader"
    (tmp_path / "checkpoint").write_text(format_state("dtypes_v1.ckpt", ["dtypes_v1.ckpt"]))
    assert type(read_checkpoint(tmp_path)).__name__ == "TFV1Reader"
