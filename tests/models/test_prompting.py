"""One encoding of a prompt and one rule for the tokens a generation stops at (models/prompting.py)."""

from __future__ import annotations

import pytest

from fastdraft_ray.models.prompting import encode_prompt, render_prompt, stop_token_ids


class _Tok:
    """The parts of a tokenizer the rule reads."""

    def __init__(self, eos, special, vocab):
        self.eos_token_id, self.all_special_tokens, self.vocab = eos, special, vocab

    def convert_tokens_to_ids(self, token):
        return self.vocab[token]


class _Gen:
    def __init__(self, eos):
        self.eos_token_id = eos


def test_union_of_eos_generation_config_and_end_of_document():
    tok = _Tok(2, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], {"<|endoftext|>": 0})
    assert stop_token_ids(tok) == [0, 2]  # a raw completion ends at <|endoftext|>, a chat turn at <|im_end|>
    assert stop_token_ids(tok, _Gen([2, 7])) == [0, 2, 7]
    assert stop_token_ids(tok, _Gen(5)) == [0, 2, 5]
    with pytest.raises(ValueError, match="no EOS"):
        stop_token_ids(_Tok(None, [], {}))


@pytest.mark.real_target
def test_real_target_stop_tokens_and_chat_encoding(smollm2):
    model, tok = smollm2
    assert stop_token_ids(tok, model) == sorted(
        {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    )
    text, ids = render_prompt(tok, "Hello", chat=True)
    assert text.startswith("<|im_start|>") and ids == encode_prompt(tok, "Hello")
    assert render_prompt(tok, "def f():", chat=False) == ("def f():", list(tok("def f():")["input_ids"]))
