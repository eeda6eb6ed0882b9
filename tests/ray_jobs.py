"""Ray jobs on a private cluster for tests: a head with a dashboard (the job API) on free ports, submission with
this checkout as the working dir, and polling with the job's log tail on failure. Never ``ray stop``."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # generous: Ray workers run at low priority beside whatever else the machine does


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def job_cluster(head_cpus: int = 3):
    """A job client of a private one-node Ray head with ``head_cpus`` (dashboard and dashboard agent on free ports:
    a taken agent port, e.g. 52365 of another Ray on this machine, would silently disable job submission); torn down
    on exit. One node: a second raylet of a ``ray.cluster_utils.Cluster`` shares the head's session folder, and when
    it sets up a job's working_dir it replaces the folder the job's driver runs in (the driver's cwd goes stale:
    ``os.getcwd()`` fails, lazy imports and MKL's loader break). Jobs on two nodes run in tests/test_two_nodes.py,
    each node in its own network namespace with its own temp folder."""
    from ray.cluster_utils import Cluster
    from ray.job_submission import JobSubmissionClient

    port = free_port()
    head = {"num_cpus": head_cpus, "include_dashboard": True, "dashboard_port": port}
    cluster = Cluster(initialize_head=True, head_node_args={**head, "dashboard_agent_listen_port": free_port()})
    try:
        cluster.wait_for_nodes()
        yield JobSubmissionClient(f"http://127.0.0.1:{port}")
    finally:
        cluster.shutdown()


def submit(client, entrypoint: str) -> str:
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


def wait_for(client, job_id: str, what: str, found, timeout_s: float = TIMEOUT_S):
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


def wait_status(client, job_id: str, want) -> None:
    wait_for(client, job_id, f"status {want}", lambda: client.get_job_status(job_id) == want)
