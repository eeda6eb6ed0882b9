"""Deployment precision: int8 dynamic quantisation of every nn.Linear (tied, untied and custom heads), bf16, the
errors, and speculative decoding at int8."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from fastdraft_ray.specdec import precision as P
from fastdraft_ray.specdec.decode import autoregressive_generate, speculative_generate
from tests.conftest import tiny_config


def _llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config("llama", **overrides)).eval()


class _TrimmedHead(nn.Module):
    """A head scoring only ``keep`` token ids and scattering them into full-vocabulary logits (-inf elsewhere)."""

    def __init__(self, hidden: int, keep: torch.Tensor, vocab: int):
        super().__init__()
        self.proj = nn.Linear(hidden, len(keep), bias=False)
        self.register_buffer("keep", keep)
        self.vocab = vocab

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h.new_full((*h.shape[:-1], self.vocab), float("-inf"))
        return out.index_copy(-1, self.keep, self.proj(h))


QLinear = torch.ao.nn.quantized.dynamic.Linear


def _count(model: nn.Module, cls: type) -> int:
    return sum(type(m) is cls for m in model.modules())


@pytest.mark.parametrize("tied", [True, False])
def test_int8_quantises_every_linear_and_keeps_the_original(tied):
    model = _llama(tie_word_embeddings=tied)
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        q = P.prepare_for_inference(model, "int8")
        got = q(ids).logits
    n_linear = _count(model, nn.Linear)
    assert n_linear == 2 * 7 + 1 and _count(q, QLinear) == n_linear and _count(q, nn.Linear) == 0
    assert P.is_quantized(q) and isinstance(q.lm_head, QLinear)
    assert q.model.embed_tokens.weight.dtype == torch.float32  # embeddings stay fp32 (tied or not)
    assert _count(model, nn.Linear) == n_linear and not P.is_quantized(model), "the fp32 model must be untouched"
    assert got.shape == ref.shape
    # int8 logits approximate fp32: strongly correlated, not equal.
    assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.95
    assert not torch.equal(got, ref)


def test_int8_quantises_a_custom_head_module():
    model = _llama(tie_word_embeddings=False)
    keep = torch.arange(0, 96, 2)
    model.lm_head = _TrimmedHead(64, keep, 96)
    q = P.prepare_for_inference(model, "int8")
    assert isinstance(q.lm_head.proj, QLinear)
    with torch.no_grad():
        logits = q(torch.tensor([[1, 5, 9]])).logits
    assert (
        logits.shape == (1, 3, 96)
        and torch.isinf(logits[..., 1::2]).all()
        and torch.isfinite(logits[..., ::2]).all()
    )


def test_speculative_decoding_runs_at_int8_against_the_int8_target():
    target = P.prepare_for_inference(_llama(0), "int8")
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    base = autoregressive_generate(target, ids, max_new_tokens=30)
    res = speculative_generate(target, target, ids, gamma=3, max_new_tokens=30)  # self-draft
    st = res.stats
    assert len(base.tokens) == len(res.tokens) == 30 and st.new_tokens == st.accepted + st.steps
    # int8 scores a k-token chunk with one activation scale, so chunked and one-by-one logits differ slightly:
    # a self-draft no longer accepts everything; it still accepts most.
    assert st.acceptance_rate > 0.5


def test_bf16_and_fp32():
    model = _llama(0)
    b = P.prepare_for_inference(model, "bf16")
    assert {p.dtype for p in b.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert P.prepare_for_inference(model, "fp32") is model  # nothing to do
    assert {p.dtype for p in P.prepare_for_inference(b, "fp32").parameters()} == {torch.float32}


def test_bf16_warns_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="AVX512-BF16/AMX"):
        P.prepare_for_inference(_llama(0), "bf16")


def test_errors():
    with pytest.raises(P.PrecisionError, match="not one of"):
        P.prepare_for_inference(_llama(0), "int4")
    with pytest.raises(P.PrecisionError, match="CPU only"):
        P.prepare_for_inference(_llama(0).to("meta"), "int8")
    with pytest.raises(P.PrecisionError, match="already int8"):
        P.prepare_for_inference(P.prepare_for_inference(_llama(0), "int8"), "int8")
    assert P.resolve_precision("", "bfloat16") == "bf16" and P.resolve_precision("int8", "float32") == "int8"
    with pytest.raises(P.PrecisionError, match="model dtype"):
        P.resolve_precision("", "int8")
