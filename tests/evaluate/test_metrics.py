"""Aggregation details: the bootstrap interval of the speedup (and its n), the gamma column, the ideal tau."""

from __future__ import annotations

import pytest

from fastdraft_ray.evaluate.metrics import DraftInfo, aggregate, interval_text, speedup_interval


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
    recs = [_rec(2.0, 1.0), _rec(3.0, 1.0), _rec(2.5, 1.0), _rec(2.0, 1.5)]
    (row, pooled) = aggregate(recs, [info], gamma=3, tasks=["story"])
    assert row["gamma"] == 3 and row["task"] == "story" and pooled["task"] == "all"
    assert row["speedup_lo"] <= row["speedup"] <= row["speedup_hi"] and row["prompts"] == 4
    assert interval_text(row["speedup_lo"], row["speedup_hi"], 4).endswith("(n=4)")
    recs = recs[:2]
    adaptive = aggregate(recs, [info], gamma=3, tasks=["story"], gamma_policy="cost")[0]
    assert adaptive["gamma"] == 3 and adaptive["mean_gamma"] == pytest.approx(9 * 2 / 12)
    at_two = aggregate([{**r, "gamma": 2} for r in recs] + recs, [info], gamma=3, tasks=["story"])
    assert [(r["gamma"], r["task"]) for r in at_two] == [(2, "story"), (2, "all"), (3, "story"), (3, "all")]


def test_no_interval_below_four_prompts():
    """2 prompts have at most 3 distinct bootstrap resamples: no interval, and the table says why."""
    two = aggregate([_rec(2.0, 1.0), _rec(3.0, 1.0)], [DraftInfo("d", "/x", c_params=0.1)], 3, ["story"])[0]
    assert two["speedup"] > 1 and two["speedup_lo"] is None and two["speedup_hi"] is None
    assert interval_text(None, None, 2) == "— (n=2: too few prompts for an interval)"


def test_ideal_tau_uses_the_per_token_alpha_at_the_gammas_the_steps_used():
    """alpha/token = 3 accepted / (3 + 3 rejecting steps) = 0.5, not accepted / proposed = 1/3; at gamma 3 the i.i.d.
    tau is (1 - 0.5^4) / 0.5 = 1.875. An adaptive run's steps at gammas 0, 2 and 4 average their own taus."""
    info = DraftInfo("d", "/x", c_params=0.1)
    constant = aggregate([_rec(2.0, 1.0, gamma_steps={"3": 6})], [info], 3, ["story"])[0]
    assert constant["alpha_per_token"] == 0.5 and constant["ideal_block_efficiency"] == pytest.approx(1.875)
    adaptive = _rec(2.0, 1.0, gamma_steps={"0": 2, "2": 2, "4": 2})
    row = aggregate([adaptive], [info], 3, ["story"], gamma_policy="cost")[0]
    assert row["ideal_block_efficiency"] == pytest.approx((1.0 + 1.75 + 1.9375) / 3)
