"""Instruction prompts for distillation: read, exclude evaluation items, dedup, length-filter, select, template.

Sources (``generate.prompt_sources``: name -> spec):

* ``embedded:alpaca`` -- LLaMA-Factory ``alpaca_en_demo.json`` (instruction + input; reference = output).
* ``embedded:sharegpt`` -- first human turn of each ShareGPT conversation (reference = first assistant turn).
* ``alpaca:<file.json|file.jsonl>`` or ``hub:<id>`` -- instruction sets; each record's shape is detected:
  instruction (or prompt, question) + input (or context) + output (or response, answer) as in Alpaca, Dolly and
  Evol-Instruct 70k; ``conversations``/``messages`` turns as in Evol-Instruct V2 and ShareGPT; OIG's
  ``<human>: ... <bot>: ...`` text. E.g. ``hub:tatsu-lab/alpaca``, ``hub:databricks/databricks-dolly-15k``,
  ``hub:laion/OIG``, ``hub:WizardLMTeam/WizardLM_evol_instruct_V2_196k`` (need a hub).
* ``task:<family>`` -- prompts shaped exactly like an evaluation family's (:mod:`fastdraft_ray.data.tasks`:
  summarization, story, instruction, code) from the *training* side of the same sources; ``task:code`` prompts
  are raw completions (HumanEval-style, no chat template), like the evaluation's.
* ``functions:<spec>`` -- raw-completion code prompts: every documented Python function of the code documents
  ``<spec>`` reads (e.g. ``functions:embedded:code``, the standard library) as signature + docstring, the shape
  of a HumanEval prompt; the target writes the body.
* any other spec :func:`fastdraft_ray.data.sources.iter_documents` reads: chat records (``?messages=``; first
  user turn + first assistant reply) or plain text (the text is the instruction; no reference response).

**Never an evaluation prompt.** The evaluation harness (:mod:`fastdraft_ray.data.tasks`) draws an alpaca item
when BOTH its instruction and instruction + input are reserved
(:func:`~fastdraft_ray.data.holdout.is_reserved_for_eval`), a ShareGPT item when its first human turn is. Here an item is dropped when ANY of those texts (or the final
user message) is reserved -- a superset of what evaluation can use, so KD prompts and evaluation prompts are
disjoint whichever way either side hashes.
"""

from __future__ import annotations

import ast
import json
import random
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

from fastdraft_ray import assets
from fastdraft_ray.data import tasks
from fastdraft_ray.data.holdout import is_reserved_for_eval, normalise
from fastdraft_ray.data.sources import open_binary
from fastdraft_ray.models.prompting import encode_prompt

ALPACA_DEMO = "llamafactory-0.9.5/data/alpaca_en_demo.json"
_INSTRUCTION_KEYS = ("instruction", "prompt", "question")
_INPUT_KEYS = ("input", "context")
_OUTPUT_KEYS = ("output", "response", "answer")
SCAN_MIN = 100_000


class PromptError(ValueError):
    """A prompt source that cannot be read, or too few usable prompts; the message says what to change."""


@dataclass
class Prompt:
    """One distillation prompt: ``message`` is the user turn (or, ``chat=False``, the raw text to continue);
    ``prompt_ids`` is what the target sees."""

    id: str
    source: str
    message: str
    reference: str | None = None  # the dataset's own response (baseline FT), if it has one
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    chat: bool = True


@dataclass(frozen=True)
class _Raw:
    id: str
    message: str
    reference: str | None
    hashed: tuple[str, ...]  # every text whose reservation excludes the item
    chat: bool = True  # False: a raw completion prompt (no chat template)


def _first(record: dict, keys: tuple[str, ...]) -> str:
    return next((str(record[k]) for k in keys if record.get(k)), "")


def _chat_pair(turns: list) -> tuple[str, str | None]:
    """First user turn and the assistant reply after it, from ShareGPT (from/value) or role/content turns."""
    from fastdraft_ray.data.embedded import sharegpt_messages

    msgs = sharegpt_messages({"conversations": turns}) if turns and "from" in turns[0] else turns
    msgs = [m for m in msgs if isinstance(m, dict) and isinstance(m.get("content"), str)]
    u = next((i for i, m in enumerate(msgs) if m.get("role") == "user"), None)
    if u is None:
        return "", None
    reply = msgs[u + 1]["content"] if u + 1 < len(msgs) and msgs[u + 1].get("role") == "assistant" else None
    return msgs[u]["content"].strip(), reply.strip() if reply else None


def _oig_pair(text: str) -> tuple[str, str | None]:
    """OIG's ``<human>: ... <bot>: ...`` text -> (first human turn, first bot reply)."""
    if "<human>:" not in text:
        return "", None
    rest = text.split("<human>:", 1)[1]
    human, _, bot = rest.partition("<bot>:")
    return human.strip(), bot.split("<human>:", 1)[0].strip() or None


def _alpaca_records(records, label: str) -> Iterator[_Raw]:
    """Instruction records of any common shape: Alpaca/Dolly/Evol fields, chat turns, or OIG text."""
    for i, row in enumerate(records):
        if not isinstance(row, dict):
            raise PromptError(f"{label}: record {i} is not an object")
        instruction, extra = _first(row, _INSTRUCTION_KEYS).strip(), _first(row, _INPUT_KEYS).strip()
        if instruction:
            full = f"{instruction}\n\n{extra}" if extra else instruction
            yield _Raw(f"{label}/{i}", full, _first(row, _OUTPUT_KEYS).strip() or None, (instruction, full))
            continue
        turns = row.get("conversations") or row.get("messages")
        message, reply = _chat_pair(turns) if isinstance(turns, list) else _oig_pair(str(row.get("text") or ""))
        if message:
            yield _Raw(f"{label}/{i}", message, reply, (message,))


def _read_alpaca(location: str) -> Iterator[_Raw]:
    if location.startswith("hub:"):
        try:
            import datasets

            rows = datasets.load_dataset(location[4:], split="train", streaming=True)
        except Exception as exc:
            raise PromptError(
                f"cannot open hub dataset {location[4:]!r} ({type(exc).__name__}: {str(exc)[:200]}); without a "
                "hub use embedded:alpaca, embedded:sharegpt or a local alpaca:<file.json>"
            ) from None
        yield from _alpaca_records(rows, location)
        return
    with open_binary(location) as fh:
        text = fh.read().decode("utf-8", errors="replace")
    stripped = text.lstrip()
    try:
        records = (
            json.loads(text)
            if stripped.startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except json.JSONDecodeError as exc:
        raise PromptError(f"{location}: not JSON / JSON lines ({exc})") from None
    yield from _alpaca_records(records, location)


def _read_documents(spec: str) -> Iterator[_Raw]:
    from fastdraft_ray.data.sources import iter_documents

    for doc in iter_documents(spec):
        if doc.reserved:  # the document or its first user turn is an evaluation item
            continue
        if doc.messages:
            users = [i for i, m in enumerate(doc.messages) if m["role"] == "user"]
            if not users:
                continue
            u = users[0]
            reply = doc.messages[u + 1]["content"] if u + 1 < len(doc.messages) else None
            if reply is not None and doc.messages[u + 1]["role"] != "assistant":
                reply = None
            message = doc.messages[u]["content"].strip()
            yield _Raw(doc.doc_id, message, reply.strip() if reply else None, (message, doc.text))
        elif doc.text.strip():
            yield _Raw(doc.doc_id, doc.text.strip(), None, (doc.text,))


def _task_items(family: str, tokenizer) -> Iterator[_Raw]:
    if family not in tasks.TASKS:
        raise PromptError(f"task:{family}: unknown task family; choose from {', '.join(tasks.TASKS)}")
    for item_id, raw, hashed in tasks.training_items(family):
        message, chat = tasks.format_message(family, raw, tokenizer)
        yield _Raw(item_id, message, None, hashed, chat)


MAX_FUNCTION_PROMPT_CHARS = 1500


def function_prompts(source: str) -> Iterator[tuple[str, str]]:
    """``(name, signature + docstring)`` of each documented function in Python ``source`` (methods dedented);
    nothing is executed. Unparseable sources yield nothing."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or not node.body:
            continue
        doc = node.body[0]
        if not (
            isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)
        ):
            continue
        if len(node.body) < 2 or len(doc.value.value.strip()) < 20:  # a body to write and a docstring to go by
            continue
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
        text = textwrap.dedent("\n".join(lines[start : doc.end_lineno])) + "\n"
        if len(text) <= MAX_FUNCTION_PROMPT_CHARS:
            yield node.name, text


def _function_items(spec: str) -> Iterator[_Raw]:
    from fastdraft_ray.data.sources import iter_documents

    for doc in iter_documents(spec):
        if doc.reserved:
            continue
        for name, text in function_prompts(doc.text):
            yield _Raw(f"{doc.doc_id}:{name}", text, None, (doc.text, text), chat=False)


def read_source(spec: str, tokenizer=None) -> Iterator[_Raw]:
    """Raw (id, message, reference) items of one prompt source spec, evaluation items NOT yet removed
    (``task:`` specs need the ``tokenizer`` to shape summarisation prompts)."""
    if spec.startswith("task:"):
        yield from _task_items(spec.split(":", 1)[1], tokenizer)
    elif spec.startswith("functions:"):
        yield from _function_items(spec.split(":", 1)[1])
    elif spec == "embedded:alpaca":
        path = assets.extract_member("llamafactory", ALPACA_DEMO)
        yield from _alpaca_records(json.loads(path.read_text(encoding="utf-8")), "alpaca")
    elif spec.startswith("alpaca:"):
        yield from _read_alpaca(spec.split(":", 1)[1])
    elif spec.startswith("hub:") and "?" not in spec:  # instruction sets on the hub: shape detected per record
        yield from _read_alpaca(spec)
    else:
        yield from _read_documents(spec)


def usable(raw: _Raw, min_chars: int) -> bool:
    """Not an evaluation item and long enough."""
    return len(raw.message) >= min_chars and not any(is_reserved_for_eval(t) for t in (*raw.hashed, raw.message))


def load_prompts(
    sources: dict[str, str],
    tokenizer,
    n: int,
    *,
    seed: int = 0,
    max_prompt_tokens: int = 384,
    min_chars: int = 8,
    exclude: set[str] | None = None,
) -> list[Prompt]:
    """``n`` prompts drawn round-robin from the sources (each shuffled with ``seed``), deduplicated by normalised
    text (and against ``exclude``), evaluation items dropped, at most ``max_prompt_tokens`` under the template."""
    if not sources:
        raise PromptError("generate.prompt_sources is empty")
    seen = set(exclude or ())
    pools = []
    for name in sorted(sources):
        scan = max(SCAN_MIN, 4 * n)  # hub-sized sources: draw from the first `scan` records only
        items = [r for r in islice(read_source(sources[name], tokenizer), scan) if usable(r, min_chars)]
        random.Random(f"{seed}/{name}").shuffle(items)
        pools.append((name, items))
    out: list[Prompt] = []
    longest = max((len(items) for _, items in pools), default=0)
    for i in range(longest):
        for name, items in pools:
            if i >= len(items) or len(out) >= n:
                continue
            raw = items[i]
            key = normalise(raw.message)
            if key in seen:
                continue
            seen.add(key)
            ids = encode_prompt(tokenizer, raw.message, raw.chat)
            if len(ids) <= max_prompt_tokens:
                out.append(Prompt(f"{name}:{raw.id}", name, raw.message, raw.reference, ids, raw.chat))
        if len(out) >= n:
            break
    if len(out) < n:
        raise PromptError(
            f"only {len(out)} usable prompts in {sorted(sources)} (asked {n}; evaluation items, duplicates and "
            f"prompts over {max_prompt_tokens} tokens are dropped): lower generate.num_prompts or add sources"
        )
    return out
