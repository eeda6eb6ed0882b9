"""Multi-node training on a ``ray.cluster_utils.Cluster``: two 1-CPU nodes with one training worker each train to
the same result as two workers on one node (tolerance: 1e-4 on every step's loss and every exported weight).

Layout: a 1-CPU head node runs the driver and Ray Data's shard reads; training workers ask for a ``trainer``
resource (``train.worker_resources``) that only the worker nodes offer, which pins them there.
"""

from __future__ import annotations

import pytest
import torch

from tests.train.audit import read_trace
from tests.train.conftest import tiny_run_config

TOL = 1e-4


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def _run(tiny_target, tiny_data, tmp_path, name):
    from fastdraft_ray.train.loop import Hooks
    from fastdraft_ray.train.run import train_stage

    cfg = tiny_run_config(
        tiny_target,
        tmp_path / "runs",
        run_name=name,
        token_budget=1024,
        checkpoint_every=8,
        worker_resources="{trainer: 1}",
    )
    trace_dir = tmp_path / f"trace_{name}"
    trace_dir.mkdir()
    record = train_stage(cfg, str(tiny_data), hooks=Hooks(trace_dir=str(trace_dir)))
    return record, read_trace(trace_dir), tmp_path / "runs" / name / "pt" / "export"


@pytest.mark.slow  # over a minute (`-m slow`); its recorded run: benchmarks/results/slow_tests_2026-12-03.md
def test_two_nodes_train_like_one(cluster, tmp_path, tiny_target, tiny_data):
    from transformers import AutoModelForCausalLM

    nodes = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    _, multi, multi_export = _run(tiny_target, tiny_data, tmp_path, "two_nodes")
    multi_nodes = {rank: {rec["node"] for rec in recs} for rank, recs in multi.items()}
    assert all(len(v) == 1 for v in multi_nodes.values()) and multi_nodes[0] != multi_nodes[1], multi_nodes
    assert multi_nodes[0] | multi_nodes[1] == {n.node_id for n in nodes}

    for node in nodes:
        cluster.remove_node(node)
    big = cluster.add_node(num_cpus=2, resources={"trainer": 2})
    cluster.wait_for_nodes()
    _, single, single_export = _run(tiny_target, tiny_data, tmp_path, "one_node")
    assert {rec["node"] for recs in single.values() for rec in recs} == {big.node_id}

    multi_loss = [rec["loss"] for rec in multi[0]]
    single_loss = [rec["loss"] for rec in single[0]]
    assert len(multi_loss) == len(single_loss) == 16
    assert max(abs(a - b) for a, b in zip(multi_loss, single_loss, strict=True)) < TOL
    assert multi_loss[-1] < multi_loss[0] - 0.5
    a = AutoModelForCausalLM.from_pretrained(multi_export).state_dict()
    b = AutoModelForCausalLM.from_pretrained(single_export).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < TOL
    assert not torch.equal(
        a["model.embed_tokens.weight"],
        AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "one_node" / "pt" / "init").state_dict()[
            "model.embed_tokens.weight"
        ],
    )
