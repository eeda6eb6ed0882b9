"""Gamma policies: their schedules, the cost model, and that every policy keeps speculative decoding lossless
(greedy: the target's own tokens; sampling: the target's distribution, with the chi-square machinery of
test_sampling_distribution.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastdraft_ray.specdec import stats as S
from fastdraft_ray.specdec.decode import autoregressive_generate, speculative_generate
from fastdraft_ray.specdec.policy import (
    POLICIES,
    ConfidencePolicy,
    CostModel,
    CostPolicy,
    GammaPolicy,
    HeuristicPolicy,
    make_policy,
)
from tests.conftest import tiny_config
from tests.specdec.test_decode import _noisy_copy
from tests.specdec.test_sampling_distribution import (
    ALPHA,
    PROMPT,
    K,
    exact_joint,
    pair,  # noqa: F401 (fixture)
    pvalues,
)

# CPU-like costs (measured on the real target, fp32): a draft at 0.2 of a target step, scoring k tokens at once
# costs 1, 1.5, 1.6, 1.75, ... target steps.
CPU_COST = CostModel(0.2, (1.0, 1.5, 1.6, 1.75, 1.8, 1.85, 1.9, 1.95, 2.0))
FREE_VERIFY = CostModel(0.05, (1.0,) * 9)


def _model(config, seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _policy(name: str, cost: CostModel = FREE_VERIFY):
    return make_policy(name, 3, confidence_threshold=0.5, max_gamma=6, cost=cost)


# ------------------------------------------------------------------------------------------------ schedules


def test_heuristic_schedule_matches_transformers_rule():
    pol = HeuristicPolicy(3, max_gamma=8)
    seen = []
    for proposed_accepted in [(3, 3), (5, 5), (7, 7), (8, 2), (7, 0), (6, 6)]:
        assert pol.gamma() == proposed_accepted[0]
        pol.update(*proposed_accepted)
        seen.append(pol.gamma())
    assert seen == [5, 7, 8, 7, 6, 8]  # +2 on a full accept (capped at 8), -1 otherwise
    low = HeuristicPolicy(1)
    low.update(1, 0)
    assert low.gamma() == 1  # never below 1
    assert pol.reset().gamma() == 3


def test_confidence_policy_stops_below_threshold_only():
    pol = ConfidencePolicy(4, threshold=0.4)
    assert pol.needs_confidence and pol.gamma() == 4
    assert pol.stop(0.39) and not pol.stop(0.4)
    with pytest.raises(ValueError, match="threshold"):
        ConfidencePolicy(3, threshold=1.0)


def test_cost_policy_follows_the_cost_model():
    # alpha ~1 and free verification: the longest gamma; alpha 0: speculation off (0), with probes at gamma 1.
    good = CostPolicy(FREE_VERIFY, max_gamma=6, prior_alpha=1.0)
    assert good.gamma() == 6
    bad = CostPolicy(CPU_COST, max_gamma=6, prior_alpha=0.0)
    # No catch-up cost: a probe's excess is c + v(2) - 1 = 0.7 steps, paid by 0.03 per plain step: every 24 steps.
    assert bad.probe_interval == 24
    chosen = [bad.gamma() for _ in range(3 * 25)]
    assert [i for i, g in enumerate(chosen) if g] == [24, 48, 72]  # the 0.02 left over after a probe carries
    # Same alpha, CPU verify costs vs free verification: the CPU curve must choose a shorter (or no) draft.
    assert S.best_gamma(0.6, 0.2, 8, CPU_COST.verify)[0] < S.best_gamma(0.6, 0.2, 8)[0]


def test_known_prior_alpha_starts_off_and_stays_off():
    """A known alpha that says drafting cannot pay: gamma 0 from step 1 (the unknown, optimistic prior drafts),
    and a lucky accepted probe does not switch speculation on (the known prior is worth 20 observations)."""
    assert CostPolicy(CPU_COST).gamma(pending=40) > 0  # unknown: optimistic
    known = make_policy("cost", 3, cost=CPU_COST, prior_alpha=0.05)
    assert isinstance(known, CostPolicy) and known.alpha == pytest.approx(0.05)
    assert known.gamma(pending=40) == 0
    known.update(1, 1)  # a probe whose token was accepted
    assert known.alpha < 0.1 and known.gamma() == 0
    fresh = known.reset()
    assert fresh.alpha == pytest.approx(0.05) and fresh.chosen == [] and fresh.budget == 0.0
    assert CostPolicy(CPU_COST, max_gamma=8, prior_alpha=0.95).gamma() >= 3  # a known good draft drafts at once
    with pytest.raises(ValueError, match="prior_alpha"):
        CostPolicy(CPU_COST, prior_alpha=1.5)


def test_probe_budget_charges_the_catch_up_and_stays_within_margin():
    """Simulate the engine's ``pending`` (the whole prompt before the draft first runs, then one more token per
    plain step): probes are paid from 0.03 per plain step, the catch-up included, so the cost-model overhead
    never exceeds the margin; the first probe waits until the budget covers the prompt's catch-up."""
    cost = CostModel(0.2, CPU_COST.verify, catchup=0.01)
    pol = CostPolicy(cost, max_gamma=6, prior_alpha=0.0)
    prompt, pending, probes = 60, 60, []
    for step in range(3000):
        if pol.gamma(pending):
            assert pol.probe_cost(pending) == pytest.approx(0.2 + (pending - 1) * 0.01 + 0.5)
            probes.append(step)
            pol.update(1, 0)
            pending = 1  # rejected: the draft has seen everything but the correction token
        else:
            pending += 1
        assert pol.probe_cost_spent <= pol.margin * pol.plain_steps + 1e-9
    # first probe: the smallest n with 0.03 n >= 0.2 + (60 + n - 1) * 0.01 + 0.5, i.e. n = 65
    assert probes[0] == 65 == math.ceil((0.7 + (prompt - 1) * 0.01) / 0.02)
    # then every probe_interval plain steps: (0.2 + 0.5) / (0.03 - 0.01) = 35
    assert pol.probe_interval == 35 and {b - a for a, b in itertools.pairwise(probes)} <= {35, 36}
    assert pol.probe_cost_spent / pol.plain_steps > 0.025  # the budget is used, not hoarded
    # a catch-up token that alone costs more than the margin: probing can never pay for itself, so never probe
    never = CostPolicy(CostModel(0.2, CPU_COST.verify, catchup=0.05), prior_alpha=0.0)
    assert never.probe_interval == math.inf and not any(never.gamma(p) for p in range(1, 2000))


def test_gamma_zero_runs_no_draft_forward():
    """Speculation off for the whole generation: the draft is never run (its prefill is lazy), every step is one
    one-token target forward as in plain decoding, and the output is the target's."""
    cfg = tiny_config("llama")
    target, draft = _model(cfg, 0), _model(cfg, 1)
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(3))
    pol = CostPolicy(CostModel(0.2, CPU_COST.verify, catchup=0.05), prior_alpha=0.0)  # off, never probes
    res = speculative_generate(target, draft, ids, max_new_tokens=30, policy=pol)
    plain = autoregressive_generate(target, ids, max_new_tokens=30)
    assert res.tokens == plain.tokens
    st = res.stats
    assert st.draft_forwards == 0 and st.proposed == 0 and st.proposed_per_step == [0] * 30
    assert (
        st.target_forwards == plain.stats.target_forwards + 1
    )  # + the prompt split: prefill, then its last token


def test_cost_policy_learns_alpha_from_outcomes():
    pol = CostPolicy(CPU_COST, max_gamma=8)  # optimistic prior: starts speculating
    assert pol.gamma() > 0
    for _ in range(3):
        pol.update(3, 0)  # three rejections in a row
    assert pol.alpha < 0.35 and pol.gamma() == 0
    pol2 = CostPolicy(CPU_COST, max_gamma=8)
    for _ in range(20):
        pol2.update(4, 4)
    assert pol2.alpha > 0.95 and pol2.gamma() == 8


def test_make_policy_and_cost_model_validation():
    assert [type(make_policy(n, 3, cost=CPU_COST)).__name__ for n in POLICIES] == [
        "GammaPolicy",
        "ConfidencePolicy",
        "HeuristicPolicy",
        "CostPolicy",
    ]
    with pytest.raises(ValueError, match="unknown gamma policy"):
        make_policy("fastest", 3)
    with pytest.raises(ValueError, match="needs a CostModel"):
        make_policy("cost", 3)
    with pytest.raises(ValueError, match="verify"):
        CostModel(0.1, (1.0,))
    # timing noise cannot make a longer verify look cheaper than a shorter one (or than one step)
    assert CostModel(0.1, (1.0, 0.9, 1.3, 1.2)).verify == (1.0, 1.0, 1.3, 1.3)
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        GammaPolicy(0)


def test_expected_speedup_with_verify_curve():
    assert S.expected_speedup(0.5, 0, 0.3, CPU_COST.verify) == 1.0
    tau = S.ideal_block_efficiency(0.8, 3)
    assert S.expected_speedup(0.8, 3, 0.2, CPU_COST.verify) == pytest.approx(tau / (0.6 + 1.75))
    assert S.expected_speedup(0.8, 3, 0.2) == pytest.approx(S.mbsu(tau, 3, 0.2))  # no curve: memory-bound
    with pytest.raises(ValueError, match="covers k = 1..9"):
        S.expected_speedup(0.8, 9, 0.2, CPU_COST.verify)


def test_measure_verify_cost_shape():
    model = _model(tiny_config("llama"), 0)
    curve, step_s = S.measure_verify_cost(model, torch.randint(3, 96, (1, 12)), max_k=4, repeats=2, warmup=1)
    assert len(curve) == 4 and curve[0] == 1.0 and all(v > 0 for v in curve) and step_s > 0


# ------------------------------------------------------------------------------------------------ lossless


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_is_greedy_exact(name):
    cfg = tiny_config("llama")
    target = _model(cfg, 0)
    draft = _noisy_copy(target, 0.5)
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(5))
    reference = autoregressive_generate(target, ids, max_new_tokens=60).tokens
    pol = _policy(name)
    res = speculative_generate(target, draft, ids, max_new_tokens=60, policy=pol)
    assert res.tokens == reference
    st = res.stats
    assert st.new_tokens == st.accepted + st.steps and sum(st.proposed_per_step) == st.proposed
    assert max(st.proposed_per_step) <= (6 if name in ("heuristic", "cost") else 3)
    if name == "confidence":  # the noisy draft is unsure often enough to stop early
        assert min(st.proposed_per_step[:-1]) < 3
    if name == "heuristic":
        assert len(set(st.proposed_per_step)) > 1


def test_cost_policy_turns_speculation_off_for_a_useless_draft():
    """A random draft over a 4096-token vocabulary (alpha ~0) under CPU costs: after a short warm-up every
    step is a plain target step except the probes, and the output is still the target's."""
    cfg = tiny_config("llama", vocab_size=4096)
    target, draft = _model(cfg, 0), _model(cfg, 1)
    ids = torch.randint(3, 4096, (1, 8), generator=torch.Generator().manual_seed(0))
    pol = CostPolicy(CPU_COST, max_gamma=6)
    res = speculative_generate(target, draft, ids, max_new_tokens=80, policy=pol)
    assert res.tokens == autoregressive_generate(target, ids, max_new_tokens=80).tokens
    after_warmup = res.stats.proposed_per_step[3:]
    probes = sum(g > 0 for g in after_warmup)
    assert after_warmup.count(0) >= len(after_warmup) - probes and probes <= len(after_warmup) // 20 + 1
    assert pol.alpha < 0.35  # alpha only moves on probes once speculation is off


@pytest.mark.parametrize("name", ["confidence", "cost"])
def test_policy_keeps_the_target_sampling_distribution(pair, name):  # noqa: F811 (fixture)
    """Confidence stop (depends on the draft's sampled token) and the cost policy (gamma from past verdicts, 0
    included): the first K tokens still follow the target's exact distribution."""
    target, draft = pair
    cost = CostModel(0.3, (1.0, 1.2, 1.3, 1.4))  # alpha ~0.5 sits where gamma 0, 1 and 2 trade places
    rows, gammas = [], []
    for seed in range(600):
        pol = make_policy(name, 2, confidence_threshold=0.3, max_gamma=3, cost=cost)
        out = speculative_generate(
            target,
            draft,
            PROMPT,
            max_new_tokens=K,
            temperature=1.0,
            generator=torch.Generator().manual_seed(seed),
            policy=pol,
        )
        rows.append(out.tokens)
        gammas += out.stats.proposed_per_step[:-1]  # the last step is cut by the token budget
    counts = torch.bincount(torch.tensor(gammas))
    assert (counts > 0).sum() >= 2, counts  # the policy really varied gamma (cost: 0 included)
    pvals = pvalues(torch.tensor(rows), exact_joint(target, 1.0, 1.0))
    print(f"p-values ({name} policy):", pvals, "gamma counts", counts.tolist())
    assert min(pvals.values()) > ALPHA, pvals
