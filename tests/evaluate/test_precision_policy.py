"""The evaluation harness at a deployment precision and with an adaptive gamma policy (tiny random models)."""

import pytest

from fastdraft_ray.config import EvaluateConfig, ModelConfig
from fastdraft_ray.evaluate.run import ALL, EvaluationError, evaluate
from tests.evaluate.test_harness import FAST, prompts, tiny_pair, tokenizer  # noqa: F401 (fixtures)


def test_int8_cost_policy_records_precision_costs_and_stays_lossless(tiny_pair, prompts):  # noqa: F811
    target, draft = tiny_pair
    cfg = EvaluateConfig(**{**FAST, "max_new_tokens": 30}, modes=["greedy"], precision="int8", gamma_policy="cost")
    res = evaluate(ModelConfig(target=target), [draft, target], cfg, prompts=prompts)
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
    # the target as its own draft costs c ~1 step per token: it can never pay, so it is switched off as well
    assert res.drafts[1].draft_step_s / res.drafts[1].target_step_s > 0.5
    assert rows[("target", ALL)]["mean_gamma"] < 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"gamma_policy": "fastest"}, "gamma_policy"),
        ({"precision": "int4"}, "precision"),
        ({"precision": "int8", "use_gpu": True}, "CPU only"),
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
    ],
)
def test_bad_settings_fail_early(tiny_pair, prompts, override, message):  # noqa: F811
    target, draft = tiny_pair
    with pytest.raises(EvaluationError, match=message):
        evaluate(ModelConfig(target=target), [draft], EvaluateConfig(**FAST, **override), prompts=prompts)
