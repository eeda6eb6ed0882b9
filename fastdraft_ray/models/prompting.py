"""How the target reads a prompt and when it has finished: the one encoding of a message (chat template or raw)
and the one set of stop tokens, shared by KD generation, evaluation and serving.

Stop tokens (``stop_token_ids``): a generation ends at the first of

- the tokenizer's EOS token (the end of a chat turn, e.g. SmolLM2's ``<|im_end|>``),
- every EOS id of the model's generation config (``generation_config.eos_token_id``, an int or a list),
- the tokenizer's end-of-document token, when it defines one among its special tokens (``<|endoftext|>``,
  ``</s>``, ``<|end_of_text|>``, ``<eos>``): where a raw completion (code, text, no chat template) naturally ends.

One set serves chat and raw prompts alike: none of these tokens is content in either, so stopping at all of them
never cuts a response short, and a raw completion no longer runs past the end of its document.
"""

from __future__ import annotations

END_OF_DOCUMENT_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def encode_prompt(tokenizer, message: str, chat: bool = True) -> list[int]:
    """``message`` as one user turn under the tokenizer's chat template, generation prompt appended (``chat=False``
    or no template: the plain text with the tokenizer's special tokens)."""
    return render_prompt(tokenizer, message, chat)[1]


def render_prompt(tokenizer, message: str, chat: bool = True) -> tuple[str, list[int]]:
    """``(text the target reads, its token ids)`` for ``message``, as ``encode_prompt`` encodes it."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return message, list(tokenizer(message, add_special_tokens=True)["input_ids"])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
    )
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation (``[{"role", "content"}, ...]``) under the tokenizer's chat template, generation prompt
    appended; raises ``ValueError`` when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the target's tokenizer has no chat template: send a raw prompt to /v1/completions")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token id that ends a generation (see the module docstring), sorted; raises if there is none.

    ``generation_config``: a model's ``generation_config`` (or the model itself), optional."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(generation_config, "generation_config", generation_config)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    for token in END_OF_DOCUMENT_TOKENS:
        if token in special:
            ids.add(int(tokenizer.convert_tokens_to_ids(token)))
    if not ids:
        raise ValueError("the target defines no EOS token: generations would never end")
    return sorted(ids)


def pad_token_id(tokenizer) -> int:
    """The id batched generation pads with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
