"""The training watchdog: a worker that makes no progress fails with a message naming what it waited for (and any
build lock present), instead of hanging silently."""

from __future__ import annotations

import time

import pytest

from fastdraft_ray.train.watchdog import TrainingStalled, Watchdog


def test_a_stalled_worker_fails_naming_its_phase_and_the_build_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").touch()
    dog = Watchdog(0.5, rank=1, exit_grace_s=600)
    dog.phase("starting DeepSpeed")
    deadline = time.monotonic() + 30
    try:
        with pytest.raises(TrainingStalled):
            while time.monotonic() < deadline:  # a wait that never ends, like torch's FileBaton.wait
                time.sleep(0.05)
    finally:
        dog.stop()
    assert dog.fired is not None
    assert "worker 1 made no progress for 0.5 s while starting DeepSpeed" in dog.fired
    assert str(tmp_path / "deepspeed_shm_comm" / "lock") in dog.fired


def test_beats_keep_it_quiet_and_zero_turns_it_off():
    dog = Watchdog(0.4, exit_grace_s=600)
    try:
        for _ in range(20):  # 1 s of work in 50 ms steps, each one a beat
            time.sleep(0.05)
            dog.beat()
    finally:
        dog.stop()
    assert dog.fired is None
    off = Watchdog(0)
    time.sleep(0.2)
    assert off.fired is None and off._watcher is None
