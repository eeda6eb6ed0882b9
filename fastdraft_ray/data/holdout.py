"""The one rule that keeps evaluation prompts out of training and distillation data.

A document or instruction is *reserved for evaluation* when the sha256 of its whitespace-normalised text
falls in a fixed 1/8 slice of hash space. Data preparation and KD prompt selection drop reserved items;
the evaluation task builders draw only from reserved items. Because the rule depends on the text alone,
it holds across sources, runs and machines without any shared state.
"""

from __future__ import annotations

import hashlib

EVAL_SLICE = 8  # 1 in 8 items is reserved for evaluation


def normalise(text: str) -> str:
    """Collapse whitespace so formatting differences do not change the verdict."""
    return " ".join(text.split())


def is_reserved_for_eval(text: str) -> bool:
    """True when ``text`` belongs to the evaluation split (never to be trained or distilled on)."""
    digest = hashlib.sha256(normalise(text).encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "big") % EVAL_SLICE == 0
