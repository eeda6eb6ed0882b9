"""Batched generation and teacher-forced scoring with an HF causal LM (the KD data kernels).

``generate_batch``: one KV-cached ``generate`` call over LEFT-padded prompts, sampling from the model's full
distribution (``top_k=0``, ``top_p`` as given, no repetition penalty). Padding does not change a row's
distribution; greedy rows can differ from an unpadded greedy run only where fp32 rounding flips a near-tie.
``score_topk``: the model's top-k log-probs at every response position, teacher-forced.
"""

from __future__ import annotations

import numpy as np
import torch


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def generate_batch(
    model,
    prompts: list[list[int]],
    *,
    temperature: float,
    max_new_tokens: int,
    pad: int,
    eos: list[int],
    top_p: float = 1.0,
) -> list[tuple[list[int], bool]]:
    """Responses to left-padded ``prompts`` in one KV-cached ``generate`` call: ``[(ids incl. EOS, finished)]``."""
    from transformers import GenerationConfig

    sample = temperature > 0
    sampling = {"do_sample": False}
    if sample:  # HF's default top_k=50 would truncate the target's distribution: top_k=0 turns it off
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p}
    gen = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, **sampling)
    ids, mask = left_pad(prompts, pad)
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
    out = out[:, ids.shape[1] :].cpu().tolist()
    stops, results = set(eos), []
    for row in out:
        end = next((j for j, t in enumerate(row) if t in stops), None)
        results.append((row[: end + 1], True) if end is not None else (row, False))
    return results


@torch.no_grad()
def score_topk(
    model, prompts: list[list[int]], responses: list[list[int]], k: int, *, pad: int, chunk: int = 4
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``model``'s top-``k`` next-token ids and log-probs (temperature 1) at every response position:
    ``[(ids int32 [len(r), k], logprobs float32 [len(r), k])]``. Teacher-forced, left-padded, in ``chunk`` rows."""
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(prompts), chunk):
        ps, rs = prompts[start : start + chunk], responses[start : start + chunk]
        seqs = [list(p) + list(r) for p, r in zip(ps, rs, strict=True)]
        ids, mask = left_pad(seqs, pad)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        r_max = max(len(r) for r in rs)
        kwargs = dict(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device)
        )
        try:
            logits = model(**kwargs, logits_to_keep=r_max + 1).logits
        except TypeError:  # a model class without logits_to_keep
            logits = model(**kwargs).logits[:, -(r_max + 1) :]
        for i, r in enumerate(rs):
            if not r:
                results.append((np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)))
                continue
            lp = torch.log_softmax(logits[i, r_max - len(r) : r_max].float(), dim=-1)
            top = lp.topk(k, dim=-1)
            results.append(
                (top.indices.cpu().numpy().astype(np.int32), top.values.cpu().numpy().astype(np.float32))
            )
    return results
