"""Issue 8's done-when, for real: the pipeline is a Ray job; stopping it mid-PT (``JobSubmissionClient.stop_job``,
what a user or a preempted cluster does) and submitting the same command again resumes PT from its last
checkpoint -- it does not restart from step 0 -- and trains exactly the planned number of steps.

A private Ray head with a dashboard (the job API) on free ports, torn down by the fixture; never ``ray stop``."""

from __future__ import annotations

import json
import shlex
import socket
import sys
import time
from pathlib import Path

import pytest

from fastdraft_ray.train.run import resume_position
from tests.tiny_pipeline import tiny_recipe
from tests.train.conftest import save_tiny_target

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24  # PT optimizer steps: 1 worker x 2 rows x 16 tokens = 32 tokens each
TIMEOUT_S = 600  # generous: Ray workers run at low priority beside whatever else the machine does


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def job_client():
    """A job client of a private 3-CPU Ray head (dashboard and dashboard agent on free ports: a taken agent port,
    e.g. 52365 of another Ray on this machine, would silently disable job submission)."""
    from ray.cluster_utils import Cluster
    from ray.job_submission import JobSubmissionClient

    port = _free_port()
    head = {"num_cpus": 3, "include_dashboard": True, "dashboard_port": port}
    cluster = Cluster(initialize_head=True, head_node_args={**head, "dashboard_agent_listen_port": _free_port()})
    try:
        yield JobSubmissionClient(f"http://127.0.0.1:{port}")
    finally:
        cluster.shutdown()


def _submit(client, entrypoint: str) -> str:
    """Submit with this checkout as the working dir; a fresh head's job agent needs a few seconds to accept jobs."""
    runtime_env = {
        "working_dir": str(ROOT),
        "excludes": [".git", ".venv", "runs", "benchmarks/results", "**/__pycache__"],
        "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"},
    }
    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(1)


def _wait_for(client, job_id: str, what: str, found, timeout_s: float = TIMEOUT_S):
    """Poll ``found()`` until it returns something true (returned); fail with the job's log tail if the job ends
    without it or time runs out."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_job_status(job_id)  # read first: whatever happened before the job ended is seen below
        result = found()
        if result:
            return result
        if status.is_terminal():
            pytest.fail(f"job {job_id} ended {status} before {what}:\n{client.get_job_logs(job_id)[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {what} after {timeout_s} s:\n{client.get_job_logs(job_id)[-4000:]}")


def _wait_status(client, job_id: str, want) -> None:
    _wait_for(client, job_id, f"status {want}", lambda: client.get_job_status(job_id) == want)


def _checkpoint(sdir: Path):
    """The checkpoint a resume would start from, or None; the run folder may be half-written while we look."""
    try:
        return resume_position(sdir)
    except (OSError, ValueError, KeyError):
        return None


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
    first = _submit(job_client, entrypoint)
    seen = _wait_for(job_client, first, "a registered PT checkpoint", lambda: _checkpoint(sdir))
    job_client.stop_job(first)
    _wait_status(job_client, first, JobStatus.STOPPED)
    stopped_at = resume_position(sdir)  # the newest checkpoint once the job is gone: where PT must resume
    assert not (sdir / "DONE.json").exists(), "PT finished before the job was stopped: raise STEPS"
    assert seen.step <= stopped_at.step < STEPS, (seen, stopped_at)
    stopped = time.time()

    second = _submit(job_client, entrypoint)
    _wait_status(job_client, second, JobStatus.SUCCEEDED)
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
