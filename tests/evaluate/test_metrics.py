"""Aggregation details: the bootstrap interval of the speedup and the gamma column."""

from __future__ import annotations

import pytest

from fastdraft_ray.evaluate.metrics import DraftInfo, aggregate, speedup_interval


def _rec(base_s: float, spec_s: float, tokens: int = 10, **extra) -> dict:
    return {
        "draft": "d",
        "mode": "sampling",
        "task": "story",
        "proposed": 9,
        "accepted": 3,
        "steps": 6,
        "new_tokens": tokens,
        "wall_time_s": spec_s,
        "base_new_tokens": tokens,
        "base_wall_time_s": base_s,
        "rejected_steps": 3,
        "matches_target": None,
        **extra,
    }


def test_bootstrap_interval_brackets_the_pooled_speedup_and_collapses_when_prompts_agree():
    same = [_rec(2.0, 1.0) for _ in range(5)]
    assert speedup_interval(same) == pytest.approx((2.0, 2.0))
    mixed = [_rec(2.0, 1.0), _rec(1.0, 1.0), _rec(3.0, 1.0), _rec(1.0, 2.0)]
    lo, hi = speedup_interval(mixed)
    pooled = (7.0 / 40) / (5.0 / 40)
    assert lo < pooled < hi and lo >= 0.5 and hi <= 3.0
    assert speedup_interval(mixed) == (lo, hi)  # fixed seed: reproducible


def test_rows_carry_the_gamma_they_charge_and_the_interval():
    info = DraftInfo("d", "/x", c_params=0.1, draft_step_s=0.01, target_step_s=0.1, verify_step_s=0.12)
    recs = [_rec(2.0, 1.0), _rec(3.0, 1.0)]
    (row, pooled) = aggregate(recs, [info], gamma=3, tasks=["story"])
    assert row["gamma"] == 3 and row["task"] == "story" and pooled["task"] == "all"
    assert row["speedup_lo"] <= row["speedup"] <= row["speedup_hi"]
    adaptive = aggregate(recs, [info], gamma=3, tasks=["story"], gamma_policy="cost")[0]
    assert adaptive["gamma"] == 3 and adaptive["mean_gamma"] == pytest.approx(9 * 2 / 12)
    at_two = aggregate([{**r, "gamma": 2} for r in recs] + recs, [info], gamma=3, tasks=["story"])
    assert [(r["gamma"], r["task"]) for r in at_two] == [(2, "story"), (2, "all"), (3, "story"), (3, "all")]
