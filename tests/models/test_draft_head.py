"""Vocabulary-trimmed draft head: -inf outside the kept set, save/load (local classes and remote code),
lossless speculative decoding, transformers assisted generation, training losses, kept-set counting, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from fastdraft_ray.config import DraftConfig
from fastdraft_ray.models.draft import build_draft, count_params, derive_draft_config, load_draft, new_draft
from fastdraft_ray.models.trimmed_head import IGNORE_INDEX, kept_logits, trimmed_config, trimmed_head
from fastdraft_ray.models.vocab import (
    coverage,
    kept_token_ids,
    special_token_ids,
    token_counts,
    trim_draft,
    untrim_draft,
)
from fastdraft_ray.specdec.decode import autoregressive_generate, speculative_generate
from fastdraft_ray.train.losses import draft_logits, kd_loss, lm_loss
from tests.conftest import TINY_VOCAB, tiny_config
from tests.specdec.test_decode import assert_greedy_equal

KEPT = torch.tensor([0, 1, 2, *range(3, TINY_VOCAB, 3)])  # specials + every third id
K = len(KEPT)  # 34
SMALL = DraftConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64, head_vocab=K)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _target(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama", **overrides)).eval()


def _trimmed_draft(target_cfg=None, seed: int = 1):
    return new_draft(target_cfg or tiny_config("llama"), SMALL, seed=seed, kept_ids=KEPT).eval()


def _kept_copy(target, kept=KEPT):
    """A trimmed draft that IS the target on the kept set (same body, head rows = the target's kept rows)."""
    return trim_draft(target, kept)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3"])
def test_trimmed_logits_are_minus_inf_outside_the_kept_set(family):
    draft = new_draft(tiny_config(family), SMALL, seed=3, kept_ids=KEPT).eval()
    assert draft.config.model_type == f"fastdraft_trimmed_{family}" and not draft.config.tie_word_embeddings
    assert draft.get_input_embeddings().weight.shape[0] == TINY_VOCAB  # the input embedding keeps every token
    ids = torch.randint(0, TINY_VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = draft(input_ids=ids).logits
    assert logits.shape == (3, 11, TINY_VOCAB)
    outside = torch.ones(TINY_VOCAB, dtype=torch.bool)
    outside[KEPT] = False
    assert torch.isneginf(logits[..., outside]).all() and torch.isfinite(logits[..., KEPT]).all()
    assert torch.isin(logits.argmax(-1), KEPT).all()
    with torch.no_grad(), kept_logits(draft):
        kept = draft(input_ids=ids).logits
    assert torch.equal(kept, logits[..., KEPT])  # K-wide training logits = the kept columns
    assert trimmed_head(draft).full_vocab  # the context manager restores full-vocabulary output


def test_trimmed_head_shrinks_the_parameter_count():
    full = count_params(derive_draft_config(tiny_config(), DraftConfig(**{**SMALL.__dict__, "head_vocab": 0})))
    trimmed = count_params(derive_draft_config(tiny_config(), SMALL))
    untied_full = 2 * TINY_VOCAB * 32  # tiny llama is untied: embedding + head
    assert full.embedding == untied_full and trimmed.embedding == TINY_VOCAB * 32 + K * 32
    assert trimmed.non_embedding == full.non_embedding


def test_save_load_round_trip_with_load_draft_and_remote_code(tmp_path):
    draft = _trimmed_draft()
    draft.save_pretrained(tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "trimmed_head.TrimmedLlamaForCausalLM"
    assert (tmp_path / "d" / "trimmed_head.py").exists()
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 4]])
    with torch.no_grad():
        expected = draft(input_ids=ids).logits
        local = load_draft(tmp_path / "d")
        assert torch.equal(local(input_ids=ids).logits, expected)
    assert torch.equal(local.lm_head.kept_ids, KEPT)
    # A fresh interpreter that never imports fastdraft_ray: transformers' custom-code path (copied trimmed_head.py).
    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.set_num_threads(1)  # the same reduction order as the parent process
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "d")!r}, trust_remote_code=True).eval()
        assert "fastdraft_ray" not in sys.modules, "remote-code load must not need the package"
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        with torch.no_grad():
            torch.save(m(input_ids=torch.tensor({ids.tolist()})).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_stock_export_keeps_the_kept_logits_loads_without_remote_code_and_stays_lossless(tmp_path):
    target = _target()
    trimmed = _kept_copy(target)
    stock = untrim_draft(trimmed)
    assert type(stock).__name__ == "LlamaForCausalLM" and "head_vocab" not in stock.config.to_dict()
    ids = torch.tensor([[1, 7, 19, 42, 5]])
    with torch.no_grad():
        kept_logits_trimmed = trimmed(input_ids=ids).logits[..., KEPT]
        logits = stock(input_ids=ids).logits
    assert torch.allclose(logits[..., KEPT], kept_logits_trimmed, atol=1e-6)
    outside = torch.ones(TINY_VOCAB, dtype=torch.bool)
    outside[KEPT] = False
    assert torch.equal(logits[..., outside], torch.zeros_like(logits[..., outside]))
    stock.save_pretrained(tmp_path / "stock")
    assert not (tmp_path / "stock" / "trimmed_head.py").exists()
    assert "auto_map" not in json.loads((tmp_path / "stock" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()  # no trust_remote_code
    reference = autoregressive_generate(target, ids, max_new_tokens=30).tokens
    result = speculative_generate(target, reloaded, ids, gamma=3, max_new_tokens=30)
    assert_greedy_equal(target, ids, reference, result.tokens, "stock export")
    with pytest.raises(ValueError, match="not trimmed"):
        untrim_draft(stock)


def test_speculative_decoding_with_a_trimmed_draft_is_the_targets_greedy_output():
    target = _target()
    draft = _kept_copy(target)
    ids = torch.tensor([[1, 7, 19, 42]])
    reference = autoregressive_generate(target, ids, max_new_tokens=40).tokens
    result = speculative_generate(target, draft, ids, gamma=3, max_new_tokens=40)
    assert_greedy_equal(target, ids, reference, result.tokens, "trimmed draft")
    outside = [t for t in reference if t not in set(KEPT.tolist())]
    assert outside, "the reference should contain tokens the draft cannot propose (test precondition)"
    assert 0 < result.stats.acceptance_rate < 1  # kept-set tokens accepted, the others corrected by the target


def test_speculative_sampling_with_a_trimmed_draft_follows_the_target_distribution():
    """q = 0 outside the kept set, so there the residual max(0, p - q) is p itself: the emitted tokens still follow
    the target's distribution exactly (chi-square on the first tokens' joint and later marginals), the broken
    resample-from-p rule is caught on the same pair, and a trimmed draft speculating for itself accepts everything
    (no NaN from its -inf logits)."""
    from tests.specdec.test_sampling_distribution import (
        ALPHA,
        exact_joint,
        pvalues,
        resample_from_p,
        samples,
        tiny,
    )

    target, kept = tiny(0), torch.tensor([0, 2, 3, 5, 6])
    draft = trim_draft(tiny(1), kept)
    joint = exact_joint(target, 1.0, 1.0)
    correct = pvalues(samples(target, draft, 800), joint)
    assert min(correct.values()) > ALPHA, correct
    broken = pvalues(samples(target, draft, 500, verify=resample_from_p), joint)
    assert min(broken.values()) < ALPHA, broken
    ids, gen = torch.tensor([[1, 5, 3, 7]]), torch.Generator().manual_seed(0)
    same = speculative_generate(draft, draft, ids, gamma=4, max_new_tokens=30, temperature=0.8, generator=gen)
    assert same.stats.acceptance_rate == 1.0 and set(same.tokens) <= set(kept.tolist())


def test_transformers_assisted_generation_with_trimmed_draft_matches_greedy():
    target = _target()
    draft = _kept_copy(target)
    ids = torch.tensor([[1, 7, 19, 42]])
    kwargs = dict(max_new_tokens=24, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
    plain = target.generate(ids, do_sample=False, **kwargs)
    assisted = target.generate(ids, do_sample=False, assistant_model=draft, **kwargs)
    assert torch.equal(plain, assisted)
    torch.manual_seed(0)
    sampled = target.generate(ids, do_sample=True, temperature=0.8, assistant_model=draft, **kwargs)
    assert sampled.shape == (1, ids.shape[1] + 24)


def test_lm_loss_scores_kept_targets_only_and_trains_only_the_draft():
    draft = _trimmed_draft().train()
    rows = torch.randint(0, TINY_VOCAB, (4, 17), generator=torch.Generator().manual_seed(1))
    loss = lm_loss(draft, rows)
    assert torch.isfinite(loss)
    # Reference: cross-entropy of the full-vocabulary (-inf) logits, over positions whose target is kept.
    logits = draft(input_ids=rows[:, :-1]).logits
    targets = rows[:, 1:]
    inside = torch.isin(targets, KEPT)
    assert 0 < inside.sum() < inside.numel()  # both kinds of targets occur
    reference = F.cross_entropy(logits[inside], targets[inside])
    torch.testing.assert_close(loss, reference)
    loss.backward()
    assert draft.lm_head.linear.weight.grad is not None and draft.lm_head.linear.weight.grad.abs().sum() > 0
    assert draft.get_input_embeddings().weight.grad is not None
    assert not draft.lm_head.kept_ids.requires_grad


def test_kd_losses_with_trimmed_head_restrict_topk_to_the_kept_set():
    draft = _trimmed_draft().train()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, TINY_VOCAB, (2, 9), generator=gen)
    topk_ids = torch.randint(0, TINY_VOCAB, (2, 8, 4), generator=gen)
    topk_ids[0, 0] = torch.tensor([4, 5, 7, 8])  # none kept (KEPT holds 0, 1, 2 and multiples of 3)
    topk_logprobs = torch.randn(2, 8, 4, generator=gen).log_softmax(-1).requires_grad_()
    mask = torch.ones(2, 8)
    logits, targets, mapped = draft_logits(draft, ids[:, :-1], ids[:, 1:], topk_ids)
    assert logits.shape[-1] == K and (mapped[0, 0] == IGNORE_INDEX).all()
    for kind in ("ce", "kl", "tvd", "ce_kl", "ce_tvd"):
        loss = kd_loss(logits, targets, mask, kind, topk_ids=mapped, topk_logprobs=topk_logprobs)
        assert torch.isfinite(loss), kind
    kl = kd_loss(logits, targets, mask, "kl", topk_ids=mapped, topk_logprobs=topk_logprobs)
    # Reference KL, position by position: target restricted to its kept top-k ids, renormalised.
    full = draft(input_ids=ids[:, :-1]).logits.log_softmax(-1)
    terms = []
    for b in range(2):
        for t in range(8):
            keep = torch.isin(topk_ids[b, t], KEPT)
            if keep.any():
                logp = topk_logprobs[b, t][keep].log_softmax(-1)
                terms.append((logp.exp() * (logp - full[b, t, topk_ids[b, t][keep]])).sum())
    torch.testing.assert_close(kl, torch.stack(terms).mean())
    kl.backward()
    assert topk_logprobs.grad is None  # the target side is data: gradients reach only the draft
    assert draft.lm_head.linear.weight.grad.abs().sum() > 0


def _write_shards(root, rows: list[list[int]]):
    (root / "train").mkdir(parents=True)
    pq.write_table(
        pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32()))}), root / "train/part-00000.parquet"
    )
    manifest = {"column": "input_ids", "splits": {"train": {"shards": [{"file": "train/part-00000.parquet"}]}}}
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_kept_set_is_specials_plus_most_frequent_tokens(tmp_path):
    _write_shards(tmp_path / "shards", [[5, 5, 5, 9, 9, 7], [9, 5, 11, 11, 11, 11]])
    counts = token_counts(tmp_path / "shards", TINY_VOCAB)
    assert counts[5] == 4 and counts[9] == 3 and counts[11] == 4 and counts.sum() == 12
    kept = kept_token_ids(counts, 5, required=[0, 2])
    assert kept.tolist() == [0, 2, 5, 9, 11]  # ties (5 and 11: 4 each) and fill order are deterministic
    assert coverage(counts, kept) == pytest.approx(11 / 12)
    kd = tmp_path / "kd" / "responses" / "t0.6"
    kd.mkdir(parents=True)
    pq.write_table(pa.table({"response_ids": [[3, 3, 4], [3]]}), kd / "part-00000.parquet")
    assert token_counts(tmp_path / "kd", TINY_VOCAB)[[3, 4]].tolist() == [3, 1]


def test_special_tokens_of_the_real_tokenizer_are_kept(smollm2):
    model, tokenizer = smollm2
    specials = special_token_ids(tokenizer, model.config)
    assert {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")} <= set(specials)
    kept = kept_token_ids(np.zeros(len(tokenizer), dtype=np.int64), len(specials) + 3, specials)
    assert set(specials) <= set(kept.tolist()) and len(kept) == len(specials) + 3


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="head_vocab=97 must be 0"):
        derive_draft_config(tiny_config(), DraftConfig(**{**SMALL.__dict__, "head_vocab": TINY_VOCAB + 1}))
    with pytest.raises(ValueError, match="exceeds the target's vocabulary"):
        kept_token_ids(np.ones(TINY_VOCAB), TINY_VOCAB + 1)
    with pytest.raises(ValueError, match="smaller than the 3 special tokens"):
        kept_token_ids(np.ones(TINY_VOCAB), 2, required=[0, 1, 2])
    with pytest.raises(ValueError, match="needs the kept token ids"):
        new_draft(tiny_config(), SMALL)
    with pytest.raises(ValueError, match="not 'gpt_neox'"):
        derive_draft_config(tiny_config("gpt_neox"), SMALL)
    with pytest.raises(ValueError, match="distinct token ids"):
        build_draft(trimmed_config(tiny_config(), 4)).lm_head.set_kept_ids([1, 1, 2, 3])
    with pytest.raises(ValueError, match="draft.init: 'svd' is not one of 'random', 'pca', 'layers'"):
        derive_draft_config(tiny_config(), DraftConfig(init="svd"))
