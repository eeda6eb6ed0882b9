"""The C++ ops compiled on first use (torch's JIT extensions): where they are built, building them ahead of time,
and clearing a build lock whose owner is gone.

Two ops are built with ``torch.utils.cpp_extension``: DeepSpeed's ``deepspeed_shm_comm`` (CPU training: DeepSpeed
builds it when it initialises its communication) and the small-batch linear kernel (``specdec.kernels``). torch
guards each build folder with a ``lock`` file that the building process creates and keeps open until it is done,
and any other process waits for that file to disappear, without a timeout. A process killed mid-build leaves the
file behind, and every later run then waits forever. ``clear_stale_locks`` removes a lock that no live process
holds open (Linux: ``/proc/<pid>/fd``), with a warning; it runs before each build (the kernel's, a training
worker's DeepSpeed start), and ``scripts/build_jit_ops.py`` (run by ``scripts/setup_env.sh``) builds every op once
at install time.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

LOCK_NAME = "lock"  # torch.utils.file_baton's file in each extension's build folder
UNKNOWN_OWNER_GRACE_S = 600.0  # without /proc, a lock older than this is taken as stale


def extensions_root() -> Path:
    """The folder torch builds JIT extensions in: ``$TORCH_EXTENSIONS_DIR``, else torch's default for this Python
    and accelerator (``~/.cache/torch_extensions/py311_cpu`` on a CPU install)."""
    if root := os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(root)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    # the folder name torch.utils.cpp_extension._get_build_directory uses
    accelerator = (
        f"rocm{torch.version.hip.replace('.', '')}"
        if torch.version.hip
        else f"cu{torch.version.cuda.replace('.', '')}"
        if torch.version.cuda
        else "cpu"
    )
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def build_locks(root: Path | None = None) -> list[Path]:
    """Every build lock present under ``root`` (default ``extensions_root()``)."""
    root = extensions_root() if root is None else Path(root)
    return sorted(root.glob(f"*/{LOCK_NAME}")) if root.is_dir() else []


def lock_holders(lock: Path) -> list[int] | None:
    """Pids of the live processes that hold ``lock`` open (the building process keeps it open until the build
    ends); None where that cannot be read (no ``/proc``)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    target, holders = os.path.realpath(lock), []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    holders.append(int(entry.name))
                    break
            except OSError:
                continue
    return holders


def is_stale(lock: Path) -> bool:
    """True when no live process holds ``lock`` (without ``/proc``: when it is older than
    ``UNKNOWN_OWNER_GRACE_S``)."""
    holders = lock_holders(lock)
    if holders is not None:
        return not holders
    try:
        return time.time() - lock.stat().st_mtime > UNKNOWN_OWNER_GRACE_S
    except FileNotFoundError:
        return False


def clear_stale_locks(root: Path | None = None) -> list[Path]:
    """Remove every build lock under ``root`` whose owner is gone, warning for each; the removed paths."""
    cleared = []
    for lock in build_locks(root):
        if not is_stale(lock):
            continue
        try:
            lock.unlink()
        except FileNotFoundError:  # its owner finished meanwhile
            continue
        message = (
            f"removed a stale build lock {lock}: the process that was building this op is gone (killed "
            "mid-build); the op is rebuilt now"
        )
        warnings.warn(message, stacklevel=2)
        cleared.append(lock)
    return cleared


def held_locks_hint(root: Path | None = None) -> str:
    """A sentence naming the build locks present now ('' when none): what a stalled run may be waiting for."""
    locks = build_locks(root)
    if not locks:
        return ""
    named = ", ".join(str(p) for p in locks)
    return (
        f" Build locks present: {named} (a process building a C++ op holds one; if no build is running, delete "
        "it)."
    )
