"""slimtune's one cache directory on this machine (published checkpoints, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def slimtune_home(cache_dir: Optional[str] = None) -> Path:
    """The directory slimtune caches into: `cache_dir` when given, else $SLIMTUNE_HOME, else
    ~/.cache/slimtune. Published checkpoints are looked up there; compiled kernels go to its
    `kernels/` folder."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("SLIMTUNE_HOME"):
        return Path(os.environ["SLIMTUNE_HOME"]).expanduser()
    return Path("~/.cache/slimtune").expanduser()
