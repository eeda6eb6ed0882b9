"""The speculative decoding engine: greedy exactness, stopping, cache rollback, statistics, input checks.

Greedy tolerance (stated once, used everywhere): speculative output must equal the target's own greedy output
token for token, except that the FIRST divergence may sit at a position where the target's top-2 logits differ
by less than ``NEAR_TIE_LOGIT_GAP`` (fp32 rounding of chunked vs one-token scoring can flip such exact
near-ties). Any allowed divergence is reported as a warning; any other difference fails.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastdraft_ray.config import DecodeConfig, DraftConfig
from fastdraft_ray.models.draft import IncompatibleDraftError, build_draft, derive_draft_config
from fastdraft_ray.specdec.decode import (
    NEAR_TIE_LOGIT_GAP,
    autoregressive_generate,
    first_divergence,
    ngram_proposal,
    speculative_generate,
)
from fastdraft_ray.specdec.engine import SpecDecoder
from fastdraft_ray.specdec.policy import GammaPolicy
from tests.conftest import tiny_config

EXACT_FAMILIES = ["llama", "qwen2", "gpt_neox", "mistral", "phi3", "gemma"]


def _model(config, seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def _noisy_copy(model, scale: float, seed: int = 123):
    """A draft that agrees with ``model`` on some tokens only: its weights plus Gaussian noise."""
    copy = _model(model.config, seed)
    copy.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    for p in copy.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp(min=1e-3))
    return copy


def _hf_greedy(model, ids: torch.Tensor, n: int, eos=None) -> list[int]:
    """transformers' own greedy decoding (the reference), stopping only at ``eos`` (None: never)."""
    out = model.generate(
        ids,
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=eos,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
    )
    return out[0, ids.shape[1] :].tolist()


def assert_greedy_equal(model, ids: torch.Tensor, reference: list[int], got: list[int], label: str = "") -> None:
    """Equal, or first divergence at an fp32 near-tie of the target (reported as a warning)."""
    if got == reference:
        return
    div = first_divergence(model, ids, reference, got)
    assert div is not None, f"{label}: lengths differ without a divergence: {len(reference)} vs {len(got)}"
    pos, gap = div
    assert gap < NEAR_TIE_LOGIT_GAP, f"{label}: differs at token {pos} where the top-2 logit gap is {gap:.3g}"
    warnings.warn(
        f"{label}: greedy outputs diverge at token {pos} on a near-tie (top-2 gap {gap:.2e})", stacklevel=2
    )


@pytest.fixture(params=EXACT_FAMILIES)
def family(request):
    return request.param


def test_greedy_exact_random_and_self_draft(family):
    cfg = tiny_config(family)
    target, draft = _model(cfg, 0), _model(cfg, 1)
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(7))
    n = 40
    reference = _hf_greedy(target, ids, n)
    ar = autoregressive_generate(target, ids, max_new_tokens=n)
    assert_greedy_equal(target, ids, reference, ar.tokens, f"{family} autoregressive")
    for d, name in ((draft, "random draft"), (_noisy_copy(target, 0.3), "noisy draft"), (target, "self draft")):
        res = speculative_generate(target, d, ids, gamma=3, max_new_tokens=n)
        assert_greedy_equal(target, ids, reference, res.tokens, f"{family} {name}")
        st = res.stats
        assert st.new_tokens == len(res.tokens) == n
        assert st.new_tokens == st.accepted + st.steps  # no EOS: every step emits accepted + 1
        assert st.target_forwards == st.steps + 1  # + prefill
        assert st.draft_forwards == st.proposed  # lazy draft prefill: the prompt opens its first forward
        assert sum(st.accepted_per_step) == st.accepted and len(st.accepted_per_step) == st.steps
    # Draft == target: every proposal accepted, tau = gamma + 1 exactly (40 = 10 steps of 4).
    self_stats = speculative_generate(target, target, ids, gamma=3, max_new_tokens=n).stats
    assert self_stats.acceptance_rate == 1.0 and self_stats.block_efficiency == 4.0


def test_random_draft_acceptance_is_small_with_large_vocab():
    cfg = tiny_config("llama", vocab_size=4096)
    target, draft = _model(cfg, 0), _model(cfg, 1)
    ids = torch.randint(3, 4096, (1, 8), generator=torch.Generator().manual_seed(0))
    res = speculative_generate(target, draft, ids, gamma=3, max_new_tokens=48)
    assert res.stats.acceptance_rate < 0.05
    assert res.tokens == _hf_greedy(target, ids, 48)


@pytest.mark.parametrize("gamma", [1, 2, 4, 7])
def test_cache_rollback_any_gamma_and_acceptance(gamma):
    """Every gamma, with partial acceptance (noisy draft), gives the same greedy tokens as gamma=1 and AR."""
    cfg = tiny_config("llama")
    target = _model(cfg, 0)
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    base = speculative_generate(target, _noisy_copy(target, 0.5), ids, gamma=1, max_new_tokens=50)
    res = speculative_generate(target, _noisy_copy(target, 0.5), ids, gamma=gamma, max_new_tokens=50)
    assert res.tokens == base.tokens == autoregressive_generate(target, ids, max_new_tokens=50).tokens
    counts = torch.bincount(torch.tensor(res.stats.accepted_per_step), minlength=gamma + 1)
    assert counts[0] > 0 and (counts[1:].sum() > 0), counts  # both rejections and acceptances happened


@torch.no_grad()
def _uncached_reference(target, draft, ids: torch.Tensor, gamma: int, n: int) -> tuple[list[int], list[int]]:
    """Greedy speculative decoding recomputing both models from scratch every forward: obviously correct, slow.

    Returns (tokens, accepted_per_step). Draft-cache bugs would not change the engine's tokens, only its
    proposals, so comparing accepted_per_step with this reference is what checks the draft's rollback.
    """
    seq, out, per_step = ids[0].tolist(), [], []
    while len(out) < n:
        g = min(gamma, n - len(out) - 1)
        drafted = []
        for _ in range(g):
            drafted.append(int(draft(input_ids=torch.tensor([seq + drafted])).logits[0, -1].argmax()))
        choice = target(input_ids=torch.tensor([seq + drafted])).logits[0, -(g + 1) :].argmax(-1).tolist()
        k = next((i for i in range(g) if drafted[i] != choice[i]), g)
        new = drafted[:k] + [choice[k]]
        seq, out = seq + new, out + new
        per_step.append(k)
    return out, per_step


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_matches_uncached_reference_step_by_step(gamma):
    cfg = tiny_config("llama")
    target = _model(cfg, 0)
    draft = _noisy_copy(target, 0.5)
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(11))
    tokens, per_step = _uncached_reference(target, draft, ids, gamma, 40)
    res = speculative_generate(target, draft, ids, gamma=gamma, max_new_tokens=40)
    assert res.tokens == tokens
    assert res.stats.accepted_per_step == per_step
    assert 0 < res.stats.acceptance_rate < 1


def test_sliding_window_cache_rolls_back():
    """A sliding window shorter than the text: cropping must keep the window's states intact."""
    cfg = tiny_config("mistral", sliding_window=8)
    target = _model(cfg, 0)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(5))
    reference = _hf_greedy(target, ids, 30)
    for d in (_noisy_copy(target, 0.3), target):
        assert speculative_generate(target, d, ids, gamma=3, max_new_tokens=30).tokens == reference


def test_single_token_prompt():
    cfg = tiny_config("qwen2")
    target = _model(cfg, 0)
    ids = torch.tensor([[5]])
    res = speculative_generate(target, _noisy_copy(target, 0.3), ids, gamma=3, max_new_tokens=20)
    assert res.tokens == _hf_greedy(target, ids, 20)
    assert res.stats.target_forwards == res.stats.steps  # nothing to prefill


@pytest.mark.parametrize("max_new", [1, 2, 3, 4, 5, 11])
def test_max_new_tokens_is_exact(max_new):
    cfg = tiny_config("llama")
    target = _model(cfg, 0)
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    full = autoregressive_generate(target, ids, max_new_tokens=12).tokens
    for d in (target, _noisy_copy(target, 0.3)):
        res = speculative_generate(target, d, ids, gamma=3, max_new_tokens=max_new)
        assert res.tokens == full[:max_new]
        # Each step proposes at most (remaining - 1) tokens, so no accepted token is ever thrown away.
        assert res.stats.new_tokens == res.stats.accepted + res.stats.steps
    assert autoregressive_generate(target, ids, max_new_tokens=max_new).tokens == full[:max_new]


def test_eos_stops_inclusive_single_and_list():
    cfg = tiny_config("llama")
    target = _model(cfg, 0)
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    full = autoregressive_generate(target, ids, max_new_tokens=30).tokens
    k = next(i for i in range(6, 30) if full[i] not in full[:i])  # a token first appearing at position k >= 6
    eos = full[k]
    for d in (target, _noisy_copy(target, 0.3)):  # EOS accepted inside a draft block, or as the target's token
        assert speculative_generate(target, d, ids, max_new_tokens=30, eos_token_id=eos).tokens == full[: k + 1]
        res = speculative_generate(target, d, ids, max_new_tokens=30, eos_token_id=[95 if eos != 95 else 94, eos])
        assert res.tokens == full[: k + 1] and res.stats.new_tokens == k + 1
    assert autoregressive_generate(target, ids, max_new_tokens=30, eos_token_id=[eos]).tokens == full[: k + 1]
    assert _hf_greedy(target, ids, 30, eos=eos) == full[: k + 1]  # same convention as transformers


def test_draft_tokens_accepted_after_a_stop_token_do_not_count():
    """The target as its own draft accepts all 4 proposals of the first step; a stop token at proposal k + 1 < 4
    cuts the block there, and only the k + 1 emitted tokens count as accepted (not all 4)."""
    target = _model(tiny_config("llama"), 0)
    for seed in range(20):
        ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(seed))
        full = autoregressive_generate(target, ids, max_new_tokens=5).tokens
        k = next((i for i in (1, 2) if full[i] not in full[:i]), None)
        if k is not None:
            break
    res = speculative_generate(target, target, ids, gamma=4, max_new_tokens=30, eos_token_id=full[k])
    assert res.tokens == full[: k + 1] and res.stats.steps == 1 and res.stats.proposed == 4
    assert res.stats.accepted == k + 1 and res.stats.accepted_per_step == [k + 1]


@pytest.mark.parametrize("speculative", [True, False], ids=["speculative", "target_only"])
def test_a_long_prompt_is_prefilled_in_chunks_with_a_step_between_them(speculative):
    """22 prompt tokens to prefill in chunks of 5: 4 empty steps per model (the target, then the draft) before
    the first token, then the same tokens as one-forward prefill."""
    target = _model(tiny_config("llama"), 0)
    decoder = SpecDecoder(target, _noisy_copy(target, 0.3) if speculative else None, DecodeConfig(gamma=3))
    ids = torch.randint(3, 96, (1, 23), generator=torch.Generator().manual_seed(2))
    whole = decoder.generate(ids, max_new_tokens=20, temperature=0.0).tokens
    steps = list(decoder.stream(ids, max_new_tokens=20, temperature=0.0, prefill_chunk=5))
    empty = next(i for i, step in enumerate(steps) if step.tokens)
    assert empty == (8 if speculative else 4) and not any(s.finished for s in steps[:empty])
    assert_greedy_equal(target, ids, whole, [t for step in steps for t in step.tokens], "chunked prefill")


@pytest.mark.parametrize("proposer", ["ngram", "draft+ngram"])
def test_ngram_proposals_keep_greedy_output_exact(proposer):
    """A repetitive prompt makes n-gram proposals frequent (some accepted, some not); the output stays the
    target's own greedy output, and the draft's cache catches up on tokens it never proposed."""
    cfg = tiny_config("llama")
    target = _model(cfg, 0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])
    reference = autoregressive_generate(target, ids, max_new_tokens=40).tokens
    draft = _noisy_copy(target, 0.5) if proposer == "draft+ngram" else None
    res = speculative_generate(target, draft, ids, gamma=2, max_new_tokens=40, proposer=proposer)
    assert res.tokens == reference
    assert res.stats.ngram_steps > 0 and res.stats.accepted > 0
    if proposer == "draft+ngram":
        assert res.stats.steps > res.stats.ngram_steps  # the draft drafted when no n-gram matched
    assert ngram_proposal([1, 2, 3, 9, 1, 2], 3, 2) == [3, 9]
    assert ngram_proposal([1, 2, 3], 3, 2) == [] and ngram_proposal([4, 4], 3, 0) == []


def test_sampling_is_reproducible_and_seed_dependent():
    cfg = tiny_config("llama")
    target, draft = _model(cfg, 0), _model(cfg, 1)
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(1))

    def run(seed, **kw):
        return speculative_generate(
            target,
            draft,
            ids,
            gamma=3,
            max_new_tokens=30,
            temperature=0.8,
            generator=torch.Generator().manual_seed(seed),
            **kw,
        ).tokens

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(0, top_p=0.9) == run(0, top_p=0.9)
    ar = autoregressive_generate(
        target, ids, max_new_tokens=30, temperature=0.8, generator=torch.Generator().manual_seed(0)
    ).tokens
    assert len(ar) == 30


def test_input_validation():
    cfg = tiny_config("llama")
    target = _model(cfg, 0)
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="shape"):
        speculative_generate(target, target, torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match="batch 1"):
        speculative_generate(target, target, ids.repeat(2, 1))
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(target, target, ids, gamma=0)
    with pytest.raises(TypeError, match="gamma or policy, not both"):
        speculative_generate(target, target, ids, gamma=2, policy=GammaPolicy(3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        autoregressive_generate(target, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, target, ids, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        speculative_generate(target, target, ids, temperature=1.0, top_p=0.0)
    other = _model(tiny_config("llama", vocab_size=128), 1)
    with pytest.raises(IncompatibleDraftError):
        speculative_generate(target, other, ids)


# ---------------------------------------------------------------------------------------------- real target
REAL_PROMPTS = [
    "Give three tips for staying healthy.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about autumn rain.",
    "What is the capital of France, and why is it famous?",
    "Write a Python function that reverses a string.",
    "Summarise the plot of Romeo and Juliet.",
]
TINY_DRAFT = DraftConfig(num_layers=2, hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=256)


def _chat_ids(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    return ids


def _check_real(smollm2, prompts: list[str], n: int, drafts: dict) -> None:
    target, tok = smollm2
    eos = tok.eos_token_id
    for text in prompts:
        ids = _chat_ids(tok, text)
        reference = _hf_greedy(target, ids, n, eos=eos)
        assert_greedy_equal(
            target,
            ids,
            reference,
            autoregressive_generate(target, ids, max_new_tokens=n, eos_token_id=eos).tokens,
            "AR",
        )
        for name, draft in drafts.items():  # through the engine's stream(), as evaluation and serving decode
            decoder = SpecDecoder(target, draft, DecodeConfig(gamma=3), stop_ids=[eos])
            steps = list(decoder.stream(ids, max_new_tokens=n, temperature=0.0))
            tokens = [t for step in steps for t in step.tokens]
            assert_greedy_equal(target, ids, reference, tokens, f"{name} on {text!r}")
            assert steps[-1].finished and not any(step.finished for step in steps[:-1])
            if draft is target:
                assert steps[-1].stats.acceptance_rate == 1.0


@pytest.mark.real_target
def test_real_target_greedy_exact_small(smollm2):
    """Always-on: 2 chat prompts x 16 tokens; a random derived draft (all-reject path) and the target as its own
    draft (all-accept path: alpha = 1, tau = gamma + 1 on the real model)."""
    target, _ = smollm2
    drafts = {"random draft": build_draft(derive_draft_config(target.config, TINY_DRAFT), seed=0), "self": target}
    _check_real(smollm2, REAL_PROMPTS[:2], 16, drafts)


@pytest.mark.real_target
@pytest.mark.slow
def test_real_target_greedy_exact_full(smollm2):
    """6 chat prompts x 64 tokens against model.generate(do_sample=False) (several minutes on 2 CPU cores)."""
    target, _ = smollm2
    drafts = {"random draft": build_draft(derive_draft_config(target.config, TINY_DRAFT), seed=0), "self": target}
    _check_real(smollm2, REAL_PROMPTS, 64, drafts)
