"""Mixture quotas, interleaving, per-source accounting and the packer."""

from __future__ import annotations

import numpy as np
import pytest

from fastdraft_ray.data.mixture import MixtureError, SourceTally, interleave, quotas
from fastdraft_ray.data.packing import Packer


def test_quotas_follow_weights_and_sum_to_budget():
    q = quotas(["code", "text"], {"code": 2, "text": 1}, 1000)
    assert q == {"code": 667, "text": 333}
    assert sum(quotas(["a", "b", "c"], {}, 100).values()) == 100
    with pytest.raises(MixtureError, match="missing \\['text'\\]"):
        quotas(["code", "text"], {"code": 1}, 10)
    with pytest.raises(MixtureError, match="non-negative"):
        quotas(["a"], {"a": -1}, 10)
    with pytest.raises(MixtureError, match="positive"):
        quotas(["a"], {}, 0)


def test_interleave_reads_sources_at_their_quota_rate():
    units = {
        "code": [{"id": f"c{i}", "est_bytes": 10} for i in range(20)],
        "text": [{"id": f"t{i}", "est_bytes": 10} for i in range(20)],
    }
    order = [u["id"] for _, u in interleave(units, {"code": 200, "text": 100})]
    first = order[:15]
    assert sum(i.startswith("c") for i in first) == 10  # 2:1 in every prefix
    assert len(order) == 40


def test_tally_truncates_to_quota_and_routes_val():
    t = SourceTally("a", "spec", 1.0, quota=1000, val_fraction=0.1)
    routes = []
    while not t.full:
        routes.append(t.take(30))
    assert t.taken == 1000 and t.truncated_documents == 1 and len(routes) == 34
    assert routes[0] == (30, "train") and routes[-1][0] == 1000 - 33 * 30
    assert 100 - 30 <= t.tokens["val"] <= 100  # val gets its fraction, to within one document


def test_packer_rows_carry_and_provenance():
    p = Packer(4)
    p.add(np.arange(3, dtype=np.int32), "a")
    assert p.pop_rows().shape == (0, 4)
    p.add(np.arange(10, 16, dtype=np.int32), "b")
    rows = p.pop_rows()
    assert rows.tolist() == [[0, 1, 2, 10], [11, 12, 13, 14]]
    assert p.carry().tolist() == [15] and p.segments == [["b", 1]]
    assert dict(p.emitted) == {"a": 3, "b": 5}
    q = Packer(4, p.carry(), p.segments)  # resume from a checkpoint
    q.add(np.arange(20, 23, dtype=np.int32), "a")
    assert q.pop_rows().tolist() == [[15, 20, 21, 22]] and dict(q.emitted) == {"b": 1, "a": 3}
