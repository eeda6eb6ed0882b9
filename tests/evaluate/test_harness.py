"""The evaluation harness end to end on tiny random models, worker-count invariance, and the real target."""

import json

import pytest

from fastdraft_ray.config import DraftConfig, EvaluateConfig, ModelConfig
from fastdraft_ray.data.tasks import TASKS, load_tasks
from fastdraft_ray.evaluate.metrics import ALL, DraftInfo, aggregate
from fastdraft_ray.evaluate.report import summary, write_report
from fastdraft_ray.evaluate.run import EvaluationError, evaluate
from fastdraft_ray.layout import RunLayout
from fastdraft_ray.models.draft import IncompatibleDraftError, build_draft, derive_draft_config, save_draft
from fastdraft_ray.specdec.decode import NEAR_TIE_LOGIT_GAP, first_divergence
from tests.conftest import tiny_config

SMALL = DraftConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
FAST = dict(prompts_per_task=1, max_new_tokens=8, gamma=3, cpus_per_worker=1)  # 1 thread: shared 2-core CI


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tokenizer):
    """A tiny random Llama target with the real tokenizer, and a tiny random draft derived from it."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = tiny_config(
        "llama",
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=2048,
    )
    target = save_draft(build_draft(cfg, seed=0), tokenizer, root / "target")
    draft = save_draft(build_draft(derive_draft_config(cfg, SMALL), seed=1), tokenizer, root / "draft")
    return str(target), str(draft)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return load_tasks(tokenizer, prompts_per_task=1, seed=0)


def test_end_to_end_writes_every_report_file(tmp_path, tiny_pair, prompts):
    target, draft = tiny_pair
    res = evaluate(ModelConfig(target=target), [draft, target], EvaluateConfig(**FAST), prompts=prompts)
    assert [d.name for d in res.drafts] == ["draft", "target"]
    assert len(res.rows) == 2 * 2 * (len(TASKS) + 1)  # drafts x modes x (tasks + all)
    by_key = {(r["draft"], r["mode"], r["task"]): r for r in res.rows}
    # The target as its own draft: every proposal accepted, tau = gamma + 1 (8 tokens in 2 steps of 4).
    for mode in ("greedy", "sampling"):
        row = by_key[("target", mode, ALL)]
        assert row["acceptance_rate"] == 1.0 and row["block_efficiency"] == 4.0
        assert row["mbsu"] == pytest.approx(4.0 / (3 * 1.0 + 1))
    # Greedy speculative decoding is lossless: the same tokens as the target alone, whatever the draft.
    assert all(by_key[(d, "greedy", t)]["matches_target"] == 1.0 for d in ("draft", "target") for t in TASKS)
    assert 0.0 <= by_key[("draft", "sampling", ALL)]["acceptance_rate"] < 1.0
    # c: decode-step bytes (the target as its own draft reads what the target reads)
    assert res.drafts[0].c_params == pytest.approx(res.drafts[0].step_bytes / res.drafts[1].step_bytes)
    assert res.drafts[1].c_params == pytest.approx(1.0)
    # which side runs first alternates from prompt to prompt
    firsts = [r["base_first"] for r in res.records if r["draft"] == "draft" and r["mode"] == "greedy"]
    assert firsts[:2] == [True, False]
    assert all(d.draft_step_s > 0 and d.target_step_s > 0 for d in res.drafts)
    assert set(res.metrics("draft", "greedy")) >= {
        f"eval/{t}/{m}" for t in TASKS for m in ("acceptance_rate", "block_efficiency", "mbsu", "speedup")
    }

    out = write_report(res, RunLayout.at(tmp_path / "run").eval_dir, config={"note": "test"})
    files = {p.name for p in (tmp_path / "run" / "eval").iterdir()}
    assert files >= {"results.json", "results.csv", "results.md", "results.png", "DONE.json"}
    data = json.loads((tmp_path / "run/eval/results.json").read_text())
    assert len(data["records"]) == 2 * 2 * len(TASKS) and data["settings"]["gamma"] == 3
    assert len((tmp_path / "run/eval/results.csv").read_text().strip().splitlines()) == 1 + len(res.rows)
    md = (tmp_path / "run/eval/results.md").read_text()
    assert "| draft | greedy |" in md and "summarization α" in md and "code speedup" in md
    assert (tmp_path / "run/eval/results.png").read_bytes()[:4] == b"\x89PNG"
    done = json.loads((tmp_path / "run/eval/DONE.json").read_text())
    assert done["metrics"]["target/greedy"]["eval/all/acceptance_rate"] == 1.0 and out.endswith("eval")
    assert "α=" in summary(res)


def test_gamma_is_selected_on_calibration_prompts_and_flagged(tmp_path, tiny_pair, prompts):
    """gamma_select: each draft and mode is also run at the gamma of the best expected speedup on calibration
    prompts that are not the reported ones; those rows are the headline, flagged selected, the paper's gamma kept."""
    target, draft = tiny_pair
    cfg = EvaluateConfig(**FAST, gamma_select=[1, 3], calibration_prompts_per_task=1)
    res = evaluate(ModelConfig(target=target), [draft], cfg, prompts=prompts)
    chosen = res.settings["selected_gamma"]["draft"]
    for mode in ("sampling", "greedy"):
        basis = res.settings["calibration"]["draft"][mode]
        assert basis["prompts"] == len(TASKS) and set(basis["predicted_speedup"]) == {"1", "3"}
        assert chosen[mode] == int(max(basis["predicted_speedup"], key=basis["predicted_speedup"].get))
        assert res.row("draft", mode, ALL)["gamma"] == chosen[mode] and res.row("draft", mode, ALL)["selected"]
        assert res.row("draft", mode, ALL, gamma=3)["gamma"] == 3  # the paper's gamma is always reported
    assert chosen["greedy"] == 1  # a random draft's argmax is (almost) never the target's: the cheapest gamma
    assert sum(r["selected"] for r in res.rows) == 2 * (len(TASKS) + 1)  # one gamma per mode, every task + all
    assert all(r["matches_target"] == 1.0 for r in res.rows if r["mode"] == "greedy")
    reported = {p.id for rows in prompts.values() for p in rows}
    assert {r["prompt_id"] for r in res.records} == reported  # calibration prompts are not in the records
    write_report(res, RunLayout.at(tmp_path / "run").eval_dir)
    md = (tmp_path / "run/eval/results.md").read_text()
    assert "draft γ=1*" in md and "draft γ=3" in md and "(selected)" in md


def test_greedy_results_do_not_depend_on_worker_count(ray_local, tiny_pair, prompts):
    target, draft = tiny_pair
    one = evaluate(
        ModelConfig(target=target), [draft], EvaluateConfig(**FAST, modes=["greedy", "sampling"]), prompts=prompts
    )
    two = evaluate(
        ModelConfig(target=target),
        [draft],
        EvaluateConfig(**FAST, modes=["greedy", "sampling"], num_workers=2),
        prompts=prompts,
    )
    keys = ("prompt_id", "mode", "proposed", "accepted", "steps", "new_tokens", "tokens")
    assert [[r[k] for k in keys] for r in one.records] == [[r[k] for k in keys] for r in two.records]
    for a, b in zip(one.rows, two.rows, strict=True):
        assert (a["task"], a["acceptance_rate"], a["block_efficiency"], a["mbsu"]) == (
            b["task"],
            b["acceptance_rate"],
            b["block_efficiency"],
            b["mbsu"],
        )


def test_aggregate_golden_values():
    info = DraftInfo("d", "/d", c_params=0.1, draft_step_s=0.01, target_step_s=0.05, verify_step_s=0.08)
    rec = dict(
        task="code",
        prompt_id="code/x",
        draft="d",
        mode="greedy",
        proposed=6,
        accepted=3,
        steps=3,
        new_tokens=6,
        wall_time_s=1.0,
        base_new_tokens=6,
        base_wall_time_s=1.5,
        matches_target=True,
    )
    rows = aggregate(
        [rec, {**rec, "prompt_id": "code/y", "accepted": 0, "steps": 6, "wall_time_s": 2.0}],
        [info],
        gamma=3,
        tasks=["code"],
    )
    code = rows[0]
    assert (code["task"], code["prompts"], code["acceptance_rate"]) == ("code", 2, 3 / 12)
    assert code["block_efficiency"] == 12 / 9
    assert code["mbsu"] == pytest.approx((12 / 9) / 1.3)
    assert code["hw_speedup"] == pytest.approx((12 / 9) / (3 * 0.2 + 1))
    assert code["hw_speedup_verify"] == pytest.approx((12 / 9) * 0.05 / (3 * 0.01 + 0.08))
    assert code["speedup"] == pytest.approx(3.0 / 3.0)
    assert rows[1]["task"] == ALL and rows[1]["acceptance_rate"] == code["acceptance_rate"]


def test_bad_configurations_fail_clearly(tmp_path, tiny_pair, tokenizer, prompts):
    target, draft = tiny_pair
    model = ModelConfig(target=target)
    with pytest.raises(EvaluationError, match="no draft"):
        evaluate(model, [], EvaluateConfig(**FAST), prompts=prompts)
    with pytest.raises(EvaluationError, match="not an HF model folder"):
        evaluate(model, [str(tmp_path)], EvaluateConfig(**FAST), prompts=prompts)
    other = tiny_config("llama", vocab_size=len(tokenizer) - 1)
    wrong = save_draft(build_draft(other), tokenizer, tmp_path / "wrong_vocab")
    with pytest.raises(IncompatibleDraftError, match="vocab_size"):
        evaluate(model, [str(wrong)], EvaluateConfig(**FAST), prompts=prompts)


@pytest.mark.real_target
def test_real_target_with_random_draft(tmp_path, smollm2_dir, smollm2, prompts):
    target_model, tokenizer = smollm2
    draft = save_draft(
        build_draft(derive_draft_config(target_model.config, SMALL), seed=0), tokenizer, tmp_path / "random_draft"
    )
    res = evaluate(
        ModelConfig(target=str(smollm2_dir)),
        [str(draft)],
        EvaluateConfig(prompts_per_task=1, max_new_tokens=16, cpus_per_worker=1),
        prompts=prompts,
    )
    greedy = {r["task"]: r for r in res.rows if r["mode"] == "greedy"}
    assert set(greedy) == {*TASKS, ALL}
    assert greedy[ALL]["acceptance_rate"] < 0.3  # a random draft is (almost) never right
    assert res.drafts[0].c_params < 0.05  # ~1.6M-parameter draft vs the 134.5M target
    for rec in res.records:  # lossless up to fp32 near-ties
        if rec["mode"] == "greedy" and not rec["matches_target"]:
            ids = next(p for ps in prompts.values() for p in ps if p.id == rec["prompt_id"]).input_ids
            import torch

            from fastdraft_ray.specdec.decode import autoregressive_generate

            x = torch.tensor([ids])
            ref = autoregressive_generate(target_model, x, max_new_tokens=16, eos_token_id=2).tokens
            _, gap = first_divergence(target_model, x, ref, rec["tokens"])
            assert gap < NEAR_TIE_LOGIT_GAP
    write_report(res, RunLayout.at(tmp_path / "run").eval_dir)
    assert (tmp_path / "run/eval/results.md").exists()


def test_transformers_baselines_run_on_the_same_prompts_and_match_the_target(tmp_path, tiny_pair, prompts):
    target, draft = tiny_pair
    cfg = EvaluateConfig(**FAST, modes=["greedy"], baselines=["prompt_lookup", "assisted"], gamma_select=[1, 3])
    res = evaluate(ModelConfig(target=target), [draft, target], cfg, prompts=prompts)
    pooled = {(r["method"], r["draft"]): r for r in res.baselines if r["task"] == ALL}
    assert set(pooled) == {("prompt_lookup", ""), ("assisted", "draft"), ("assisted", "target")}
    assert all(
        r["prompts"] == len(TASKS) and r["speedup"] > 0 and r["matches_target"] == 1.0 for r in pooled.values()
    )
    # The target assisting itself: every proposal accepted, 8 tokens in about 2 verifying calls + prefill.
    assert pooled[("assisted", "target")]["tokens_per_call"] > pooled[("assisted", "draft")]["tokens_per_call"]
    assert not any("method" in r for r in res.records)  # the baselines' records stay out of the draft rows
    assert {(r["draft"], r["task"]): r["prompts"] for r in res.rows if r["gamma"] == 3}[("draft", ALL)] == len(
        TASKS
    )
    write_report(res, RunLayout.at(tmp_path / "run").eval_dir)
    md = (tmp_path / "run/eval/results.md").read_text()
    assert "| transformers prompt lookup | — | 3 |" in md and "| transformers assisted | draft | 3 |" in md
