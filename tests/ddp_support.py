"""Helpers for multi-process tests inside one pytest process: N ranks of a gloo group on localhost.

`run_ranks(fn, world_size, tmp_path, *args)` starts `fn(rank, world_size, out_dir, *args)` in
`world_size` fresh processes that share a FileStore-initialized gloo group, waits for them (with a
timeout, so a deadlock fails the test instead of hanging it) and returns what each rank saved with
`save_result` (a weights-only torch file per rank).
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch


def _rank_main(fn: Callable[..., None], rank: int, world_size: int, out_dir: str, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60),
                            init_method=f"file://{out_dir}/store")
    try:
        fn(rank, world_size, Path(out_dir), *args)
    except BaseException:
        (Path(out_dir) / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., None], world_size: int, out_dir: Path, *args: Any, timeout: float = 300) -> list[Any]:
    """Run fn on `world_size` ranks; return each rank's saved result (see `save_result`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_rank_main, args=(fn, rank, world_size, str(out_dir), args))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join(timeout)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    errors = [p.read_text() for p in sorted(out_dir.glob("error-*.txt"))]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    return [torch.load(out_dir / f"result-{rank}.pt", weights_only=True) for rank in range(world_size)]


def save_result(out_dir: Path, rank: int, result: Any) -> None:
    """Hand a rank's result (tensors, numbers, lists, dicts) back to `run_ranks`."""
    torch.save(result, out_dir / f"result-{rank}.pt")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_ranks(args: list[str], world_size: int, env: dict[str, str] | None = None,
                 timeout: float = 600) -> list[tuple[int | None, str, str]]:
    """Start `python -m slimtune.cli *args` as `world_size` ranks of one job, the way torchrun (or
    SLURM's srun) sets them up, but each with its own stdout/stderr; return (exit code, stdout,
    stderr) per rank. A rank still running after `timeout` seconds is killed (exit code None)."""
    import os
    import subprocess
    import sys
    import time

    port = free_port()
    processes = []
    for rank in range(world_size):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, "-m", "slimtune.cli", *args], env=rank_env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((process.returncode, out, err))
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            results.append((None, out, err))
    return results
