"""The evaluation harness at a deployment precision and with an adaptive gamma policy (tiny random models)."""

import pytest

from fastdraft_ray.config import EvaluateConfig, ModelConfig
from fastdraft_ray.evaluate.metrics import ALL
from fastdraft_ray.evaluate.run import evaluate
from tests.evaluate.test_harness import FAST, prompts, tiny_pair, tokenizer  # noqa: F401 (fixtures)


def test_int8_cost_policy_records_precision_costs_and_stays_lossless(tiny_pair, prompts):  # noqa: F811
    target, draft = tiny_pair
    cfg = EvaluateConfig(**{**FAST, "max_new_tokens": 30}, modes=["greedy"], precision="int8", gamma_policy="cost")
    res = evaluate(ModelConfig(target=target), [draft], cfg, prompts=prompts)
    assert res.settings["precision"] == res.settings["draft_precision"] == "int8"
    assert res.settings["gamma_policy"] == "cost"
    for info in res.drafts:
        assert (
            info.precision == "int8" and len(info.verify_cost) == cfg.max_gamma + 1 and info.verify_cost[0] == 1.0
        )
        assert info.verify_step_s == pytest.approx(info.verify_cost[cfg.gamma] * info.target_step_s)
    rows = {(r["draft"], r["task"]): r for r in res.rows}
    # the random draft (alpha ~0) is switched off after a few warm-up steps: most steps are plain target steps
    assert rows[("draft", ALL)]["plain_steps"] > rows[("draft", ALL)]["steps"] / 2
    assert 0 <= rows[("draft", ALL)]["mean_gamma"] < 1


def test_known_prior_alpha_keeps_the_cost_policy_off(tiny_pair, prompts):  # noqa: F811
    """evaluate.prior_alpha = 0 (known useless drafts): speculation is off from the first step, so nearly every
    step is plain (probes only as the 3% budget allows), and the per-token alpha is reported for calibration."""
    target, draft = tiny_pair
    cfg = EvaluateConfig(**{**FAST, "max_new_tokens": 30}, modes=["greedy"], gamma_policy="cost", prior_alpha=0.0)
    res = evaluate(ModelConfig(target=target), [draft], cfg, prompts=prompts)
    assert res.settings["prior_alpha"] == 0.0
    row = next(r for r in res.rows if r["task"] == ALL)
    # a probe pays c + v(2) - 1 >= c > 0 from 0.03 per plain step: at most 0.9 / c probes per 30-token prompt
    c = res.drafts[0].draft_step_s / res.drafts[0].target_step_s
    assert row["proposed"] <= row["prompts"] * 0.9 / c + 1e-9
    assert row["plain_steps"] >= row["steps"] - row["proposed"] and row["matches_target"] == 1.0
    assert 0.0 <= row["alpha_per_token"] <= 1.0 and all("rejected_steps" in r for r in res.records)
