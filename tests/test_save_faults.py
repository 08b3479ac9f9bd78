"""Saves that fail or are killed part-way: the previous checkpoint stays complete, named and loadable.

Faults are real: a child process under a file-size limit (RLIMIT_FSIZE: the kernel's EFBIG, as a
quota or a full disk would fail the write), a small tmpfs mounted in a private mount namespace
(`unshare`: a real ENOSPC; skipped where user namespaces are not allowed), and SIGKILL of a child
in the middle of a save.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtune.checkpoint import train_dir as ckpt
from slimtune.checkpoint.reader import read_checkpoint
from slimtune.checkpoint.state_file import read_state_file

SRC = str(Path(__file__).resolve().parents[1] / "src")

# A child that saves step 4 of a seeded Linear+Adam, then step 8 (after one more update) under
# whatever fault the test sets up in FAULT.
CHILD = textwrap.dedent('''
    import os, resource, signal, sys, json
    from pathlib import Path
    import torch
    from slimtune.checkpoint import train_dir as ckpt
    from slimtune.errors import SlimtuneError
    train_dir = Path(sys.argv[1])
    torch.manual_seed(0)
    model = torch.nn.Linear(100, 100)
    optimizer = torch.optim.Adam(model.parameters())
    def update():
        model(torch.randn(4, 100)).square().sum().backward()
        optimizer.step()
    update()
    if not ckpt.latest_checkpoint(train_dir):
        ckpt.save_checkpoint(train_dir, 4, model, {"optimizer": optimizer.state_dict()}, {"model_name": "linear"})
    update()
    FAULT
    try:
        ckpt.save_checkpoint(train_dir, 8, model, {"optimizer": optimizer.state_dict()}, {"model_name": "linear"})
    except SlimtuneError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    print("saved")
''')


def _run_child(train_dir: Path, fault: str, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    code = CHILD.replace("FAULT", textwrap.dedent(fault).strip().replace("\n", "\n") or "pass")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, sys.executable, "-c", code, str(train_dir)], capture_output=True, text=True,
                          env=env, timeout=300)


def _expected_step4(train_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(train_dir / "model.ckpt-4.safetensors"))


def _assert_previous_intact(train_dir: Path, step4: dict[str, torch.Tensor]) -> None:
    """Step 4 is what every reader finds, complete; nothing of step 8 or of a temporary remains."""
    assert read_state_file(train_dir / "checkpoint").model_checkpoint_path == "model.ckpt-4.safetensors"
    latest = ckpt.latest_checkpoint(train_dir)
    assert latest.step == 4 and [c.step for c in ckpt.run_checkpoints(train_dir)] == [4]
    model = torch.nn.Linear(100, 100)
    ckpt.load_weights_into(model, latest.weights)
    assert torch.equal(model.weight.detach(), step4["weight"])
    assert ckpt.load_state(latest)["optimizer"]["state"][0]["step"] == 1
    reader = read_checkpoint(train_dir)  # what eval/predict open for a train_dir
    assert torch.equal(torch.from_numpy(reader["weight"]), step4["weight"])


@pytest.mark.parametrize("limit_kb, failing", [(20, "model.ckpt-8.safetensors"),
                                               pytest.param(60, "model.ckpt-8.state.pt", marks=pytest.mark.slow)])
def test_a_file_size_limit_during_a_save_keeps_the_previous_checkpoint(tmp_path, limit_kb, failing):
    # Linear(100, 100): weights ~40 KB, Adam state ~80 KB. 20 KB stops the weights write part-way;
    # 60 KB lets the weights through and stops the state write (whose weights must then go too).
    assert _run_child(tmp_path, "").returncode == 0
    step4 = _expected_step4(tmp_path)
    (tmp_path / "model.ckpt-8.safetensors").unlink()
    (tmp_path / "model.ckpt-8.state.pt").unlink()
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-4.safetensors"\n')
    child = _run_child(tmp_path, f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_kb * 1024}, {limit_kb * 1024}))")
    assert child.returncode == 2, child.stderr[-2000:]
    lines = child.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in child.stderr
    assert lines[0].startswith(f"file size limit reached (ulimit -f) writing {tmp_path / failing}: ")
    assert " MB needed, " in lines[0] and lines[0].endswith(" MB free")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "model.ckpt-4.safetensors",
                                                          "model.ckpt-4.state.pt"]
    _assert_previous_intact(tmp_path, step4)
    # The rerun without the limit resumes from step 4 and saves step 8.
    assert _run_child(tmp_path, "").returncode == 0
    assert ckpt.latest_checkpoint(tmp_path).step == 8


def _unshare_available(tmp_path: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.parametrize("bypass_precheck", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_full_tmpfs_refuses_the_save_and_keeps_the_previous_checkpoint(tmp_path, bypass_precheck):
    if not _unshare_available(tmp_path):
        pytest.skip("no user/mount namespaces here (unshare -rm): the real-ENOSPC case is not run")
    # In a private mount namespace: a 150 KB tmpfs over a directory, step 4 saved there (~120 KB), then
    # step 8 does not fit. Copy the result out before the namespace (and its tmpfs) goes away.
    mount_point, out = tmp_path / "small", tmp_path / "out"
    mount_point.mkdir()
    # Without the pre-check the write itself meets ENOSPC part-way (the partial file must go).
    fault = "ckpt._tensor_bytes = lambda value: 0" if bypass_precheck else ""
    code = CHILD.replace("FAULT", fault or "pass")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    (tmp_path / "child.py").write_text(code)
    script = (f"mount -t tmpfs -o size=150k tmpfs {mount_point} && "
              f"{sys.executable} {tmp_path / 'child.py'} {mount_point}; status=$?; "
              f"cp -a {mount_point} {out}; exit $status")
    child = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                           timeout=300)
    assert child.returncode == 2, child.stderr[-2000:]
    lines = child.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in child.stderr, child.stderr[-2000:]
    assert lines[0].startswith(f"no space left on device writing {mount_point}/model.ckpt-8.")
    free_mb = float(lines[0].split(" MB needed, ")[1].split(" MB free")[0])
    assert free_mb < 0.15
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "model.ckpt-4.safetensors", "model.ckpt-4.state.pt"]
    _assert_previous_intact(out, _expected_step4(out))
    assert _run_child(out, "").returncode == 0  # on a disk with room the rerun resumes and saves
    assert ckpt.latest_checkpoint(out).step == 8


# ---- SIGKILL in the middle of a save ----
# The child writes the real bytes of the file it is at, stops half-way through them (as a kill
# during the write leaves the file), and sends itself SIGKILL; or it is killed between two files.

KILL_POINTS = {
    "during the weights write": '''
        real = ckpt.save_file
        def half_then_kill(tensors, path, metadata=None):
            from safetensors.torch import save
            data = save(tensors, metadata=metadata)
            with open(path, "wb") as handle:
                handle.write(data[: len(data) // 2]); handle.flush(); os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt.save_file = half_then_kill
    ''',
    "during the state write": '''
        real = torch.save
        def half_then_kill(obj, handle):
            import io
            buffer = io.BytesIO(); real(obj, buffer); data = buffer.getvalue()
            handle.write(data[: len(data) // 2]); handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt.torch.save = half_then_kill
    ''',
    "between the weights and the state": '''
        real = os.replace
        def replace_then_kill(a, b):
            real(a, b)
            if str(b).endswith(".safetensors"):
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.os.replace = replace_then_kill
    ''',
    "between the state and the state file": '''
        real = os.replace
        def replace_then_kill(a, b):
            real(a, b)
            if str(b).endswith(".state.pt"):
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.os.replace = replace_then_kill
    ''',
    "during the state file write": '''
        real = ckpt._atomic_write
        def kill_in_state_file(path, write, needed):
            if path.name == "checkpoint":
                handle = open(str(path) + ".tmp", "wb"); handle.write(b'model_checkpoint_path: "model.ck'); handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, write, needed)
        ckpt._atomic_write = kill_in_state_file
    ''',
    "after the state file, before pruning": '''
        real = ckpt._atomic_write
        def write_then_kill(path, write, needed):
            real(path, write, needed)
            if path.name == "checkpoint":
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt._atomic_write = write_then_kill
    ''',
}


# Each point is three child processes; the default run keeps the first, the rest are slow.
@pytest.mark.parametrize("point", [p if i == 0 else pytest.param(p, marks=pytest.mark.slow)
                                   for i, p in enumerate(KILL_POINTS)])
def test_a_save_killed_at_any_point_leaves_a_loadable_checkpoint(tmp_path, point):
    assert _run_child(tmp_path, "").returncode == 0  # steps 4 and 8, for the expected values
    step8 = load_file(str(tmp_path / "model.ckpt-8.safetensors"))
    for name in ("model.ckpt-8.safetensors", "model.ckpt-8.state.pt"):
        (tmp_path / name).unlink()
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-4.safetensors"\n')
    step4 = _expected_step4(tmp_path)
    child = _run_child(tmp_path, KILL_POINTS[point])
    assert child.returncode == -9, child.stderr[-2000:]  # really killed
    latest = ckpt.latest_checkpoint(tmp_path)
    expected = step8 if point == "after the state file, before pruning" else step4
    assert latest.step == (8 if expected is step8 else 4)
    model = torch.nn.Linear(100, 100)
    ckpt.load_weights_into(model, latest.weights)
    assert torch.equal(model.weight.detach(), expected["weight"])
    assert ckpt.load_state(latest)["step"] == latest.step
    assert torch.equal(torch.from_numpy(read_checkpoint(tmp_path)["weight"]), expected["weight"])
    # The next save clears what the killed one left and completes.
    assert _run_child(tmp_path, "").returncode == 0
    assert not list(tmp_path.glob("*.tmp"))
    assert ckpt.latest_checkpoint(tmp_path).step == 8
