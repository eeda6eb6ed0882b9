"""Two real Ray nodes on this machine, each in its own network namespace (a veth pair between them, addresses of
those namespaces only), each with its own temp folder, token authentication on. ``ray job submit`` (from the head's
namespace) runs the tiny pipeline with PT's two training workers spread over both nodes; the worker node's
processes are killed mid-PT; Ray Train restarts the worker group on the node that remains (it has the CPUs) from
the last checkpoint, and the job ends with the planned steps, every row of the global order trained exactly once
by the final model (the audit log, ``train.audit_dir``). The run directory is a local path both nodes see (as NFS
would be). The fixture ends only the processes it started, by pid, and deletes its namespaces; never ``ray stop``.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fastdraft_ray.train.run import resume_position
from tests.ray_jobs import submit, wait_for
from tests.tiny_pipeline import tiny_recipe
from tests.train.audit import effective_lineage, expected_rows, read_trace
from tests.train.conftest import save_tiny_target

RAY = str(Path(sys.executable).with_name("ray"))
STEPS = 40  # PT optimizer steps: 2 workers x 2 rows x 16 tokens = 64 tokens each
SUBNET = f"10.{200 + os.getpid() % 50}.{os.getpid() // 50 % 250}"
HEAD_IP, WORKER_IP = f"{SUBNET}.1", f"{SUBNET}.2"
CLONE_NEWNET = 0x40000000


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _can_make_namespaces() -> str | None:
    """Why this machine cannot run the test (None if it can)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not shutil.which("ip"):
        return "needs iproute2 (`ip netns`)"
    probe = f"fdprobe{os.getpid()}"
    try:
        _sh("ip", "netns", "add", probe)
        _sh("ip", "netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create a network namespace here: {getattr(exc, 'stderr', exc)}"
    return None


class Node:
    """One `ray start --block` in a namespace: its process tree is ours to end."""

    def __init__(self, ns: str, args: list[str], env: dict, log: Path):
        self.log = log
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, RAY, "start", "--block", "--disable-usage-stats", *args],
                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def kill(self) -> list[int]:
        """SIGKILL the node's whole process tree (raylet, workers, agents): what a lost machine looks like."""
        import psutil

        try:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in tree:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)
        return [p.pid for p in tree]


def _enter_namespace(ns: str) -> None:
    """Move the calling thread (only it: namespaces are per thread) into network namespace ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
    finally:
        os.close(fd)


class InNamespace:
    """An object whose every method call runs on one thread inside a network namespace (a job client there)."""

    def __init__(self, ns: str, factory):
        self._pool = ThreadPoolExecutor(1, initializer=_enter_namespace, initargs=(ns,))
        self._obj = self._pool.submit(factory).result()

    def __getattr__(self, name):
        method = getattr(self._obj, name)
        return lambda *args, **kwargs: self._pool.submit(method, *args, **kwargs).result()


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    """``(a job client in the head's namespace, the worker Node)``; everything torn down after."""
    reason = _can_make_namespaces()
    if reason:
        pytest.skip(reason)
    head_ns, worker_ns = f"fdhead{os.getpid()}", f"fdwork{os.getpid()}"
    veth = f"fdv{os.getpid() % 100000}"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = {
        **os.environ,
        "RAY_health_check_period_ms": "1000",  # a lost node is noticed in seconds, not half a minute
        "RAY_health_check_failure_threshold": "3",
    }
    nodes: list[Node] = []
    temp = Path(tempfile.mkdtemp(prefix="fdr"))  # short: Ray's socket paths must fit in 107 bytes
    try:
        for ns in (head_ns, worker_ns):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "link", "add", f"{veth}a", "netns", head_ns, "type", "veth", "peer", f"{veth}b", "netns", worker_ns)  # fmt: skip
        for ns, dev, ip in ((head_ns, f"{veth}a", HEAD_IP), (worker_ns, f"{veth}b", WORKER_IP)):
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
        head_args = ["--head", f"--node-ip-address={HEAD_IP}", "--port=6379", "--num-cpus=3",
                     "--dashboard-host=0.0.0.0", "--dashboard-port=8265", f"--temp-dir={temp / 'head'}"]  # fmt: skip
        # gloo binds to what the hostname resolves to (127.0.0.1 here, both namespaces share the hostname): name
        # each node's interface, as on any machine whose hostname does not resolve to its cluster address
        nodes.append(Node(head_ns, head_args, {**env, "GLOO_SOCKET_IFNAME": f"{veth}a"}, tmp_path / "head.log"))
        worker_args = [f"--address={HEAD_IP}:6379", f"--node-ip-address={WORKER_IP}", "--num-cpus=1",
                       f"--temp-dir={temp / 'worker'}"]  # fmt: skip
        from ray.job_submission import JobSubmissionClient

        client = None
        deadline = time.time() + 120
        while client is None:
            try:
                client = InNamespace(head_ns, lambda: JobSubmissionClient(f"http://{HEAD_IP}:8265"))
            except (ConnectionError, RuntimeError) as exc:
                if time.time() > deadline or nodes[0].proc.poll() is not None:
                    pytest.fail(f"no Ray head ({exc}):\n{nodes[0].log.read_text()[-3000:]}")
                time.sleep(1)
        nodes.append(
            Node(worker_ns, worker_args, {**env, "GLOO_SOCKET_IFNAME": f"{veth}b"}, tmp_path / "worker.log")
        )
        _wait_for_nodes(head_ns, env, 2, nodes[1])
        yield client, nodes[1]
    finally:
        for node in reversed(nodes):
            node.kill()
        for ns in (head_ns, worker_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(ns: str, env: dict, n: int, node: Node) -> None:
    """Until the cluster has ``n`` live nodes (asked from a driver in the head's namespace)."""
    code = (
        f"import ray; ray.init(address='{HEAD_IP}:6379', logging_level='ERROR'); "
        "print(sum(x['Alive'] for x in ray.nodes()))"
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if node.proc.poll() is not None:
            pytest.fail(f"ray start exited {node.proc.returncode}:\n{node.log.read_text()[-3000:]}")
        try:
            out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], env=env,
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
            if out.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(1)
    pytest.fail(f"{n} Ray nodes not up after 120 s:\n{node.log.read_text()[-3000:]}")


def _registered_step(sdir: Path) -> int:
    """Step of the newest checkpoint Ray Train has registered (what a restart resumes; 0 if none). The folder of a
    reported checkpoint exists a little before its controller registers it (it polls every 2 s)."""
    try:
        position = resume_position(sdir)
    except (OSError, ValueError, KeyError):  # the run folder is being written
        return 0
    return position.step if position else 0


@pytest.mark.slow  # ~2 min (`-m slow`); its recorded run: benchmarks/results/two_nodes_2026-12-03.md
def test_pipeline_job_on_two_nodes_survives_losing_one(tmp_path, two_nodes):
    from ray.job_submission import JobStatus

    client, worker = two_nodes
    save_tiny_target(tmp_path / "target")
    recipe = tiny_recipe(tmp_path)
    audit = tmp_path / "audit"
    overrides = [
        "pipeline.stages=[prepare, pt]",
        "train.num_workers=2",
        "train.cpus_per_worker=1",
        "train.placement_strategy=SPREAD",
        f"train.token_budget={STEPS * 64}",
        "train.checkpoint_every=2",
        f"train.eval_every={STEPS}",
        "train.max_failures=3",
        f"train.audit_dir={audit}",
    ]
    entrypoint = shlex.join([sys.executable, "jobs/pipeline.py", "--config", str(recipe), *overrides])
    job = submit(client, entrypoint)
    sdir = tmp_path / "runs" / "tiny" / "pt"
    wait_for(
        client,
        job,
        "a PT checkpoint past step 2",
        lambda: _registered_step(sdir) >= 2 and read_trace(audit).get(1),
    )
    placed = {rank: {rec["ip"] for rec in recs} for rank, recs in read_trace(audit).items()}
    assert placed == {0: {HEAD_IP}, 1: {WORKER_IP}} or placed == {0: {WORKER_IP}, 1: {HEAD_IP}}, placed
    registered = _registered_step(sdir)
    killed_at = max(rec["step"] for rec in read_trace(audit)[0])
    killed = worker.kill()
    print(f"training ranks on {placed}; killed the worker node ({len(killed)} processes) after step {killed_at}")

    wait_for(client, job, "the job's end", lambda: client.get_job_status(job).is_terminal())
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-4000:]

    done = json.loads((sdir / "DONE.json").read_text())
    assert done["geometry"]["total_steps"] == STEPS and done["metrics"]["train/tokens_seen"] == STEPS * 64
    trace = read_trace(audit)
    attempts = {rank: list(dict.fromkeys(rec["pid"] for rec in recs)) for rank, recs in trace.items()}
    assert all(len(p) == 2 for p in attempts.values()), attempts  # a second worker group after the loss
    after = [rec for rec in trace[0] if rec["pid"] == attempts[0][1]]
    assert {
        rec["ip"] for recs in trace.values() for rec in recs if rec["pid"] in (attempts[0][1], attempts[1][1])
    } == {HEAD_IP}  # resumed on the node that remains
    resumed_at = after[0]["resumed_at"]
    assert registered <= resumed_at <= killed_at and after[0]["step"] == resumed_at + 1, (registered, resumed_at)
    lineage, steps = effective_lineage(trace)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert lineage == expected_rows(
        Path(done["inputs"]["data_dir"]), STEPS * 4
    )  # every row of the global order once, in order
    print(
        f"resumed from the step-{resumed_at} checkpoint on {HEAD_IP}; {STEPS} steps, {len(lineage)} rows, each once"
    )
