"""Stream prepared token shards into training as a Ray Dataset, in an order fixed by ``(seed, epoch)``.

Order of an epoch: the split's shard files are permuted with ``rng(seed, epoch)``; consecutive groups of
``window_files`` files form windows; the rows of each window are permuted with ``rng(seed, epoch, window)``.
That is a seeded local shuffle whose buffer is one window (bounded memory, nothing is materialised).
``skip_rows=N`` drops exactly the first N rows of that order: whole windows are skipped without reading
them (row counts come from the manifest) and the first remaining window drops its first rows after
shuffling — so a resumed run sees exactly the rows an uninterrupted one would have seen next.

Several workers: Ray Train splits the dataset with ``streaming_split(n, equal=True)``. With
``preserve_order`` (use :func:`train_data_config`, Train otherwise resets it) the splitter hands blocks to
workers deterministically (each block goes to the worker with the fewest rows so far), so each worker's rows
are a fixed function of ``(seed, epoch)``. Pass ``block_rows`` = the per-worker batch size (or a divisor of
it): blocks then hold exactly that many rows, the split is round-robin by block, and after k synchronous
steps the workers together have consumed exactly the first ``k * batch * num_workers`` rows — resume with
``skip_rows`` equal to that. At the end of an epoch ``equal=True`` drops the few rows that would make the
workers' shares unequal.
"""

from __future__ import annotations

import json

import numpy as np


class ShardError(RuntimeError):
    """A token shard folder that cannot be trained on: wrong tokenizer, missing or corrupt file."""


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def read_manifest(data_dir: str) -> dict:
    """The ``manifest.json`` of a prepared shard folder."""
    fs, local = _fs(f"{data_dir.rstrip('/')}/manifest.json")
    if not fs.exists(local):
        raise ShardError(
            f"{data_dir} has no manifest.json: it is not a prepared shard folder (or its prepare job "
            "did not finish; re-run jobs/prepare_data.py to complete it)"
        )
    with fs.open(local, "r") as fh:
        return json.load(fh)


def check_tokenizer(manifest: dict, expected_tokenizer_hash: str | None, data_dir: str = "") -> None:
    """Refuse shards made with another tokenizer than the target's."""
    if expected_tokenizer_hash is None or manifest["tokenizer_hash"] == expected_tokenizer_hash:
        return
    raise ShardError(
        f"token shards in {data_dir} were made with tokenizer {manifest.get('tokenizer')!r} (hash "
        f"{manifest['tokenizer_hash'][:12]}...), but the target's tokenizer has hash {expected_tokenizer_hash[:12]}...: "
        "the token ids would mean different things. Re-run jobs/prepare_data.py with model.target set to this "
        "target and a new data.output (or data.name)."
    )


def epoch_windows(manifest: dict, split: str, seed: int, epoch: int, window_files: int) -> list[dict]:
    """The windows of one epoch in order: ``[{"window": i, "files": [...], "rows": n}]``."""
    shards = manifest["splits"][split]["shards"]
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(shards))
    windows = []
    for w, start in enumerate(range(0, len(order), window_files)):
        chosen = [shards[int(i)] for i in order[start : start + window_files]]
        windows.append({"window": w, "files": [c["file"] for c in chosen], "rows": sum(c["rows"] for c in chosen)})
    return windows


def _validate(data_dir: str, manifest: dict, split: str) -> None:
    import pyarrow.parquet as pq

    for shard in manifest["splits"][split]["shards"]:
        path = f"{data_dir}/{shard['file']}"
        fs, local = _fs(path)
        try:
            with fs.open(local, "rb") as fh:
                rows = pq.ParquetFile(fh).metadata.num_rows
        except FileNotFoundError:
            raise ShardError(
                f"token shard {path} is missing; re-run jobs/prepare_data.py into a new folder"
            ) from None
        except Exception as exc:
            raise ShardError(
                f"token shard {path} is corrupt ({type(exc).__name__}: {exc}); delete the folder and "
                "re-run jobs/prepare_data.py"
            ) from None
        if rows != shard["rows"]:
            raise ShardError(
                f"token shard {path} has {rows} rows but the manifest says {shard['rows']}: the folder "
                "was modified after prepare; re-run jobs/prepare_data.py"
            )


def read_window(batch: dict, data_dir: str, row_len: int, seed: int, epoch: int, chunk: int = 1024):
    """Ray task: read one window's files, permute its rows, drop ``skip`` leading rows, yield ``input_ids``."""
    import pyarrow.parquet as pq

    for k in range(len(batch["window"])):
        window, skip = int(batch["window"][k]), int(batch["skip"][k])
        parts = []
        for rel in json.loads(batch["files"][k]):
            path = f"{data_dir}/{rel}"
            try:
                fs, local = _fs(path)
                with fs.open(local, "rb") as fh:
                    col = pq.read_table(fh, columns=["input_ids"]).column("input_ids").combine_chunks()
                flat = col.values.to_numpy(zero_copy_only=False)
                parts.append(flat.reshape(-1, row_len).astype(np.int32, copy=False))
            except Exception as exc:
                raise ShardError(
                    f"token shard {path} is corrupt or unreadable ({type(exc).__name__}: {exc}); "
                    "delete the folder and re-run jobs/prepare_data.py"
                ) from None
        rows = np.concatenate(parts) if parts else np.empty((0, row_len), np.int32)
        rows = rows[np.random.default_rng([seed, epoch, 1, window]).permutation(len(rows))][skip:]
        for start in range(0, len(rows), chunk):
            yield {"input_ids": rows[start : start + chunk]}


def training_dataset(
    data_dir: str,
    *,
    split: str = "train",
    seed: int = 0,
    epoch: int = 0,
    skip_rows: int = 0,
    expected_tokenizer_hash: str | None = None,
    window_files: int = 4,
    block_rows: int | None = None,
    validate: bool = True,
    read_cpus: float = 0.25,
):
    """A streaming ``ray.data.Dataset`` of rows ``{"input_ids": int32[seq_len + 1]}`` in the (seed, epoch) order.

    ``skip_rows`` drops exactly the first rows of that order (resume). ``block_rows`` makes every block (but
    the last) hold exactly that many rows — see the module docstring for multi-worker guarantees.
    ``validate`` checks every shard's parquet footer against the manifest up front (clear error naming a
    missing or truncated file); corruption inside a file raises :class:`ShardError` when it is read.
    """
    import ray

    data_dir = data_dir.rstrip("/")
    manifest = read_manifest(data_dir)
    check_tokenizer(manifest, expected_tokenizer_hash, data_dir)
    if split not in manifest["splits"]:
        raise ShardError(f"{data_dir} has no split {split!r}; splits: {', '.join(manifest['splits'])}")
    if validate:
        _validate(data_dir, manifest, split)
    total = manifest["splits"][split]["rows"]
    if skip_rows < 0 or skip_rows > total:
        raise ShardError(f"skip_rows={skip_rows} is outside the {total} rows of split {split!r}")
    items = []
    for w in epoch_windows(manifest, split, seed, epoch, window_files):
        if skip_rows >= w["rows"]:
            skip_rows -= w["rows"]
            continue
        items.append({"window": w["window"], "files": json.dumps(w["files"]), "skip": skip_rows})
        skip_rows = 0
    if not items:  # everything skipped: an empty dataset with the right schema
        return ray.data.from_numpy(np.empty((0, manifest["row_len"]), np.int32)).rename_columns(
            {"data": "input_ids"}
        )
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        read_window,
        batch_size=1,
        batch_format="numpy",
        num_cpus=read_cpus,
        fn_kwargs={"data_dir": data_dir, "row_len": manifest["row_len"], "seed": seed, "epoch": epoch},
    )
    if block_rows:
        return worker_blocks(ds, block_rows)
    ds.context.execution_options.preserve_order = True
    return ds


def worker_blocks(ds, block_rows: int):
    """``ds`` re-cut, in order, into blocks of exactly ``block_rows`` rows (the last may be shorter): Ray Data's
    split then deals them round-robin (see the module docstring). A repartition task reserves a whole CPU."""
    ds = ds.repartition(target_num_rows_per_block=block_rows, strict=True)
    ds.context.execution_options.preserve_order = True
    return ds


def train_data_config(**kwargs):
    """``ray.train.DataConfig`` that keeps ``preserve_order`` (deterministic per-worker split) for TorchTrainer."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(execution_options=ExecutionOptions(preserve_order=True), **kwargs)


def num_rows(data_dir: str, split: str = "train") -> int:
    """Rows in a split (from the manifest)."""
    return int(read_manifest(data_dir)["splits"][split]["rows"])


__all__ = [
    "read_manifest",
    "training_dataset",
    "train_data_config",
    "worker_blocks",
    "check_tokenizer",
    "epoch_windows",
    "num_rows",
    "ShardError",
]
