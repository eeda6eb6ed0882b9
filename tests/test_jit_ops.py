"""Build locks of the C++ ops: a lock whose process is gone is cleared (with a warning), a held one is kept, and
a kernel build that finds a stale lock finishes instead of waiting forever."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastdraft_ray.jit_ops import build_locks, clear_stale_locks, extensions_root, held_locks_hint, lock_holders

ROOT = Path(__file__).resolve().parents[1]


def plant(root: Path, op: str) -> Path:
    """A build folder with the lock a killed build leaves behind."""
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    return lock


def test_a_lock_nobody_holds_is_cleared_and_a_held_one_is_kept(tmp_path):
    stale, held = plant(tmp_path, "deepspeed_shm_comm"), plant(tmp_path, "fastdraft_small_batch_linear")
    fd = os.open(held, os.O_RDONLY)  # what a building process does: it keeps its lock open until the build ends
    try:
        assert lock_holders(held) == [os.getpid()] and lock_holders(stale) == []
        assert "deepspeed_shm_comm/lock" in held_locks_hint(tmp_path)
        with pytest.warns(UserWarning, match="stale build lock .*deepspeed_shm_comm"):
            assert clear_stale_locks(tmp_path) == [stale]
        assert build_locks(tmp_path) == [held]
    finally:
        os.close(fd)
    assert clear_stale_locks(tmp_path) == [held] and held_locks_hint(tmp_path) == ""


def test_the_extensions_root_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert extensions_root().name.endswith("_cpu") and "torch_extensions" in str(extensions_root())


@pytest.mark.timeout(300)
def test_a_kernel_build_behind_a_stale_lock_finishes(tmp_path):
    """The small-batch kernel, loaded by a fresh process whose build folder holds a lock left by a killed build:
    before the lock was cleared, torch's FileBaton waited forever (this test then hit its timeout)."""
    from fastdraft_ray.specdec.kernels import cpu_supports_kernel, small_batch_linear_op

    if not cpu_supports_kernel() or small_batch_linear_op() is None:
        pytest.skip("no small-batch kernel on this machine")
    built = extensions_root() / "fastdraft_small_batch_linear"
    shutil.copytree(built, tmp_path / built.name)  # the built op: the fresh process only loads it
    lock = plant(tmp_path, built.name)
    code = "from fastdraft_ray.specdec.kernels import small_batch_linear_op; print(small_batch_linear_op() is not None)"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
    assert "stale build lock" in out.stderr and not lock.exists()
