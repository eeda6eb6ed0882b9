"""Test helper: read the training audit log (``trace_dir``) and the rows the run should have trained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fastdraft_ray.train.position import row_id


def read_trace(trace_dir: Path) -> dict[int, list[dict]]:
    """rank -> its step records in the order they were written (all attempts)."""
    out = {}
    for path in sorted(Path(trace_dir).glob("rank*.jsonl")):
        out[int(path.stem[4:])] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


def effective_lineage(trace: dict[int, list[dict]]) -> tuple[list[int], dict[int, dict]]:
    """Row ids in the order the final model was trained on them, and step -> the effective rank-0 record.

    A step recorded by several attempts (trained, then lost in a crash and redone after the resume) counts
    once, from the last attempt: the crashed attempt's updates were rolled back with the checkpoint.
    """
    per_rank = {rank: {rec["step"]: rec for rec in records} for rank, records in trace.items()}
    steps = sorted(per_rank[0])
    assert all(sorted(r) == steps for r in per_rank.values()), "ranks disagree on the steps trained"
    lineage = [rid for s in steps for rank in sorted(per_rank) for rid in per_rank[rank][s]["rows"]]
    return lineage, per_rank[0]


def expected_rows(data_dir: Path, n_rows: int, seed: int = 0) -> list[int]:
    """Ids of the first ``n_rows`` rows of the global training order (epoch 0, then 1, ...)."""
    from fastdraft_ray.data.stream import num_rows, training_dataset

    ids: list[int] = []
    epoch = 0
    while len(ids) < n_rows:
        rows = training_dataset(str(data_dir), seed=seed, epoch=epoch).take_all()
        ids += [row_id(np.asarray(r["input_ids"])) for r in rows]
        assert len(rows) == num_rows(str(data_dir))
        epoch += 1
    return ids[:n_rows]
