"""The online teacher (train.teacher=online): its loss equals the stored-top-k loss when the stored k covers the
draft's kept head, on packed rows and on FT rows, for trimmed and full heads; bad settings are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from fastdraft_ray.config import DraftConfig
from fastdraft_ray.models.draft import new_draft
from fastdraft_ray.train.kd_rows import RowLayout
from fastdraft_ray.train.losses import draft_logits, kd_loss, make_loss_fn, split_row_batch, teacher_topk
from tests.conftest import TINY_VOCAB, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEPT = torch.tensor([0, 1, 2, *range(3, TINY_VOCAB, 3)])
SHAPE = DraftConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
SOFT = ("kl", "tvd", "ce_kl", "ce_tvd")


def _teacher():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


def _draft(trimmed: bool):
    kept = dict(kept_ids=KEPT) if trimmed else {}
    shape = DraftConfig(**{**SHAPE.__dict__, "head_vocab": len(KEPT) if trimmed else 0})
    return new_draft(tiny_config("llama"), shape, seed=1, **kept).train()


def _stored(teacher, inputs):
    """What KD generation stores with k = the whole vocabulary: the target's full log-softmax, sorted."""
    with torch.no_grad():
        top = F.log_softmax(teacher(input_ids=inputs).logits.float(), -1).topk(TINY_VOCAB, dim=-1)
    return top.indices, top.values


@pytest.mark.parametrize("trimmed", [True, False])
@pytest.mark.parametrize("kind", SOFT)
def test_online_loss_equals_stored_topk_covering_the_head_on_packed_rows(kind, trimmed):
    teacher, draft = _teacher(), _draft(trimmed)
    rows = torch.randint(0, TINY_VOCAB, (3, 13), generator=torch.Generator().manual_seed(2))
    online = make_loss_fn(None, kind, teacher=teacher)(draft, rows)
    inputs, targets = split_row_batch(rows)
    ids, logprobs = _stored(teacher, inputs)
    logits, targets, ids = draft_logits(draft, inputs, targets, ids)
    stored = kd_loss(logits, targets, torch.ones_like(targets), kind, topk_ids=ids, topk_logprobs=logprobs)
    torch.testing.assert_close(online, stored, rtol=1e-5, atol=1e-6)
    online.backward()  # gradients reach the draft only
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in draft.parameters())


@pytest.mark.parametrize("kind", SOFT)
def test_online_loss_equals_stored_topk_on_ft_rows(kind):
    teacher, draft = _teacher(), _draft(True)
    prompt, response = [1, 5, 6, 7], [30, 31, 33, 2]
    with torch.no_grad():
        lp = F.log_softmax(teacher(input_ids=torch.tensor([prompt + response])).logits[0].float(), -1)
    top = lp[len(prompt) - 1 : len(prompt) - 1 + len(response)].topk(TINY_VOCAB, dim=-1)
    stored_layout = RowLayout(seq_len=12, topk=TINY_VOCAB)
    row = stored_layout.encode(
        prompt, response, pad_id=0, topk_ids=top.indices.numpy().astype(np.int32), topk_logprobs=top.values.numpy()
    )
    stored = make_loss_fn(stored_layout.to_dict(), kind)(draft, torch.from_numpy(row[None]))
    plain_layout = RowLayout(seq_len=12)
    plain_row = torch.from_numpy(plain_layout.encode(prompt, response, pad_id=0)[None])
    online = make_loss_fn(plain_layout.to_dict(), kind, teacher=teacher)(draft, plain_row)
    torch.testing.assert_close(online, stored, rtol=1e-5, atol=1e-6)


def test_teacher_topk_is_renormalised_over_the_head_and_truncates():
    teacher = _teacher()
    inputs = torch.tensor([[1, 4, 9, 16]])
    ids, logprobs = teacher_topk(teacher, inputs, KEPT)
    assert ids.shape == (1, 4, len(KEPT)) and torch.equal(ids[0, 0], KEPT)
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(1, 4))
    with torch.no_grad():
        full = teacher(input_ids=inputs).logits[..., KEPT]
    torch.testing.assert_close(logprobs, F.log_softmax(full, -1), rtol=1e-5, atol=1e-5)
    ids5, lp5 = teacher_topk(teacher, inputs, KEPT, k=5)
    assert ids5.shape == (1, 4, 5) and bool(torch.isin(ids5, KEPT).all())
    torch.testing.assert_close(lp5[..., 0], logprobs.max(-1).values)


def test_online_teacher_with_plain_ce_is_refused():
    from fastdraft_ray.config import TrainConfig

    with pytest.raises(ValueError, match="teacher=online needs"):
        TrainConfig(teacher="online", kd_loss="ce")
