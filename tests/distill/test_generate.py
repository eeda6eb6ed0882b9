"""KD generation: batched left-padded sampling gives each row the target's own distribution, top-k scoring,
the output schema, and exactly-once resume after a real process kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fastdraft_ray.distill.generate import read_kd
from fastdraft_ray.models.batched import generate_batch, sample_batch, score_topk
from tests.distill.conftest import gen_config, write_alpaca

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config("llama")).eval()


@pytest.mark.parametrize("sampler", [generate_batch, sample_batch])
def test_left_padded_greedy_matches_unpadded(tiny_model, sampler):
    prompts = [[1, 5], [1, 9, 10, 11, 12, 13], [1, 40, 41, 42]]
    batched = sampler(tiny_model, prompts, temperature=0.0, max_new_tokens=8, pad=0, eos=[2])
    for p, (ids, finished) in zip(prompts, batched, strict=True):
        alone = generate_batch(tiny_model, [p], temperature=0.0, max_new_tokens=8, pad=0, eos=[2])[0]
        assert (ids, finished) == alone  # fp32 near-ties could flip this on a real model; not on these rows
        assert finished == (ids[-1] == 2) and 2 not in ids[:-1]


def test_lean_sampler_stops_rows_at_their_stop_token(tiny_model):
    """A row that emits a stop token ends there (later steps pad it); the others run to max_new_tokens."""
    torch.manual_seed(3)
    prompts = [[1, 5 + i] for i in range(24)]
    out = sample_batch(tiny_model, prompts, temperature=1.5, max_new_tokens=12, pad=0, eos=[2, 7])
    assert any(finished for _, finished in out) and not all(finished for _, finished in out)
    for ids, finished in out:
        stops = [i for i, t in enumerate(ids) if t in (2, 7)]
        assert stops == ([len(ids) - 1] if finished else []) and (finished or len(ids) == 12)


@pytest.mark.parametrize("sampler", [generate_batch, sample_batch])
def test_padded_sampling_follows_the_targets_full_distribution(tiny_model, sampler):
    """First tokens of a short prompt, left-padded beside a long one, sampled at T=0.7: their frequencies match
    softmax(logits / 0.7) of the unpadded prompt, including the tail beyond HF's default top_k=50."""
    torch.manual_seed(0)
    short, long = [1, 5, 6], [1] + list(range(10, 30))
    n = 600
    out = sampler(tiny_model, [short] * n + [long], temperature=0.7, max_new_tokens=1, pad=0, eos=[2])
    first = np.array([ids[0] for ids, _ in out[:n]])
    with torch.no_grad():
        p = torch.softmax(tiny_model(input_ids=torch.tensor([short])).logits[0, -1] / 0.7, -1).numpy()
    tail = np.argsort(p)[::-1][50:]
    expected, observed = p[tail].sum(), np.isin(first, tail).mean()
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert expected > 0.2 and abs(observed - expected) < 4 * sigma, (observed, expected)
    top = int(np.argmax(p))
    assert abs((first == top).mean() - p[top]) < 4 * np.sqrt(p[top] * (1 - p[top]) / n)


def test_score_topk_matches_unpadded_forward(tiny_model):
    prompts, responses = [[1, 5], [1, 9, 10, 11, 12]], [[20, 21, 22, 2], [30]]
    scored = score_topk(tiny_model, prompts, responses, 5, pad=0, chunk=2)
    for p, r, (ids, lps) in zip(prompts, responses, scored, strict=True):
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([p + r])).logits[0]
        lp = torch.log_softmax(logits[len(p) - 1 : len(p) - 1 + len(r)], -1).topk(5, -1)
        assert ids.shape == (len(r), 5)
        assert ids.tolist() == lp.indices.tolist()
        np.testing.assert_allclose(lps, lp.values.numpy(), atol=1e-5)


def test_generation_output_schema_and_controlled_resume(tmp_path, tiny_target, ray_local):
    from fastdraft_ray.distill.generate import run_generation
    from fastdraft_ray.layout import RunLayout

    cfg = gen_config(tiny_target, tmp_path, write_alpaca(tmp_path / "a.json", 40), topk_logprobs=3)
    assert run_generation(cfg, max_units=2) == {"done": False}
    out = RunLayout.of(cfg).kd.root
    assert len(list(out.glob("responses/*/part-*.parquet"))) == 2
    record = run_generation(cfg)
    assert record["done"] and record["rows"] == 10 * 2
    table = read_kd(out)
    cols = set(table.column_names)
    assert {"prompt_ids", "response_ids", "temperature", "source", "topk_ids", "topk_logprobs"} <= cols
    pairs = list(zip(table.column("prompt_id").to_pylist(), table.column("temperature").to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) == 20
    for row in table.to_pylist():
        assert 1 <= len(row["response_ids"]) <= 6 and len(row["topk_ids"]) == len(row["response_ids"])
        assert all(len(k) == 3 for k in row["topk_ids"])
        assert row["finished"] == (row["response_ids"][-1] == 2)
    greedy = [r for r in table.to_pylist() if r["temperature"] == 0.0]
    assert all(r["response_ids"][0] == r["topk_ids"][0][0] for r in greedy)  # greedy = the target's argmax
    bad = gen_config(tiny_target, tmp_path, tmp_path / "a.json", topk_logprobs=3, max_new_tokens=7)
    with pytest.raises(ValueError, match="other settings"):
        run_generation(bad)


def _job(cfg_args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "generate.py"), "--config", str(cfg_args[0]), *cfg_args[1:]],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow  # over a minute (`-m slow`); its recorded run: benchmarks/results/slow_tests_2026-12-03.md
def test_interrupted_job_rerun_produces_each_prompt_temperature_exactly_once(tmp_path, tiny_target):
    """Kill the job's whole process group (driver + its Ray) after its first unit file appears; re-run."""
    import yaml

    prompts = write_alpaca(tmp_path / "a.json", 20)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "run_name": "g",
                "storage": str(tmp_path),
                "model": {"target": str(tiny_target)},
                "generate": {
                    "prompt_sources": {"a": f"alpaca:{prompts}"},
                    "num_prompts": 8,
                    "temperatures": [0.0, 1.0],
                    "max_new_tokens": 16,
                    "batch_size": 1,
                    "shard_prompts": 1,
                    "min_prompt_chars": 2,
                },
            }
        )
    )
    out = tmp_path / "g" / "kd"
    proc = _job([recipe])
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("responses/*/part-*.parquet")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(list(out.glob("responses/*/part-*.parquet")))
    assert 1 <= partial < 16 and not (out / "DONE.json").exists()
    again = _job([recipe])
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0, log[-3000:]
    table = read_kd(out)
    pairs = list(zip(table.column("prompt_id").to_pylist(), table.column("temperature").to_pylist(), strict=True))
    prompt_ids = pq.read_table(out / "prompts.parquet").column("prompt_id").to_pylist()
    assert sorted(pairs) == sorted((p, t) for p in prompt_ids for t in (0.0, 1.0))
    assert not list(out.glob("responses/*/*.part"))


def test_on_policy_rows_are_written_by_the_draft_and_scored_by_the_target(tmp_path, tiny_target, ray_local):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from fastdraft_ray.distill.ftdata import build_ft_rows
    from fastdraft_ray.distill.generate import run_generation
    from fastdraft_ray.layout import RunLayout
    from fastdraft_ray.models.draft import save_draft
    from fastdraft_ray.models.target import load_tokenizer
    from fastdraft_ray.models.vocab import trim_draft
    from fastdraft_ray.train.kd_rows import RowLayout
    from tests.conftest import tiny_config

    torch.manual_seed(3)
    draft_dir = tmp_path / "draft"  # a trimmed-head draft, as the default recipe trains (custom classes)
    tok = load_tokenizer(str(tiny_target))
    draft = trim_draft(LlamaForCausalLM(tiny_config("llama", num_hidden_layers=1)), torch.arange(2, 60))
    save_draft(draft, tok, draft_dir)
    prompts = write_alpaca(tmp_path / "a.json", 40)
    with pytest.raises(ValueError, match="topk_logprobs"):
        run_generation(gen_config(tiny_target, tmp_path / "x", prompts, onpolicy_fraction=0.5))
    cfg = gen_config(
        tiny_target,
        tmp_path,
        prompts,
        ("stages.ft.train.kd_loss=kl",),  # on-policy rows teach only through the target's scores
        topk_logprobs=3,
        onpolicy_fraction=0.5,
        onpolicy_draft=str(draft_dir),
        temperatures="[1.0]",
        max_new_tokens=5,
    )
    assert run_generation(cfg)["done"]
    rows = read_kd(RunLayout.of(cfg).kd.root).to_pylist()
    on_policy = [r for r in rows if r["writer"] == "draft"]
    assert len(on_policy) == 5 and len(rows) == 10
    target = AutoModelForCausalLM.from_pretrained(tiny_target).eval()
    r = on_policy[0]
    with torch.no_grad():
        logits = target(input_ids=torch.tensor([r["prompt_ids"] + r["response_ids"]])).logits[0]
    n = len(r["prompt_ids"])
    want = torch.log_softmax(logits[n - 1 : n - 1 + len(r["response_ids"])], -1).topk(3, -1)
    assert r["topk_ids"] == want.indices.tolist()  # the TARGET's scores on the draft's tokens
    manifest = build_ft_rows(
        RunLayout.of(cfg).kd.root, tmp_path / "rows", tok, seq_len=24, topk=3, val_fraction=0.0
    )
    table = pq.read_table(tmp_path / "rows" / manifest["splits"]["train"]["shards"][0]["file"])
    hard = RowLayout(24, 3).decode(torch.tensor(table.column("input_ids").to_pylist()))["hard"]
    assert sorted(hard.tolist()) == [0.0] * 5 + [1.0] * 5  # no CE on the draft's own tokens


def test_magpie_instructions_are_written_by_the_target_then_answered(tmp_path, ray_local):
    from transformers import LlamaForCausalLM

    from fastdraft_ray.distill.generate import run_generation
    from fastdraft_ray.layout import RunLayout
    from fastdraft_ray.models.target import load_tokenizer
    from tests.conftest import tiny_config
    from tests.train.conftest import save_tiny_target

    target = save_tiny_target(tmp_path / "chat_target")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config("llama")).save_pretrained(target)  # seeded weights: a deterministic test
    tok = load_tokenizer(str(target))
    tok.chat_template = "{% for m in messages %}<s> w3 {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}w4 {% endif %}"
    tok.save_pretrained(target)
    cfg = gen_config(
        target,
        tmp_path,
        write_alpaca(tmp_path / "a.json", 20),
        num_prompts=2,
        magpie_prompts=6,
        magpie_max_tokens=32,
        temperatures="[0.0]",
    )
    record = run_generation(cfg)
    out = RunLayout.of(cfg).kd.root
    written = [
        t for f in sorted(out.glob("magpie/part-*.parquet")) for t in pq.read_table(f).column("text").to_pylist()
    ]
    prompts = pq.read_table(out / "prompts.parquet").to_pylist()
    magpie = [p for p in prompts if p["source"] == "magpie"]
    assert 1 <= len(magpie) <= 6 and {p["message"] for p in magpie} <= {t.strip() for t in written}
    assert all(p["prompt_ids"][:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("w3")] for p in magpie)
    answered = {r["prompt_id"] for r in read_kd(out).to_pylist()}
    assert {p["prompt_id"] for p in prompts} == answered and record["rows"] == len(prompts)
