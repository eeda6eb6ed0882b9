"""Fixed-width int32 rows for the FT (distillation) stage, so FT reuses the token-shard stream unchanged.

One row holds one (prompt, response) example padded to ``seq_len + 1`` ids, laid out as::

    ids[seq_len + 1] | loss_mask[seq_len] | hard[1] | topk_ids[seq_len * k] | topk_logprobs[seq_len * k]

* ``loss_mask[t] = 1`` when next-token target ``ids[t + 1]`` is a response token (prompt and padding are 0).
* ``hard = 1`` when the response tokens were written by the target (or are the dataset's original response), so
  cross-entropy on them is meaningful; on-policy rows (the draft wrote the response, the target only scored it)
  have ``hard = 0`` and contribute only to the top-k terms.
* ``topk_*`` (only when ``k > 0``): the target's top-k next-token ids and log-probs at every target position
  ``t``, aligned with ``ids[t + 1]``; log-probs are float32 stored bit-for-bit in int32 (``view``), lossless.

The shard folder's ``manifest.json`` has ``seq_len`` (training geometry: tokens per row, padding included),
``row_len`` (the width above, what the stream reads) and ``kd_layout`` ``{"seq_len", "topk"}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

FORMAT = "fastdraft-ray/kd-rows/v1"


@dataclass(frozen=True)
class RowLayout:
    """Widths of one FT row; ``topk = 0`` means no soft targets (sequence-level KD / baseline only)."""

    seq_len: int
    topk: int = 0

    @property
    def width(self) -> int:
        return (self.seq_len + 1) + self.seq_len + 1 + 2 * self.seq_len * self.topk

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RowLayout:
        return cls(int(data["seq_len"]), int(data.get("topk", 0)))

    def encode(
        self,
        prompt_ids: list[int],
        response_ids: list[int],
        pad_id: int,
        *,
        hard: bool = True,
        topk_ids: np.ndarray | None = None,
        topk_logprobs: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """One row for ``prompt + response`` (response truncated to fit), or None when no response token fits.

        ``topk_ids``/``topk_logprobs`` have shape ``[len(response_ids), k]``: entry ``j`` is the target's
        distribution over response token ``j``.
        """
        L, k = self.seq_len, self.topk
        ids = np.full(L + 1, pad_id, np.int32)
        n_prompt = len(prompt_ids)
        n_resp = min(len(response_ids), L + 1 - n_prompt)
        if n_prompt < 1 or n_resp < 1:
            return None
        ids[:n_prompt] = prompt_ids
        ids[n_prompt : n_prompt + n_resp] = response_ids[:n_resp]
        mask = np.zeros(L, np.int32)
        mask[n_prompt - 1 : n_prompt - 1 + n_resp] = 1  # target position t predicts ids[t + 1]
        parts = [ids, mask, np.array([int(hard)], np.int32)]
        if k:
            if topk_ids is None or topk_logprobs is None:
                raise ValueError(f"layout has topk={k} but the example has no top-k targets")
            if topk_ids.shape[1] < k:
                raise ValueError(f"example has top-{topk_ids.shape[1]} targets, layout needs {k}")
            tid = np.zeros((L, k), np.int32)
            tlp = np.zeros((L, k), np.float32)
            tid[n_prompt - 1 : n_prompt - 1 + n_resp] = topk_ids[:n_resp, :k]
            tlp[n_prompt - 1 : n_prompt - 1 + n_resp] = topk_logprobs[:n_resp, :k]
            parts += [tid.reshape(-1), tlp.reshape(-1).view(np.int32)]
        elif not hard:
            raise ValueError("an on-policy row (hard=False) needs top-k targets: set generate.topk_logprobs > 0")
        return np.concatenate(parts)

    def decode(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, width]`` int32 rows -> ``ids [B, L+1]`` int64, ``mask [B, L]`` float, ``hard [B]`` float and,
        when ``topk > 0``, ``topk_ids [B, L, k]`` int64 and ``topk_logprobs [B, L, k]`` float32."""
        if rows.dim() != 2 or rows.shape[1] != self.width:
            raise ValueError(f"expected [batch, {self.width}] FT rows for {self}, got {tuple(rows.shape)}")
        L, k, B = self.seq_len, self.topk, rows.shape[0]
        rows = rows.to(torch.int32)
        out = {
            "ids": rows[:, : L + 1].long(),
            "mask": rows[:, L + 1 : 2 * L + 1].float(),
            "hard": rows[:, 2 * L + 1].float(),
        }
        if k:
            start = 2 * L + 2
            out["topk_ids"] = rows[:, start : start + L * k].reshape(B, L, k).long()
            bits = rows[:, start + L * k : start + 2 * L * k].contiguous()
            out["topk_logprobs"] = bits.view(torch.float32).reshape(B, L, k)
        return out
