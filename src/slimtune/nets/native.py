"""Compiling and loading slimtune's small C kernels (`nets/*.c`) on the machine that runs them.

Each kernel is compiled once per machine with the C compiler on PATH (`cc`/`gcc`/`clang`, `-O3
-march=native -fopenmp`: it vectorizes for this CPU and runs on the OpenMP runtime torch already
loaded, so its threads are torch's) into `$SLIMTUNE_HOME/kernels` (default
~/.cache/slimtune/kernels), keyed by the source, the compiler and the CPU's flags. Every kernel is a
speed-up, never a requirement: without a compiler the caller falls back to torch, and the first
fallback of each kernel says so in one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..utils.home import slimtune_home

_COMPILERS = ("cc", "gcc", "clang")
_lock = threading.Lock()
# source path -> the loaded library, or the reason it could not be built (str)
_loaded: dict[Path, Any] = {}


def kernel_enabled(variable: str) -> bool:
    """False when the environment variable `variable` (each kernel's off switch) is 0, false or off."""
    return os.environ.get(variable, "1") not in ("0", "false", "off")


def capturing_graph() -> bool:
    """True while torch.jit or torch.compile captures a graph: it keeps torch's own operations,
    which it can trace, instead of a call into a C library."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def kernel_dir() -> Path:
    """Where compiled kernels live: the `kernels` folder of slimtune's cache ($SLIMTUNE_HOME, default
    ~/.cache/slimtune), next to the published checkpoints."""
    return slimtune_home() / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: str, source: Path) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(source.read_bytes() + version.encode() + _cpu_flags().encode()
                         + platform.machine().encode())
    target = kernel_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: concurrent processes (DDP ranks) never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, "-O3", "-march=native", "-shared", "-fPIC", "-fopenmp", str(source), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise OSError(f"{' '.join(command)} failed: {result.stderr.strip()[-300:]}")
        os.replace(built, target)
    return target


def load_kernel(source: Path, functions: dict[str, Sequence[Any]], fallback: str) -> Optional[ctypes.CDLL]:
    """The compiled library of `source` with `functions` (name -> ctypes argument types, returning
    void) declared, compiling it on first use; None when that is impossible, after one warning
    "slimtune: {fallback} (reason)" per source and process."""
    state = _loaded.get(source)
    if state is not None:
        return None if isinstance(state, str) else state
    with _lock:
        state = _loaded.get(source)
        if state is not None:
            return None if isinstance(state, str) else state
        compiler = next((name for name in _COMPILERS if shutil.which(name)), None)
        try:
            if compiler is None:
                raise OSError("no C compiler (cc, gcc or clang) on PATH")
            library = ctypes.CDLL(str(_compile(compiler, source)))
            for name, argtypes in functions.items():
                function = getattr(library, name)
                function.restype = None
                function.argtypes = list(argtypes)
            _loaded[source] = library
            return library
        except (OSError, AttributeError, subprocess.SubprocessError) as error:
            _loaded[source] = str(error)
            warnings.warn(f"slimtune: {fallback} ({error})", RuntimeWarning, stacklevel=3)
            return None
