"""Loader workers hand tensors over where the system refuses shared-memory file descriptors.

On a gVisor sandbox (the H200 machine lent on 2026-12-04) a worker's batch could not be passed as a
file descriptor ('Bad file descriptor' in the worker's queue thread) and the main process waited for
it forever. slimtune probes that once per process and then shares through named files instead.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from slimtune.data.folder import ImageFolderSource
from slimtune.data.loader import build_loader
from slimtune.preprocessing import get_preprocessing


def _python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=120)


def test_the_probe_fails_where_a_descriptor_cannot_be_duplicated():
    # A real fault: a descriptor limit that leaves exactly one free descriptor, which the shared
    # memory takes, so duplicating it (what handing it to another process does) fails.
    script = """
        import os, resource, sys
        from slimtune.data import loader
        if sys.argv[-1] == "limited":
            lowest_free = os.dup(0)  # a new descriptor takes the lowest free number
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        loader._probe_fd_sharing()
    """
    limited = subprocess.run([sys.executable, "-c", textwrap.dedent(script), "limited"], timeout=120)
    free = subprocess.run([sys.executable, "-c", textwrap.dedent(script), "free"], timeout=120)
    assert (limited.returncode, free.returncode) == (1, 0)


def test_a_failed_probe_switches_to_named_files_in_one_line():
    result = _python("""
        import logging, os, torch.multiprocessing as torch_mp
        logging.basicConfig(format="%(message)s")
        from slimtune.data import loader
        loader._probe_fd_sharing = lambda: os._exit(1)  # the child of the fork runs this
        print(loader.ensure_workers_can_share_tensors(), torch_mp.get_sharing_strategy())
        print(loader.ensure_workers_can_share_tensors())  # once per process: no second probe or line
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["file_system", "file_system", "file_system"]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "file descriptors" in lines[0] and "'file_system'" in lines[0]


def test_where_descriptors_pass_nothing_changes():
    result = _python("""
        import logging, torch.multiprocessing as torch_mp
        logging.basicConfig(format="%(message)s")
        from slimtune.data import loader
        print(loader.ensure_workers_can_share_tensors(), torch_mp.get_sharing_strategy())
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["file_descriptor", "file_descriptor"] and result.stderr == ""


def test_workers_sharing_through_named_files_give_the_same_batches(cats_vs_dogs):
    source = ImageFolderSource(cats_vs_dogs)
    preprocess = get_preprocessing("inception", is_training=True)
    expected = list(build_loader(source, preprocess, (40, 40), batch_size=4, training=True, num_workers=0, seed=3))
    saved = torch.multiprocessing.get_sharing_strategy()
    try:
        torch.multiprocessing.set_sharing_strategy("file_system")
        for pin_memory in (False, True):  # the shared batch ring, and torch's own hand-over
            got = list(build_loader(source, preprocess, (40, 40), batch_size=4, training=True, num_workers=2,
                                    seed=3, pin_memory=pin_memory))
            assert len(got) == len(expected) == 3
            for want, batch in zip(expected, got):
                assert torch.equal(batch.indices, want.indices) and torch.equal(batch.images, want.images)
    finally:
        torch.multiprocessing.set_sharing_strategy(saved)
