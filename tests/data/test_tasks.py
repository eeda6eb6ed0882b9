"""Task families: real held-out prompts, seeded selection, chat formatting, clear errors."""

import pytest

from fastdraft_ray.data.holdout import is_reserved_for_eval
from fastdraft_ray.data.tasks import SUMMARIZE, TASKS, TaskError, _is_story_request, _offline_items, load_tasks
from fastdraft_ray.models.target import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="module")
def tasks(tokenizer):
    return load_tasks(tokenizer, prompts_per_task=4, seed=0)


def test_four_families_are_filled_with_distinct_prompts(tasks):
    assert list(tasks) == list(TASKS)
    for task, prompts in tasks.items():
        assert len(prompts) == 4
        assert len({p.id for p in prompts}) == 4
        assert all(p.task == task and p.input_ids and p.id.startswith(task + "/") for p in prompts)


def test_every_pool_item_is_reserved_for_eval():
    """The held-out guarantee covers the whole pool, not only what one seed happens to pick."""
    for task in TASKS:
        pools = _offline_items(task)
        assert sum(len(v) for v in pools.values()) >= 8, task
        for items in pools.values():
            assert all(is_reserved_for_eval(text) for it in items for text in (it.source_text, *it.also_reserved))
    assert any(it.also_reserved for it in _offline_items("instruction")["alpaca"])  # alpaca: instruction alone too


def test_selected_prompts_are_reserved_and_built_from_their_source(tasks):
    for prompts in tasks.values():
        for p in prompts:
            assert is_reserved_for_eval(p.source_text)
            assert p.source_text[:40] in p.text or p.task == "summarization"


def test_selection_is_fixed_by_seed(tokenizer, tasks):
    again = load_tasks(tokenizer, prompts_per_task=4, seed=0)
    assert {t: [(p.id, p.input_ids) for p in ps] for t, ps in again.items()} == {
        t: [(p.id, p.input_ids) for p in ps] for t, ps in tasks.items()
    }
    other = load_tasks(tokenizer, prompts_per_task=4, seed=1)
    assert any([p.id for p in other[t]] != [p.id for p in tasks[t]] for t in TASKS)


def test_chat_template_for_text_tasks_raw_completion_for_code(tokenizer, tasks):
    for task in ("summarization", "story", "instruction"):
        for p in tasks[task]:
            assert p.text.startswith("<|im_start|>system") and p.text.endswith("<|im_start|>assistant\n")
            assert p.input_ids == tokenizer(p.text, add_special_tokens=False)["input_ids"]
    for p in tasks["code"]:
        assert p.text == p.source_text and p.text.lstrip().startswith(("def ", "from ", "import "))
    wrapped = load_tasks(tokenizer, ["code"], 2, code_chat=True)["code"]
    assert all(p.text.startswith("<|im_start|>") and p.source_text in p.text for p in wrapped)


def test_summaries_are_truncated_and_story_instruction_are_disjoint(tokenizer, tasks):
    short = load_tasks(tokenizer, ["summarization"], 4, max_article_tokens=64)["summarization"]
    for p in short:
        assert SUMMARIZE.split("\n")[0] in p.text
        assert len(p.input_ids) <= 64 + 60  # article + instruction + chat template
    assert all(_is_story_request(p.text.split("<|im_start|>user\n")[1]) for p in tasks["story"])
    assert not any(_is_story_request(p.source_text) for p in tasks["instruction"])


def test_bad_requests_fail_clearly(tokenizer):
    with pytest.raises(TaskError, match="unknown task"):
        load_tasks(tokenizer, ["poetry"])
    with pytest.raises(TaskError, match="only .* held-out items"):
        load_tasks(tokenizer, ["code"], prompts_per_task=500)
    with pytest.raises(TaskError, match="offline or hub"):
        load_tasks(tokenizer, ["code"], source="s3")
    with pytest.raises(TaskError, match="evaluate.source=offline"):  # HF_HUB_OFFLINE=1 in tests
        load_tasks(tokenizer, ["code"], 1, source="hub")


def test_no_eval_item_survives_in_trainable_data():
    """Cross-check with data preparation: the trainable documents of the embedded corpora contain none of the
    evaluation items (wiki and c4 documents, ShareGPT first human turns)."""
    from fastdraft_ray.data.holdout import normalise
    from fastdraft_ray.data.sources import iter_documents

    docs = {normalise(it.source_text) for items in _offline_items("summarization").values() for it in items}
    trainable = {
        normalise(d.text) for src in ("embedded:wiki", "embedded:c4") for d in iter_documents(src, reserved=False)
    }
    assert docs and not docs & trainable
    turns = {
        normalise(it.source_text) for task in ("story", "instruction") for it in _offline_items(task)["sharegpt"]
    }
    first_user = {
        normalise(next(m["content"] for m in d.messages if m["role"] == "user"))
        for d in iter_documents("embedded:sharegpt", reserved=False)
        if d.messages and any(m["role"] == "user" for m in d.messages)
    }
    assert turns and len(first_user) > 5000 and not turns & first_user
