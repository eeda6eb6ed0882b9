"""Every benchmark still imports and parses its arguments (``--help``), in this process: a renamed or removed
library name fails here, not the next time someone measures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.entry_points import run_as_main

BENCHMARKS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py") if p.name != "harness.py"
)


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_answers_help(path, capsys):
    assert run_as_main(path, ["--help"]) in (0, None)
    assert "usage:" in capsys.readouterr().out
