"""The entry points stay thin and answer ``--help`` (in this process: importing a job must start nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.entry_points import run_as_main

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.py"))


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_job_answers_help_and_stays_thin(path, capsys):
    assert len(path.read_text().splitlines()) <= 60, f"{path.name}: logic belongs in fastdraft_ray/"
    assert run_as_main(path, ["--help"]) in (0, None)
    assert "usage:" in capsys.readouterr().out
