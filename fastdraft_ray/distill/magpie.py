"""Magpie (Xu et al., 2024): the target writes instructions itself from its chat template's user-turn prefix.

Giving an aligned chat model only the text that opens a user turn (system prompt + user header) makes it write a
plausible user request; it stops at its end-of-turn token. Those requests are cleaned, deduplicated and filtered
(never an evaluation-reserved text), then answered by the target like any other prompt.
"""

from __future__ import annotations

from fastdraft_ray.data.holdout import is_reserved_for_eval, normalise

_SENTINEL = "\u2063MAGPIE\u2063"


class MagpieError(ValueError):
    """The target cannot be used for Magpie (no chat template, or the template hides the user turn)."""


def user_turn_prefix(tokenizer) -> str:
    """The chat-template text that precedes a user message's content (system turn and user header included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise MagpieError("Magpie needs a chat model: the target's tokenizer has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
    if _SENTINEL not in text:
        raise MagpieError("the chat template does not render the user message verbatim; cannot find its prefix")
    return text[: text.index(_SENTINEL)]


def prefix_ids(tokenizer) -> list[int]:
    """Token ids of :func:`user_turn_prefix` (what the target continues to write an instruction)."""
    return list(tokenizer(user_turn_prefix(tokenizer), add_special_tokens=False)["input_ids"])


def clean_instruction(text: str, min_chars: int = 8) -> str | None:
    """A usable instruction from the target's raw continuation, or None (too short, reserved for evaluation)."""
    text = text.strip()
    if len(text) < min_chars or is_reserved_for_eval(text):
        return None
    return text


def select_instructions(
    texts: list[str], n: int, min_chars: int = 8, exclude: set[str] | None = None
) -> list[str]:
    """The first ``n`` clean, distinct instructions of ``texts`` (dedup by normalised text, also vs ``exclude``)."""
    seen, out = set(exclude or ()), []
    for raw in texts:
        text = clean_instruction(raw, min_chars)
        if text is None or normalise(text) in seen:
            continue
        seen.add(normalise(text))
        out.append(text)
        if len(out) == n:
            break
    return out
