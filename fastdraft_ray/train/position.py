"""Where training stands in the data: the deterministic global row order, who trains which row, how to resume.

The contract ("no batch is trained twice, none is skipped"):

- The training rows form ONE global sequence: epoch ``e`` of the prepared shards in the order fixed by
  ``(seed, e)`` (``fastdraft_ray.data.stream.training_dataset``), then epoch ``e + 1``, and so on. Global row
  ``p`` is row ``p % rows_per_epoch`` of epoch ``p // rows_per_epoch``.
- Every worker reads that same sequence (the dataset is not split by Ray; order is preserved) in global
  micro-batches of ``world_size x micro_batch_size`` rows and trains only its own slice
  ``[rank * micro_batch_size, (rank + 1) * micro_batch_size)``. Optimizer step ``s`` (1-based) therefore trains
  exactly global rows ``[(s - 1) * rows_per_step, s * rows_per_step)`` -- independent of timing and of which
  process is alive.
- A checkpoint after step ``s`` records ``rows_consumed = s * rows_per_step``. Resuming skips exactly that many
  rows (the driver asks the dataset to start there; workers discard any remainder), so the next step trains the
  next rows. Steps taken after the last checkpoint and lost in a crash are rolled back with the weights.

The price: each worker reads every row (``world_size`` x the I/O of a split), which is small next to training
for packed token rows; the gain is an exact, checkable position with any number of workers and restarts.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Batch geometry of one run; fixed for the run's lifetime (resuming with another one is refused)."""

    world_size: int
    micro_batch_size: int
    grad_accum_steps: int
    seq_len: int

    @property
    def rows_per_micro_step(self) -> int:
        """Rows of one global micro-batch (all workers together)."""
        return self.world_size * self.micro_batch_size

    @property
    def rows_per_step(self) -> int:
        """Rows of one optimizer step (all workers, all accumulation micro-steps)."""
        return self.rows_per_micro_step * self.grad_accum_steps

    @property
    def tokens_per_step(self) -> int:
        """Predicted tokens per optimizer step (each row of seq_len + 1 ids yields seq_len targets)."""
        return self.rows_per_step * self.seq_len

    def total_steps(self, token_budget: int) -> int:
        """Optimizer steps needed to train on at least ``token_budget`` tokens."""
        if token_budget <= 0:
            raise ValueError(f"token budget must be positive, got {token_budget}")
        return math.ceil(token_budget / self.tokens_per_step)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DataPosition:
    """What a checkpoint records about the data: steps done and global rows consumed."""

    step: int
    rows_consumed: int
    rows_per_epoch: int

    @property
    def epoch(self) -> int:
        return self.rows_consumed // self.rows_per_epoch

    @property
    def row_in_epoch(self) -> int:
        return self.rows_consumed % self.rows_per_epoch

    def to_dict(self) -> dict:
        return {**asdict(self), "epoch": self.epoch, "row_in_epoch": self.row_in_epoch}

    @classmethod
    def from_dict(cls, data: dict) -> DataPosition:
        return cls(int(data["step"]), int(data["rows_consumed"]), int(data["rows_per_epoch"]))


def epoch_plan(start_row: int, end_row: int, rows_per_epoch: int) -> list[tuple[int, int]]:
    """``[(epoch, skip_rows), ...]`` whose concatenation covers global rows ``[start_row, end_row)``."""
    if rows_per_epoch <= 0:
        raise ValueError("the training split has no rows")
    if not 0 <= start_row <= end_row:
        raise ValueError(f"bad row range [{start_row}, {end_row})")
    plan = [(start_row // rows_per_epoch, start_row % rows_per_epoch)]
    for epoch in range(start_row // rows_per_epoch + 1, math.ceil(end_row / rows_per_epoch)):
        plan.append((epoch, 0))
    return plan


def row_id(row: np.ndarray) -> int:
    """A stable 32-bit id of one token row (crc32 of its int32 ids), for auditing which rows were trained."""
    return zlib.crc32(np.ascontiguousarray(row, dtype=np.int32).tobytes())
