"""Batched generation and teacher-forced scoring with an HF causal LM (the KD data kernels).

``generate_batch``: one KV-cached ``generate`` call over LEFT-padded prompts, sampling from the model's full
distribution (``top_k=0``, ``top_p`` as given, no repetition penalty). Padding does not change a row's
distribution; greedy rows can differ from an unpadded greedy run only where fp32 rounding flips a near-tie.
``sample_batch``: the same rows from a lean KV-cached loop (one forward per token for the whole batch), for
small drafts whose step ``generate`` buries under its per-step overhead (on-policy KD data).
``score_topk``: the model's top-k log-probs at every response position, teacher-forced.
"""

from __future__ import annotations

import inspect

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


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else a sample of softmax(logits / T) within the top-p nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is already full
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1).squeeze(-1)


@torch.inference_mode()
def sample_batch(
    model,
    prompts: list[list[int]],
    *,
    temperature: float,
    max_new_tokens: int,
    pad: int,
    eos: list[int],
    top_p: float = 1.0,
) -> list[tuple[list[int], bool]]:
    """``generate_batch``'s rows (same distribution: full vocabulary, ``top_p``, no penalties) from a lean loop.

    Written by hand because ``generate``'s per-step bookkeeping costs more than a 16M draft's forward: one
    forward per new token for the whole left-padded batch, the KV cache kept, finished rows padded.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad)
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, **keep)
    logits = logits.logits[:, -1]
    position = position[:, -1:]
    stops = torch.tensor(sorted(set(eos)), dtype=torch.long, device=device)
    rows: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tokens = _next_tokens(logits, temperature, top_p)
        for i in (~done).nonzero().flatten().tolist():
            rows[i].append(int(tokens[i]))
        done |= torch.isin(tokens, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        tokens = tokens.masked_fill(done, pad)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        position = position + 1
        logits = model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=position, past_key_values=cache, **keep
        ).logits[:, -1]
    stop_set = set(eos)
    return [(row, bool(row) and row[-1] in stop_set) for row in rows]


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
