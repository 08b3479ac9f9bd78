"""Running a snippet where slimtune's C kernels cannot be built (no compiler on PATH)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slimtune.nets import native

REPO = Path(__file__).resolve().parents[1]

#: Skips (counted) a kernel's tests only where no C compiler is on PATH. With a compiler, a kernel
#: that fails to build is not a skip: the tests then see torch's path and fail.
needs_c_compiler = pytest.mark.skipif(not any(shutil.which(name) for name in native._COMPILERS),
                                      reason="no C compiler on PATH")


def assert_one_fallback_warning(tmp_path: Path, script: str) -> None:
    """Run `script` in a fresh Python with an empty PATH and `tmp_path/cache` as $SLIMTUNE_HOME. The
    script prints '<warnings about its kernel> <kernel calls> <first such warning>'; the kernel must
    have warned exactly once, in one line naming the missing compiler, and never run."""
    env = {**os.environ, "PATH": str(tmp_path), "SLIMTUNE_HOME": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    count, calls, message = result.stdout.strip().split(" ", 2)
    assert (count, calls) == ("1", "0")
    assert "no C compiler" in message and "\n" not in message
