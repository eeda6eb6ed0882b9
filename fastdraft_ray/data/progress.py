"""The resumable state of one ``prepare`` run: quotas met so far, packers, shard writers, the dedup set and the
stream position, checkpointed under ``<out>/.progress`` after every train shard (and read back to resume).

``consume`` applies one tokenized batch from the Ray Data stream: it enforces quotas, drops reserved and
duplicate documents, routes each document to train/val, packs rows and writes shards. Everything here is a pure
function of the stream, so an interrupted prepare resumed from its checkpoint writes the same shards.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa

from fastdraft_ray.config import DataConfig
from fastdraft_ray.data import mixture
from fastdraft_ray.data.packing import Packer, ShardWriter

FLAG_OK, FLAG_RESERVED, FLAG_EMPTY = 0, 1, 2
SPLITS = ("train", "val")


class Interrupted(Exception):
    """Raised by the ``stop_after_shards`` hook (tests simulate a crash after a checkpoint)."""


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` to ``path`` (local or fsspec URL) under a temporary name, then move it into place."""
    fs, local = _fs(path)
    fs.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    with fs.open(local + ".part", "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
    fs.mv(local + ".part", local)


def read_json(path: str) -> dict | None:
    """The JSON at ``path`` (local or fsspec URL), or None if there is none."""
    fs, local = _fs(path)
    if not fs.exists(local):
        return None
    with fs.open(local, "r") as fh:
        return json.load(fh)


class PrepareProgress:
    """Quotas, packers, writers, dedup set and position of one prepare into ``out_dir`` (fingerprint ``fp``)."""

    def __init__(self, out_dir: str, data: DataConfig, fp: str, quota: dict, stop_after_shards: int | None = None):
        names = list(data.sources)
        self.out_dir, self.data, self.fp, self.names = out_dir, data, fp, names
        self.row_len = data.seq_len + 1
        self.weights = {n: float(data.weights[n]) if data.weights else 1.0 for n in names}
        self.tallies = {
            n: mixture.SourceTally(n, data.sources[n], self.weights[n], quota[n], data.val_fraction) for n in names
        }
        self.packers = {s: Packer(self.row_len) for s in SPLITS}
        self.writers = {s: ShardWriter(out_dir, s, data.rows_per_shard) for s in SPLITS}
        self.seen: set[int] = set()
        self.new_hashes: list[int] = []
        self.replaced_files: Counter = Counter()
        self.position = [0, -1]  # (unit pos, doc idx) of the last consumed document
        self.checkpoint = -1
        self.stop_after_shards, self.shards_this_run = stop_after_shards, 0

    @property
    def progress_dir(self) -> str:
        return f"{self.out_dir}/.progress"

    @classmethod
    def resume(
        cls, out_dir: str, data: DataConfig, fp: str, quota: dict, state: dict, **kwargs
    ) -> PrepareProgress:
        """The progress an interrupted prepare checkpointed (``state`` = its ``.progress/state.json``)."""
        self = cls(out_dir, data, fp, quota, **kwargs)
        self.position = state["position"]
        for n, t in state["tallies"].items():
            self.tallies[n] = mixture.SourceTally(**t)
        self.replaced_files.update(state["replaced_files"])
        carry = np.load(f"{self.progress_dir}/carry.npz")
        for s in SPLITS:
            self.packers[s] = Packer(self.row_len, carry[f"{s}_carry"], state["segments"][s])
            self.packers[s].emitted.update(state["emitted"][s])
            self.writers[s] = ShardWriter(
                out_dir, s, data.rows_per_shard, state["shards"][s], carry[f"{s}_pending"]
            )
        for k in range(state["checkpoint"] + 1):
            self.seen.update(np.load(f"{self.progress_dir}/seen-{k:05d}.npy").tolist())
        self.checkpoint = state["checkpoint"]
        return self

    @property
    def tokens_taken(self) -> int:
        return sum(t.taken for t in self.tallies.values())

    @property
    def quotas_met(self) -> bool:
        return all(t.full for t in self.tallies.values())

    def save(self) -> None:
        """Checkpoint: new dedup hashes, packer carries and pending rows, then the state file (last)."""
        self.checkpoint += 1
        fs, local = _fs(self.progress_dir)
        fs.makedirs(local, exist_ok=True)
        with fs.open(f"{local}/seen-{self.checkpoint:05d}.npy", "wb") as fh:
            np.save(fh, np.array(self.new_hashes, dtype=np.uint64))
        with fs.open(f"{local}/carry.npz.part", "wb") as fh:
            np.savez(
                fh,
                train_carry=self.packers["train"].carry(),
                val_carry=self.packers["val"].carry(),
                train_pending=self.writers["train"].pending_array(self.row_len),
                val_pending=self.writers["val"].pending_array(self.row_len),
            )
        fs.mv(f"{local}/carry.npz.part", f"{local}/carry.npz")
        self.new_hashes = []
        write_json(
            f"{self.progress_dir}/state.json",
            {
                "fingerprint": self.fp,
                "checkpoint": self.checkpoint,
                "position": self.position,
                "tallies": {n: t.to_dict() for n, t in self.tallies.items()},
                "replaced_files": dict(self.replaced_files),
                "segments": {s: self.packers[s].segments for s in SPLITS},
                "emitted": {s: dict(self.packers[s].emitted) for s in SPLITS},
                "shards": {s: self.writers[s].shards for s in SPLITS},
            },
        )

    def consume(self, batch: pa.Table, unit_paths: list[str], on_tokens=None) -> None:
        """Apply one tokenized batch (columns src, pos, idx, flag, hash, replaced, ids); ``on_tokens(n)`` is told
        how many tokens were kept (a progress bar)."""
        cols = {
            c: batch.column(c).to_numpy(zero_copy_only=False)
            for c in ("src", "pos", "idx", "flag", "hash", "replaced")
        }
        ids_col = batch.column("ids").combine_chunks()
        offsets, values = ids_col.offsets.to_numpy(), ids_col.values.to_numpy(zero_copy_only=False)
        for i in range(len(cols["pos"])):
            self.position = [int(cols["pos"][i]), int(cols["idx"][i])]
            tally = self.tallies[self.names[cols["src"][i]]]
            if tally.full:
                continue
            tally.seen_documents += 1
            if cols["replaced"][i]:
                tally.replaced_bytes += int(cols["replaced"][i])
                self.replaced_files[unit_paths[self.position[0]]] += int(cols["replaced"][i])
            flag = cols["flag"][i]
            if flag != FLAG_OK:
                tally.dropped["reserved_for_eval" if flag == FLAG_RESERVED else "empty"] += 1
                continue
            h = int(cols["hash"][i])
            if self.data.dedup:
                if h in self.seen:
                    tally.dropped["duplicate"] += 1
                    continue
                self.seen.add(h)
                self.new_hashes.append(h)
            doc = values[offsets[i] : offsets[i + 1]]
            keep, split = tally.take(len(doc))
            if keep < len(doc):
                doc = np.append(doc[: keep - 1], doc[-1]) if keep > 1 else doc[-1:][:keep]
            self.packers[split].add(doc, tally.name)
            if on_tokens:
                on_tokens(keep)
            wrote = self.writers[split].add(self.packers[split].pop_rows())
            if wrote and split == "train":
                self.save()
                self.shards_this_run += wrote
                if self.stop_after_shards is not None and self.shards_this_run >= self.stop_after_shards:
                    raise Interrupted(f"stopped after {self.shards_this_run} shards")

    def finish(self) -> None:
        """Flush the last partial shards (the unfinished tail rows are dropped and counted)."""
        for s in SPLITS:
            self.writers[s].flush()

    def clear(self) -> None:
        """Remove the checkpoint folder (the manifest is written: the prepare is complete)."""
        fs, local = _fs(self.progress_dir)
        if fs.exists(local):
            fs.rm(local, recursive=True)
