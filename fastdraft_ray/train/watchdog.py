"""A training worker's watchdog: no progress for ``train.watchdog_s`` -> a message naming what the worker was
waiting for (a C++ op build, the teacher, data, a peer), then a clear failure instead of a silent hang.

The loop says what it is doing (``phase``) and beats after each step. When the watchdog fires it logs the
message, raises ``TrainingStalled`` in the training thread (delivered as soon as that thread runs Python again,
e.g. a lock wait's sleep loop), and if the thread is stuck in native code (a collective that never returns)
ends the worker process after ``EXIT_GRACE_S`` so Ray Train sees the failure.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time

from fastdraft_ray.jit_ops import held_locks_hint

log = logging.getLogger(__name__)

EXIT_GRACE_S = 60.0
STALLED_EXIT_CODE = 75


class TrainingStalled(RuntimeError):
    """No training progress for longer than ``train.watchdog_s``; the message says what the worker waited for."""


class Watchdog:
    """Watches the thread that creates it; ``timeout_s`` <= 0 disables it."""

    def __init__(self, timeout_s: float, rank: int = 0, exit_grace_s: float = EXIT_GRACE_S):
        self.timeout_s, self.rank, self.exit_grace_s = timeout_s, rank, exit_grace_s
        self.what, self.last = "starting", time.monotonic()
        self.fired: str | None = None
        self._thread_id = threading.get_ident()
        self._stop = threading.Event()
        self._watcher = None
        if timeout_s > 0:
            self._watcher = threading.Thread(target=self._watch, name="training-watchdog", daemon=True)
            self._watcher.start()

    def phase(self, what: str) -> None:
        """Say what the worker does from now on (and count it as progress)."""
        self.what, self.last = what, time.monotonic()

    def beat(self) -> None:
        """Progress: a step finished."""
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def message(self) -> str:
        return (
            f"training worker {self.rank} made no progress for {self.timeout_s:g} s while {self.what} "
            f"(train.watchdog_s).{held_locks_hint()} Raise train.watchdog_s if this step is legitimately that slow."
        )

    def _watch(self) -> None:
        period = min(5.0, self.timeout_s / 4)
        while not self._stop.wait(period):
            if time.monotonic() - self.last <= self.timeout_s:
                continue
            self.fired = self.message()
            log.error(self.fired)
            print(self.fired, file=sys.stderr, flush=True)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self._thread_id), ctypes.py_object(TrainingStalled)
            )
            if self._stop.wait(self.exit_grace_s):
                return
            print(f"{self.fired} The worker is stuck outside Python: ending it.", file=sys.stderr, flush=True)
            os._exit(STALLED_EXIT_CODE)
