"""Test helper: run a script under ``jobs/`` or ``benchmarks/`` in this process, as ``python <script> ARGS``
would, and return its exit status (scripts end with ``SystemExit``: ``--help``, a refused config, a dry run)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def run_as_main(path: Path, argv: list[str]) -> int | str | None:
    """Run ``path`` as ``__main__`` with ``argv``; its directory first on ``sys.path`` (as Python puts it).
    Returns the exit status it raised with; a script that returns instead of exiting gives ``"returned"``."""
    argv_before = sys.argv
    sys.argv = [str(path), *argv]
    sys.path.insert(0, str(path.parent))
    try:
        runpy.run_path(str(path), run_name="__main__")
        return "returned"
    except SystemExit as exc:
        return exc.code
    finally:
        sys.argv = argv_before
        sys.path.remove(str(path.parent))
