"""KD generation with the real SmolLM2-135M-Instruct target: evaluation-disjoint alpaca prompts under the chat
template, batched greedy responses, top-k scores consistent with them, and the Magpie user-turn prefix."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.real_target


def test_real_target_kd_generation(smollm2):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine 2 threads spin-wait (seen: 30x slower)
    try:
        _check_real_target(smollm2)
    finally:
        torch.set_num_threads(threads)


def _check_real_target(smollm2):
    from fastdraft_ray.data.holdout import is_reserved_for_eval
    from fastdraft_ray.distill.magpie import user_turn_prefix
    from fastdraft_ray.distill.prompts import load_prompts
    from fastdraft_ray.models.batched import generate_batch, score_topk
    from fastdraft_ray.models.prompting import pad_token_id, stop_token_ids

    model, tok = smollm2
    prompts = load_prompts({"alpaca": "embedded:alpaca"}, tok, 2, seed=0)
    assert all(not is_reserved_for_eval(p.message) for p in prompts)
    assert all(tok.decode(p.prompt_ids).endswith("<|im_start|>assistant\n") for p in prompts)
    ids = [p.prompt_ids for p in prompts]
    pad, eos = pad_token_id(tok), stop_token_ids(tok, model)
    batched = generate_batch(model, ids, temperature=0.0, max_new_tokens=8, pad=pad, eos=eos)
    assert all(1 <= len(r) <= 8 for r, _ in batched)
    scored = score_topk(model, ids, [r for r, _ in batched], 4, pad=pad)
    for (response, _), (top_ids, top_lps) in zip(batched, scored, strict=True):
        assert top_ids.shape == (len(response), 4) and (top_lps <= 0).all()
        # greedy tokens are the target's argmax, up to fp32 near-ties between batched and scoring passes
        agree = sum(int(t == k[0]) for t, k in zip(response, top_ids, strict=True))
        assert agree >= len(response) - 1
    prefix = user_turn_prefix(tok)
    assert prefix.endswith("<|im_start|>user\n") and "<|im_start|>assistant" not in prefix
