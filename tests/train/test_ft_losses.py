"""FT (distillation) losses and the fixed-width FT row layout: exact values, masking, gradient flow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdraft_ray.train.kd_rows import RowLayout
from fastdraft_ray.train.losses import dense_kd_terms, kd_loss, make_loss_fn, masked_mean, sparse_kd_terms

V = 12


def _full_topk(target_logits: torch.Tensor, k: int):
    lp = F.log_softmax(target_logits, -1)
    top = lp.topk(k, -1)
    return top.indices, top.values


def test_kl_and_tvd_are_zero_for_identical_distributions():
    logits = torch.randn(2, 5, V)
    kl, tvd = dense_kd_terms(logits, logits.clone())
    assert kl.abs().max() < 1e-5 and tvd.abs().max() < 1e-6
    ids, lps = _full_topk(logits, V)
    kl, tvd = sparse_kd_terms(logits, ids, lps)
    assert kl.abs().max() < 1e-5 and tvd.abs().max() < 1e-6
    # renormalised top-k: a draft that puts exactly the renormalised top-k mass on K matches it
    ids, lps = _full_topk(logits, 4)
    draft = torch.full_like(logits, -1e9).scatter(-1, ids, lps)
    kl, tvd = sparse_kd_terms(draft, ids, lps)
    assert kl.abs().max() < 1e-5 and tvd.abs().max() < 1e-6
    # ... and the full (not renormalised) target does not: its mass outside K counts in the TVD
    kl, tvd = sparse_kd_terms(logits, ids, lps)
    assert (tvd > 1e-3).all() and (kl > 1e-4).all()


def test_sparse_topk_with_k_equal_vocab_equals_dense():
    torch.manual_seed(0)
    draft, target = torch.randn(3, 7, V), torch.randn(3, 7, V) * 2
    ids, lps = _full_topk(target, V)
    ids = ids[..., torch.randperm(V)]  # any order of the k entries
    lps = F.log_softmax(target, -1).gather(-1, ids)
    for sparse, dense in zip(sparse_kd_terms(draft, ids, lps), dense_kd_terms(draft, target), strict=True):
        torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    # shifting the stored log-probs by a constant changes nothing (renormalised)
    torch.testing.assert_close(sparse_kd_terms(draft, ids, lps + 3.0)[0], dense_kd_terms(draft, target)[0])


@pytest.mark.parametrize("kind", ["ce", "kl", "tvd", "ce_kl", "ce_tvd"])
def test_gradients_flow_only_into_the_draft_and_masked_positions_contribute_nothing(kind):
    torch.manual_seed(1)
    draft = torch.randn(2, 6, V, requires_grad=True)
    target = torch.randn(2, 6, V, requires_grad=True)
    ids, lps = _full_topk(target, 5)
    targets = torch.randint(0, V, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float)
    loss = kd_loss(draft, targets, mask, kind, topk_ids=ids, topk_logprobs=lps)
    loss.backward()
    assert target.grad is None  # the target side is data
    assert draft.grad[mask.bool()].abs().sum() > 0
    assert draft.grad[~mask.bool()].abs().max() == 0  # prompt/padding positions get no gradient
    # changing the draft, the targets or the top-k at masked positions leaves the loss unchanged
    noisy = draft.detach().clone()
    noisy[~mask.bool()] += 100 * torch.randn_like(noisy[~mask.bool()])
    other = torch.where(mask.bool(), targets, (targets + 1) % V)
    lps2 = torch.where(mask.bool()[..., None], lps.detach(), torch.zeros_like(lps))
    again = kd_loss(noisy, other, mask, kind, topk_ids=ids, topk_logprobs=lps2)
    torch.testing.assert_close(again, loss.detach())


def test_loss_values_and_mixtures():
    torch.manual_seed(2)
    draft, target = torch.randn(2, 4, V), torch.randn(2, 4, V)
    ids, lps = _full_topk(target, 3)
    targets = torch.randint(0, V, (2, 4))
    mask = torch.ones(2, 4)
    hard = torch.tensor([1.0, 0.0])  # row 1 is on-policy: no CE on its tokens
    ce_ref = F.cross_entropy(draft[0], targets[0])
    kl, tvd = sparse_kd_terms(draft, ids, lps)
    got = {
        k: kd_loss(draft, targets, mask, k, hard=hard, topk_ids=ids, topk_logprobs=lps, alpha=0.3)
        for k in ("ce", "kl", "tvd", "ce_kl", "ce_tvd")
    }
    torch.testing.assert_close(got["ce"], ce_ref)
    torch.testing.assert_close(got["kl"], kl.mean())
    torch.testing.assert_close(got["tvd"], tvd.mean())
    torch.testing.assert_close(got["ce_kl"], 0.3 * ce_ref + 0.7 * kl.mean())
    torch.testing.assert_close(got["ce_tvd"], 0.3 * ce_ref + 0.7 * tvd.mean())
    assert masked_mean(torch.ones(3), torch.zeros(3)) == 0
    with pytest.raises(ValueError, match="top-k"):
        kd_loss(draft, targets, mask, "kl")
    with pytest.raises(ValueError, match="kd_loss"):
        kd_loss(draft, targets, mask, "mse")


def test_row_layout_round_trip_and_alignment():
    layout = RowLayout(seq_len=8, topk=2)
    tid = np.array([[5, 6], [7, 8], [9, 10]], np.int32)
    tlp = np.array([[-0.1, -2.5], [-0.3, -1.25], [-1e-7, -30.0]], np.float32)
    row = layout.encode([1, 3, 4], [20, 21, 2], pad_id=0, topk_ids=tid, topk_logprobs=tlp)
    assert row.shape == (layout.width,) and row.dtype == np.int32
    parts = layout.decode(torch.from_numpy(np.stack([row, row])))
    assert parts["ids"][0].tolist() == [1, 3, 4, 20, 21, 2, 0, 0, 0]
    # target position t predicts ids[t + 1]: the response tokens are ids[3:6] -> positions 2, 3, 4
    assert parts["mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert parts["hard"].tolist() == [1.0, 1.0]
    assert parts["topk_ids"][0, 2:5].tolist() == tid.tolist()
    assert parts["topk_logprobs"][0, 2:5].numpy().tolist() == tlp.tolist()  # bit-exact
    # responses are truncated to fit; an example with no room for a response is dropped
    long = layout.encode(
        [1] * 6,
        list(range(10, 20)),
        pad_id=0,
        topk_ids=np.zeros((10, 2), np.int32),
        topk_logprobs=np.zeros((10, 2), np.float32),
    )
    assert layout.decode(torch.from_numpy(long[None]))["mask"][0].tolist() == [0] * 5 + [1] * 3
    assert RowLayout(4).encode([1] * 5, [7], pad_id=0) is None
    with pytest.raises(ValueError, match="top-k"):
        RowLayout(4).encode([1], [7], pad_id=0, hard=False)
    with pytest.raises(ValueError, match="top-k"):
        make_loss_fn({"seq_len": 8, "topk": 0}, "kl")


def test_ft_loss_on_a_model_ignores_the_prompt_tokens_as_targets():
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama")).eval()
    layout = RowLayout(seq_len=10)
    loss_fn = make_loss_fn(layout.to_dict(), "ce")
    row = layout.encode([1, 5, 6, 7], [30, 31, 2], pad_id=0)
    with torch.no_grad():
        got = loss_fn(model, torch.from_numpy(row[None]))
        logits = model(input_ids=torch.tensor([[1, 5, 6, 7, 30, 31]])).logits[0]
    want = F.cross_entropy(logits[3:6], torch.tensor([30, 31, 2]))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["ce", "ce_kl"])
def test_trimming_the_right_padding_leaves_the_ft_loss_unchanged(kind):
    from transformers import LlamaForCausalLM

    from fastdraft_ray.train.losses import draft_logits, ft_loss, trim_right_padding
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama")).eval()
    layout = RowLayout(seq_len=24, topk=3)
    g = np.random.default_rng(0)

    def example(n_prompt, n_resp):
        tid = g.integers(3, 96, (n_resp, 3)).astype(np.int32)
        tlp = np.log(g.dirichlet(np.ones(3), n_resp)).astype(np.float32)
        prompt, resp = g.integers(3, 96, n_prompt).tolist(), g.integers(3, 96, n_resp).tolist()
        return layout.encode(prompt, resp, pad_id=0, topk_ids=tid, topk_logprobs=tlp)

    rows = torch.from_numpy(np.stack([example(4, 3), example(6, 5), example(2, 2)]))
    parts = layout.decode(rows)
    trimmed = trim_right_padding(parts)
    # the longest example has 6 + 5 ids; its last target position is 9 (it predicts id 10)
    assert trimmed["ids"].shape == (3, 11) and trimmed["mask"].shape == (3, 10)
    assert trimmed["topk_ids"].shape == (3, 10, 3) and trimmed["hard"].shape == (3,)
    with torch.no_grad():
        got = ft_loss(model, rows, layout, kind)
        ids = parts["ids"]
        logits, targets, topk_ids = draft_logits(model, ids[:, :-1], ids[:, 1:], parts["topk_ids"])
        full = kd_loss(
            logits,
            targets,
            parts["mask"],
            kind,
            hard=parts["hard"],
            topk_ids=topk_ids,
            topk_logprobs=parts["topk_logprobs"],
        )
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
