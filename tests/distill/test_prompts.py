"""KD prompts: never an evaluation prompt, record shapes, dedup and length filters, Magpie helpers."""

from __future__ import annotations

import json

import pytest

from fastdraft_ray.data.holdout import is_reserved_for_eval


def test_kd_prompts_never_include_evaluation_items(smollm2_dir):
    from fastdraft_ray.data.tasks import _alpaca, load_tasks
    from fastdraft_ray.distill.prompts import load_prompts, read_source
    from fastdraft_ray.models.target import load_tokenizer

    tok = load_tokenizer(str(smollm2_dir))
    usable = [r for r in read_source("embedded:alpaca") if not any(is_reserved_for_eval(t) for t in r.hashed)]
    kd = load_prompts({"alpaca": "embedded:alpaca"}, tok, len(usable) - 20, max_prompt_tokens=10_000, min_chars=1)
    kd_texts = {p.message for p in kd}
    eval_items = _alpaca()  # every alpaca item the evaluation harness may draw
    assert eval_items and not kd_texts & {it.message for it in eval_items}
    assert not kd_texts & {t for it in eval_items for t in it.also_reserved}
    prompts = load_tasks(tok, ["instruction", "story"], prompts_per_task=2)
    assert not {p.source_text for ps in prompts.values() for p in ps} & kd_texts
    assert len(kd_texts) == len(kd)  # deduplicated


def test_task_shaped_prompts_mirror_the_evaluation_and_never_meet_it(smollm2_dir):
    from fastdraft_ray.data.tasks import load_tasks
    from fastdraft_ray.distill.prompts import PromptError, load_prompts
    from fastdraft_ray.models.target import load_tokenizer

    tok = load_tokenizer(str(smollm2_dir))
    kd = load_prompts({"summ": "task:summarization", "code": "task:code"}, tok, 40, max_prompt_tokens=600)
    by_source = {s: [p for p in kd if p.source == s] for s in ("summ", "code")}
    assert all(p.message.startswith("Summarize the following article") and p.chat for p in by_source["summ"])
    code = by_source["code"]
    assert code and not any(p.chat for p in code)  # raw completion, as the evaluation's code prompts
    assert all(p.prompt_ids == tok(p.message)["input_ids"] for p in code)
    evaluation = load_tasks(tok, ["summarization", "code"], prompts_per_task=8)
    eval_texts = {p.source_text for ps in evaluation.values() for p in ps} | {
        p.text for ps in evaluation.values() for p in ps
    }
    assert not eval_texts & {p.message for p in kd}
    with pytest.raises(PromptError, match="unknown task family"):
        load_prompts({"x": "task:poetry"}, tok, 1)


def test_function_prompts_are_signature_and_docstring():
    from fastdraft_ray.distill.prompts import function_prompts

    source = """
class A:
    @staticmethod
    def area(r):
        \"\"\"Area of a circle of radius r, in square units.\"\"\"
        return 3.14159 * r * r

def short():
    \"\"\"Too short.\"\"\"
    return 1

def undocumented(x):
    return x
"""
    got = list(function_prompts(source))
    assert got == [
        ("area", '@staticmethod\ndef area(r):\n    """Area of a circle of radius r, in square units."""\n')
    ]
    assert list(function_prompts("def broken(:\n")) == []


def test_record_shapes_and_filters(tmp_path, smollm2_dir):
    from fastdraft_ray.distill.prompts import PromptError, load_prompts, read_source
    from fastdraft_ray.models.target import load_tokenizer

    records = [
        {"instruction": "Name three colours", "context": "for a painter", "response": "red, blue, green"},
        {"conversations": [{"from": "human", "value": "How do tides work?"}, {"from": "gpt", "value": "Moon."}]},
        {"text": "<human>: Tell me a joke please\n<bot>: No.\n<human>: again"},
        {"instruction": "Name three colours", "context": "for a painter", "response": "dup"},
        {"instruction": "x" * 4000, "output": "too long"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    raw = list(read_source(f"alpaca:{path}"))
    assert [(r.message, r.reference) for r in raw[:3]] == [
        ("Name three colours\n\nfor a painter", "red, blue, green"),
        ("How do tides work?", "Moon."),
        ("Tell me a joke please", "No."),
    ]
    tok = load_tokenizer(str(smollm2_dir))
    keep = [r for r in raw[:3] if not any(is_reserved_for_eval(t) for t in (*r.hashed, r.message))]
    got = load_prompts({"m": f"alpaca:{path}"}, tok, len(keep), max_prompt_tokens=200)
    assert sorted(p.message for p in got) == sorted(r.message for r in keep)  # duplicate and long one dropped
    assert all(len(p.prompt_ids) <= 200 for p in got)
    with pytest.raises(PromptError, match="usable prompts"):
        load_prompts({"m": f"alpaca:{path}"}, tok, len(keep) + 1, max_prompt_tokens=200)


def test_magpie_helpers(smollm2_dir):
    from fastdraft_ray.distill.magpie import MagpieError, prefix_ids, select_instructions, user_turn_prefix
    from fastdraft_ray.models.target import load_tokenizer

    tok = load_tokenizer(str(smollm2_dir))
    prefix = user_turn_prefix(tok)
    assert prefix.endswith("<|im_start|>user\n") and tok.decode(prefix_ids(tok)) == prefix
    texts = ["  Write a haiku about rain. ", "Write a haiku about  rain.", "hi", "Explain recursion to a child."]
    texts = [t for t in texts if not is_reserved_for_eval(t)]
    picked = select_instructions(texts, 5)
    assert "hi" not in picked and len({" ".join(t.split()) for t in picked}) == len(picked)
    with pytest.raises(MagpieError, match="chat template"):
        user_turn_prefix(type("T", (), {"chat_template": None})())
