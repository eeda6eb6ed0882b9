"""Synthetic prepared-data folders in the token-shard format (``manifest.json`` + parquet shards), written with the
data package's own shard writer and filled with distinct, learnable token rows: for benchmarks and tests that
need shards without a tokenizer run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fastdraft_ray.data.packing import ShardWriter


def synthetic_rows(n: int, row_len: int, vocab_size: int, rng: np.random.Generator, tag: int = 0) -> np.ndarray:
    """Noisy counting sequences (so the loss can fall well below log(vocab)); the first two ids make every row
    distinct (row index in base ``vocab_size``, offset by ``tag``)."""
    starts = rng.integers(0, vocab_size, size=(n, 1))
    rows = (starts + np.arange(row_len)) % vocab_size
    noise = rng.random(rows.shape) < 0.1
    rows = np.where(noise, rng.integers(0, vocab_size, size=rows.shape), rows).astype(np.int32)
    rows[:, 0] = np.arange(n) % vocab_size
    rows[:, 1] = (np.arange(n) // vocab_size + tag) % vocab_size
    return rows


def write_shards(
    data_dir: Path,
    *,
    tokenizer_hash: str,
    vocab_size: int,
    seq_len: int = 16,
    train_rows: int = 64,
    val_rows: int = 16,
    rows_per_shard: int = 16,
    seed: int = 0,
) -> Path:
    """A prepared-shards folder with ``train_rows``/``val_rows`` rows of ``seq_len + 1`` int32 ids."""
    rng = np.random.default_rng(seed)
    data_dir = Path(data_dir)
    splits = {}
    for tag, (split, n) in enumerate((("train", train_rows), ("val", val_rows))):
        writer = ShardWriter(str(data_dir), split, rows_per_shard)
        writer.add(synthetic_rows(n, seq_len + 1, vocab_size, rng, tag=3 * tag))
        writer.flush()
        splits[split] = {"rows": n, "tokens": n * (seq_len + 1), "documents": n, "shards": writer.shards}
    manifest = {
        "format": "fastdraft-ray/token-shards/v1",
        "tokenizer": "tiny",
        "tokenizer_hash": tokenizer_hash,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "row_len": seq_len + 1,
        "column": "input_ids",
        "dtype": "int32",
        "rows": {s: v["rows"] for s, v in splits.items()},
        "tokens": {s: v["tokens"] for s, v in splits.items()},
        "splits": splits,
    }
    (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return data_dir
