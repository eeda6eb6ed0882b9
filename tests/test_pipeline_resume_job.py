"""Issue 8's done-when, for real: the pipeline is a Ray job; stopping it mid-PT (``JobSubmissionClient.stop_job``,
what a user or a preempted cluster does) and submitting the same command again resumes PT from its last
checkpoint -- it does not restart from step 0 -- and trains exactly the planned number of steps.

A private Ray head with a dashboard (the job API) on free ports, torn down by the fixture; never ``ray stop``."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import pytest

from fastdraft_ray.train.run import resume_position
from tests.ray_jobs import job_cluster, submit, wait_for, wait_status
from tests.tiny_pipeline import tiny_recipe
from tests.train.conftest import save_tiny_target

STEPS = 24  # PT optimizer steps: 1 worker x 2 rows x 16 tokens = 32 tokens each


@pytest.fixture
def job_client():
    with job_cluster(3) as client:
        yield client


def _checkpoint(sdir: Path):
    """The checkpoint a resume would start from, or None; the run folder may be half-written while we look."""
    try:
        return resume_position(sdir)
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow  # over a minute (`-m slow`); its recorded run: benchmarks/results/slow_tests_2026-12-03.md
def test_stopped_pipeline_job_resumes_pt_when_resubmitted(tmp_path, job_client):
    from ray.job_submission import JobStatus

    save_tiny_target(tmp_path / "target")
    recipe = tiny_recipe(tmp_path)
    overrides = [
        "pipeline.stages=[prepare, pt]",
        "draft.num_layers=1",
        "train.num_workers=1",
        f"train.token_budget={STEPS * 32}",
        "train.checkpoint_every=2",
        "train.checkpoints_to_keep=2",
        f"train.eval_every={STEPS}",
    ]
    entrypoint = shlex.join([sys.executable, "jobs/pipeline.py", "--config", str(recipe), *overrides])
    sdir = tmp_path / "runs" / "tiny" / "pt"

    started = time.time()
    first = submit(job_client, entrypoint)
    seen = wait_for(job_client, first, "a registered PT checkpoint", lambda: _checkpoint(sdir))
    job_client.stop_job(first)
    wait_status(job_client, first, JobStatus.STOPPED)
    stopped_at = resume_position(sdir)  # the newest checkpoint once the job is gone: where PT must resume
    assert not (sdir / "DONE.json").exists(), "PT finished before the job was stopped: raise STEPS"
    assert seen.step <= stopped_at.step < STEPS, (seen, stopped_at)
    stopped = time.time()

    second = submit(job_client, entrypoint)
    wait_status(job_client, second, JobStatus.SUCCEEDED)
    logs = job_client.get_job_logs(second)

    done = json.loads((sdir / "DONE.json").read_text())
    assert done["resumed_from"] == {
        "step": stopped_at.step,
        "rows_consumed": stopped_at.rows_consumed,
        "tokens": stopped_at.step * 32,
    }, logs[-4000:]
    assert done["geometry"]["total_steps"] == STEPS and done["metrics"]["train/tokens_seen"] == STEPS * 32
    assert resume_position(sdir).step == STEPS  # the last checkpoint is the planned last step
    assert f"PT: resumed (checkpoint at step {stopped_at.step}" in logs
    assert "prepare PT data: skipped" in logs  # finished stages of the stopped job are kept
    print(
        f"first job stopped at step {stopped_at.step} after {stopped - started:.0f} s; "
        f"the second resumed and finished in {time.time() - stopped:.0f} s"
    )
