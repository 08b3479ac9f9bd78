"""Running a snippet where slimtune's C kernels cannot be built (no compiler on PATH)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
