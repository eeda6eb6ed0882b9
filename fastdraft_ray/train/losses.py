"""Training losses: next-token cross-entropy on packed rows (PT, CP) and the distillation losses of FT.

Drafts with a vocabulary-trimmed head (``draft.head_vocab``, models/trimmed_head.py) are scored on their K-wide
kept-set logits (cheaper than V-wide): targets outside the kept set are IGNORED (``IGNORE_INDEX``), not mapped to
a remainder bucket. The draft can never propose those tokens, and the draft distribution that maximises the
acceptance rate sum_x min(p(x), q(x)) under that constraint is the target's conditioned on the kept set,
p(x | x in K) -- exactly what cross-entropy on the in-set targets estimates. Such positions are typically
well under 1-2% of tokens for K >= 8k; the loss is then the kept-set loss (not comparable 1:1 with a
full-head draft's loss). Sparse top-k KD targets are restricted to top-k ∩ kept set and renormalised
(positions with none of their top-k in the kept set are skipped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdraft_ray.models.trimmed_head import IGNORE_INDEX, kept_logits, trimmed_head


def split_row_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``seq_len + 1`` ids -> (inputs ``[:, :-1]``, next-token targets ``[:, 1:]``) as int64."""
    if batch.dim() != 2 or batch.shape[1] < 2:
        raise ValueError(f"expected a [batch, seq_len + 1] tensor of token ids, got shape {tuple(batch.shape)}")
    batch = batch.long()
    return batch[:, :-1], batch[:, 1:]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, T, V]`` against ``targets [B, T]`` (computed in fp32; targets equal
    to ``IGNORE_INDEX`` are left out)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def draft_logits(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, topk_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(logits, targets, topk_ids)`` to score: unchanged for a full-head model; for a trimmed head the K-wide
    kept-set logits, with ``targets`` and ``topk_ids`` mapped to kept-set columns (``IGNORE_INDEX`` outside)."""
    if trimmed_head(model) is None:
        return model(input_ids=inputs).logits, targets, topk_ids
    with kept_logits(model) as head:
        logits = model(input_ids=inputs).logits
    return logits, head.kept_index(targets), None if topk_ids is None else head.kept_index(topk_ids)


def lm_loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Next-token loss of a causal LM (or a DeepSpeed engine wrapping one) on packed rows."""
    inputs, targets = split_row_batch(rows)
    logits, targets, _ = draft_logits(model, inputs, targets)
    return next_token_loss(logits, targets)


# ------------------------------------------------------------------------------------ distillation (FT stage)
#
# Sparse top-k targets are RENORMALISED over the target's top-k ids: p_K = softmax(topk_logprobs) (the mass the
# target put outside its top-k is dropped, not kept as a remainder bucket). The draft's q is its full softmax,
# not renormalised, so
#   KL(p_K || q)  = sum_{i in K} p_i (log p_i - log q_i)               (>= 0; 0 iff q = p_K)
#   TVD(p_K, q)   = 1/2 (sum_{i in K} |p_i - q_i| + (1 - sum_{i in K} q_i))   (draft mass outside K counts fully)
# both exact against the sparse target, and equal to the dense losses when k = vocab. Forward KL (target ->
# draft), as in sequence-level KD; the target side is always detached: gradients flow only into the draft.

KD_LOSSES = ("ce", "kl", "tvd", "ce_kl", "ce_tvd")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def sparse_kd_terms(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position ``(KL, TVD)`` ``[B, T]`` of the draft's ``logits [B, T, V]`` against renormalised top-k
    targets ``topk_ids``/``topk_logprobs [B, T, k]`` (see the block comment above). Negative ids (columns a
    trimmed head does not have) are dropped from the target before renormalising; a position with none left
    scores 0 (mask it out: ``topk_ids.ge(0).any(-1)``)."""
    valid = topk_ids >= 0
    logq = F.log_softmax(logits.float(), dim=-1)
    logq_k = logq.gather(-1, topk_ids.long().clamp_min(0))
    target_logits = topk_logprobs.detach().float().masked_fill(~valid, float("-inf"))
    target_logits = target_logits.masked_fill(~valid.any(-1, keepdim=True), 0.0)  # no valid id: avoid NaN
    logp = F.log_softmax(target_logits, dim=-1)
    p = logp.exp() * valid
    kl = (p * (logp - logq_k)).masked_fill(~valid, 0.0).sum(-1)
    q_k = logq_k.exp() * valid
    tvd = 0.5 * ((p - q_k).abs().sum(-1) + (1.0 - q_k.sum(-1)).clamp_min(0.0))
    return kl, tvd


def dense_kd_terms(logits: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position ``(KL(p || q), TVD(p, q))`` against the full target distribution (reference for tests)."""
    logq = F.log_softmax(logits.float(), dim=-1)
    logp = F.log_softmax(target_logits.detach().float(), dim=-1)
    p = logp.exp()
    return (p * (logp - logq)).sum(-1), 0.5 * (p - logq.exp()).abs().sum(-1)


def kd_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "ce",
    *,
    alpha: float = 0.5,
    hard: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distillation loss over response positions (``mask [B, T]``; prompt and padding are 0).

    ``kind``: ``ce`` (cross-entropy on the target-written tokens: sequence-level KD), ``kl``, ``tvd`` (sparse
    top-k token-level KD), ``ce_kl`` / ``ce_tvd`` (``alpha * CE + (1 - alpha) * KL|TVD``; alpha = 0.5 is the
    issue's half-and-half). ``hard [B]`` = 1 for rows whose tokens CE may learn (0 for on-policy rows).
    """
    if kind not in KD_LOSSES:
        raise ValueError(f"train.kd_loss must be one of {', '.join(KD_LOSSES)}, got {kind!r}")
    mask = mask.float()
    hard_mask = mask if hard is None else mask * hard.float()[:, None]
    hard_mask = hard_mask * (targets != IGNORE_INDEX)  # targets a trimmed head cannot score
    terms = {}
    if kind in ("ce", "ce_kl", "ce_tvd"):
        ce = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1).long(),
            reduction="none",
            ignore_index=IGNORE_INDEX,
        ).view_as(mask)
        terms["ce"] = masked_mean(ce, hard_mask)
    if kind != "ce":
        if topk_ids is None or topk_logprobs is None:
            raise ValueError(f"train.kd_loss={kind} needs top-k targets: generate with generate.topk_logprobs > 0")
        kl, tvd = sparse_kd_terms(logits, topk_ids, topk_logprobs)
        terms["soft"] = masked_mean(kl if kind.endswith("kl") else tvd, mask * topk_ids.ge(0).any(-1))
    if kind == "ce":
        return terms["ce"]
    if kind in ("kl", "tvd"):
        return terms["soft"]
    return alpha * terms["ce"] + (1.0 - alpha) * terms["soft"]


def trim_right_padding(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Decoded FT rows cut after the batch's last loss position: the right padding of fixed-width rows is dead
    compute (a causal model's earlier positions never see it), so the loss is unchanged and the step cheaper."""
    used = parts["mask"].any(0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1
    return {
        name: t if t.dim() < 2 else t[:, : width + 1] if name == "ids" else t[:, :width]
        for name, t in parts.items()
    }


def ft_loss(model: torch.nn.Module, rows: torch.Tensor, layout, kind: str, alpha: float = 0.5) -> torch.Tensor:
    """The FT loss of a causal LM (or DeepSpeed engine) on fixed-width FT rows (:mod:`~.kd_rows`), computed on
    the batch's used width only (``trim_right_padding``)."""
    parts = trim_right_padding(layout.decode(rows))
    ids = parts["ids"]
    logits, targets, topk_ids = draft_logits(model, ids[:, :-1], ids[:, 1:], parts.get("topk_ids"))
    return kd_loss(
        logits,
        targets,
        parts["mask"],
        kind,
        alpha=alpha,
        hard=parts["hard"],
        topk_ids=topk_ids,
        topk_logprobs=parts.get("topk_logprobs"),
    )


# ------------------------------------------------------------------------------------------ online teacher
#
# train.teacher=online: the frozen target scores every batch inside the worker (no gradient) and its distribution
# over the draft's head -- the kept set of a trimmed head, renormalised as above; the full vocabulary otherwise --
# becomes the top-k target of the same KD losses. With teacher_topk = 0 (or >= the head) that is every column of
# the head: exactly what stored top-k targets give when their k covers the kept set.


@torch.no_grad()
def teacher_topk(
    teacher: torch.nn.Module, inputs: torch.Tensor, head_ids: torch.Tensor | None, k: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``(ids [B, T, k'], log-probs [B, T, k'])`` over ``head_ids`` (None = its whole vocabulary) at
    every position of ``inputs``: its log-softmax renormalised over those ids, the top ``k`` of them (0 = all)."""
    out_embedding = teacher.get_output_embeddings()
    plain_head = (
        isinstance(out_embedding, torch.nn.Linear)
        and out_embedding.bias is None
        and not getattr(teacher.config, "final_logit_softcapping", None)
    )
    if plain_head and head_ids is not None:  # only the head's rows: a K-wide matmul instead of V-wide
        hidden = teacher.get_decoder()(input_ids=inputs).last_hidden_state
        logits = hidden @ out_embedding.weight[head_ids].T
    else:
        logits = teacher(input_ids=inputs).logits
        logits = logits if head_ids is None else logits[..., head_ids]
    logprobs = F.log_softmax(logits.float(), dim=-1)
    ids = torch.arange(logprobs.shape[-1], device=logprobs.device) if head_ids is None else head_ids
    if 0 < k < logprobs.shape[-1]:
        top = logprobs.topk(k, dim=-1)
        return ids[top.indices], top.values
    return ids.expand(*logprobs.shape), logprobs


def online_kd_loss(
    model, rows: torch.Tensor, teacher, kind: str, alpha: float = 0.5, k: int = 0, layout=None
) -> torch.Tensor:
    """The KD loss of ``model`` against the online ``teacher`` on packed rows (every position) or, with a
    ``layout``, on fixed-width FT rows (response positions; CE only on hard rows)."""
    if layout is None:
        inputs, targets = split_row_batch(rows)
        mask, hard = torch.ones_like(targets), None
    else:
        parts = trim_right_padding(layout.decode(rows))
        inputs, targets, mask, hard = parts["ids"][:, :-1], parts["ids"][:, 1:], parts["mask"], parts["hard"]
    head = trimmed_head(model)
    topk_ids, topk_logprobs = teacher_topk(teacher, inputs, None if head is None else head.kept_ids, k)
    logits, targets, topk_ids = draft_logits(model, inputs, targets, topk_ids)
    return kd_loss(
        logits, targets, mask, kind, alpha=alpha, hard=hard, topk_ids=topk_ids, topk_logprobs=topk_logprobs
    )


def check_loss_settings(kd_layout: dict | None, kind: str, online_teacher: bool = False) -> None:
    """Raise ``ValueError`` for a loss the stage's data cannot give (checked on the driver before workers start;
    the choice itself was checked with the config: ``TrainConfig.validate``)."""
    if online_teacher:
        return
    # packed text rows (PT, CP) without a teacher train on next-token CE whatever kd_loss says (it is FT's key)
    if kind != "ce" and kd_layout is not None and int(kd_layout.get("topk", 0)) == 0:
        raise ValueError(
            f"train.kd_loss={kind} needs top-k targets: generate with generate.topk_logprobs > 0, "
            "or use train.teacher=online"
        )


def make_loss_fn(
    kd_layout: dict | None, kind: str = "ce", alpha: float = 0.5, teacher=None, teacher_topk: int = 0
):
    """``loss(model, rows)`` for a stage: next-token LM loss on packed rows (PT, CP) or the FT loss when the
    shards carry a ``kd_layout``; with a ``teacher`` (the frozen target) the KD loss ``kind`` against it instead."""
    check_loss_settings(kd_layout, kind, teacher is not None)
    from fastdraft_ray.train.kd_rows import RowLayout

    layout = None if kd_layout is None else RowLayout.from_dict(kd_layout)
    if teacher is not None:

        def online(model, rows):
            return online_kd_loss(model, rows, teacher, kind, alpha, teacher_topk, layout)

        return online
    if layout is None:
        return lm_loss

    def loss(model, rows):
        return ft_loss(model, rows, layout, kind, alpha)

    return loss
