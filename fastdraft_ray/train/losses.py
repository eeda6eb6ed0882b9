"""Training losses. Pre-training and continued pre-training use next-token cross-entropy on packed rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_row_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``seq_len + 1`` ids -> (inputs ``[:, :-1]``, next-token targets ``[:, 1:]``) as int64."""
    if batch.dim() != 2 or batch.shape[1] < 2:
        raise ValueError(f"expected a [batch, seq_len + 1] tensor of token ids, got shape {tuple(batch.shape)}")
    batch = batch.long()
    return batch[:, :-1], batch[:, 1:]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, T, V]`` against ``targets [B, T]`` (computed in fp32)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lm_loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Next-token loss of a causal LM (or a DeepSpeed engine wrapping one) on packed rows."""
    inputs, targets = split_row_batch(rows)
    return next_token_loss(model(input_ids=inputs).logits, targets)
