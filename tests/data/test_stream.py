"""Streaming shards into training: (seed, epoch) order, exact resume, deterministic worker split, refusals."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from ray.data import ExecutionOptions

from fastdraft_ray.data.packing import write_shard
from fastdraft_ray.data.stream import ShardError, read_manifest, train_data_config, training_dataset

ROW_LEN = 9


@pytest.fixture
def shards(tmp_path):
    """10 shards of 1..30 rows; row r holds the value r in every position (so rows identify themselves)."""
    sizes = [30, 7, 25, 1, 30, 30, 12, 30, 3, 30]
    entries, start = [], 0
    for i, n in enumerate(sizes):
        rows = np.repeat(np.arange(start, start + n, dtype=np.int32)[:, None], ROW_LEN, axis=1)
        write_shard(rows, str(tmp_path / f"train/part-{i:05d}.parquet"))
        entries.append({"file": f"train/part-{i:05d}.parquet", "rows": n})
        start += n
    manifest = {
        "tokenizer": "t",
        "tokenizer_hash": "abc123" * 10,
        "seq_len": ROW_LEN - 1,
        "row_len": ROW_LEN,
        "splits": {"train": {"rows": start, "tokens": start * ROW_LEN, "shards": entries}},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return str(tmp_path), start


def ids(ds):
    parts = [b["input_ids"][:, 0] for b in ds.iter_batches(batch_size=16, batch_format="numpy")]
    return np.concatenate(parts) if parts else np.empty(0, np.int32)


def test_order_is_fixed_by_seed_and_epoch(ray_local, shards):
    path, total = shards
    a = ids(training_dataset(path, seed=3, epoch=0, window_files=3))
    assert sorted(a.tolist()) == list(range(total))
    assert np.array_equal(a, ids(training_dataset(path, seed=3, epoch=0, window_files=3)))
    assert not np.array_equal(a, ids(training_dataset(path, seed=3, epoch=1, window_files=3)))
    assert not np.array_equal(a, ids(training_dataset(path, seed=4, epoch=0, window_files=3)))
    assert not np.array_equal(a, np.sort(a))  # rows are shuffled inside windows too
    batch = next(iter(training_dataset(path).iter_torch_batches(batch_size=4)))
    assert tuple(batch["input_ids"].shape) == (4, ROW_LEN) and str(batch["input_ids"].dtype) == "torch.int32"


@pytest.mark.parametrize("skip", [0, 1, 29, 60, 97, 198])
def test_skip_rows_is_exactly_the_suffix(ray_local, shards, skip):
    path, total = shards
    full = ids(training_dataset(path, seed=1, epoch=2, window_files=2))
    assert np.array_equal(
        ids(training_dataset(path, seed=1, epoch=2, window_files=2, skip_rows=skip)), full[skip:]
    )


def _split_consume(ds, workers, batch, steps=None):
    """Consume ``streaming_split`` like Train does (one thread per worker); rows per worker."""
    ds.context.execution_options = ExecutionOptions(preserve_order=True)  # what train_data_config() applies
    splits = ds.streaming_split(workers, equal=True)
    out = [[] for _ in range(workers)]

    def run(w):
        for i, b in enumerate(splits[w].iter_batches(batch_size=batch, batch_format="numpy")):
            if steps is not None and i >= steps:
                break
            out[w].extend(b["input_ids"][:, 0].tolist())

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_worker_split_is_deterministic_and_resumes_exactly(ray_local, shards):
    path, _ = shards
    batch, workers, steps = 4, 2, 5
    first = _split_consume(training_dataset(path, seed=7, block_rows=batch), workers, batch)
    again = _split_consume(training_dataset(path, seed=7, block_rows=batch), workers, batch)
    assert first == again
    consumed = steps * batch * workers
    resumed = _split_consume(training_dataset(path, seed=7, block_rows=batch, skip_rows=consumed), workers, batch)
    for w in range(workers):
        assert resumed[w] == first[w][steps * batch :]  # neither replayed nor skipped, per worker
    assert train_data_config()._user_execution_options.preserve_order


def test_refuses_other_tokenizer_and_corrupt_shards(ray_local, shards):
    path, _ = shards
    with pytest.raises(ShardError, match=r"made with tokenizer 't'.*Re-run jobs/prepare_data.py"):
        training_dataset(path, expected_tokenizer_hash="f" * 64)
    training_dataset(path, expected_tokenizer_hash=read_manifest(path)["tokenizer_hash"])
    victim = f"{path}/train/part-00004.parquet"
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2])  # truncated: footer gone
    with pytest.raises(ShardError, match="part-00004.parquet is corrupt"):
        training_dataset(path)
    open(victim, "wb").write(data[:4] + b"\x00" * (len(data) - 12) + data[-8:])  # footer intact, pages garbage
    with pytest.raises(Exception, match="part-00004.parquet is corrupt"):
        ids(training_dataset(path, validate=False))
    with pytest.raises(ShardError, match="no manifest.json"):
        read_manifest(f"{path}/train")
