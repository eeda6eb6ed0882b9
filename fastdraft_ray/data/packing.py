"""Packing tokenised documents into fixed rows of ``seq_len + 1`` int32 ids, and writing them as parquet shards.

Documents are concatenated (each already ends with EOS) and cut into consecutive, non-overlapping rows; the
partial row left at the very end is dropped. The packer remembers which source every buffered token came
from, so per-source token counts in the written rows are exact.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class Packer:
    """Concatenate documents, emit full rows; ``segments`` is the (source, length) list of the carry."""

    def __init__(self, row_len: int, carry: np.ndarray | None = None, segments: list | None = None):
        self.row_len = row_len
        self._parts: list[np.ndarray] = [] if carry is None or not len(carry) else [carry.astype(np.int32)]
        self._n = sum(len(p) for p in self._parts)
        self.segments: list[list] = [list(s) for s in segments or []]
        self.emitted: Counter = Counter()  # source -> tokens in emitted rows

    def add(self, ids: np.ndarray, source: str) -> None:
        """Append one document's ids (EOS included)."""
        if len(ids):
            self._parts.append(ids)
            self._n += len(ids)
            if self.segments and self.segments[-1][0] == source:
                self.segments[-1][1] += len(ids)
            else:
                self.segments.append([source, len(ids)])

    def pop_rows(self) -> np.ndarray:
        """All complete rows buffered so far, shape ``(k, row_len)`` (k may be 0)."""
        k = self._n // self.row_len
        if k == 0:
            return np.empty((0, self.row_len), np.int32)
        flat = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
        cut = k * self.row_len
        rows, rest = flat[:cut].reshape(k, self.row_len), flat[cut:]
        self._parts, self._n = ([rest] if len(rest) else []), len(rest)
        left = cut
        while left:
            source, n = self.segments[0]
            used = min(n, left)
            self.emitted[source] += used
            left -= used
            if used == n:
                self.segments.pop(0)
            else:
                self.segments[0][1] -= used
        return rows

    def carry(self) -> np.ndarray:
        """Tokens not yet in a full row."""
        return np.concatenate(self._parts).astype(np.int32) if self._parts else np.empty(0, np.int32)


def rows_table(rows: np.ndarray) -> pa.Table:
    """``(k, L)`` int32 rows -> a table with one ``input_ids`` column of fixed-size int32 lists."""
    values = pa.array(np.ascontiguousarray(rows, dtype=np.int32).reshape(-1))
    return pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(values, rows.shape[1])})


def write_shard(rows: np.ndarray, path: str) -> None:
    """Write rows to ``path`` atomically (temporary name, then rename)."""
    import fsspec

    fs, local = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    tmp = local + ".part"
    with fs.open(tmp, "wb") as fh:
        pq.write_table(rows_table(rows), fh, compression="zstd", row_group_size=max(1, min(len(rows), 1024)))
    fs.mv(tmp, local)


class ShardWriter:
    """Buffers rows of one split and writes ``<split>/part-NNNNN.parquet`` every ``rows_per_shard`` rows."""

    def __init__(
        self,
        out_dir: str,
        split: str,
        rows_per_shard: int,
        shards: list | None = None,
        pending: np.ndarray | None = None,
    ):
        self.out_dir, self.split, self.rows_per_shard = out_dir.rstrip("/"), split, rows_per_shard
        self.shards: list[dict] = list(shards or [])  # [{"file": rel path, "rows": n}]
        self.pending: list[np.ndarray] = [] if pending is None or not len(pending) else [pending]

    @property
    def pending_rows(self) -> int:
        return sum(len(p) for p in self.pending)

    def add(self, rows: np.ndarray) -> int:
        """Buffer rows; write every full shard. Returns the number of shards written."""
        if len(rows):
            self.pending.append(rows)
        written = 0
        while self.pending_rows >= self.rows_per_shard:
            block = np.concatenate(self.pending)
            self._write(block[: self.rows_per_shard])
            rest = block[self.rows_per_shard :]
            self.pending = [rest] if len(rest) else []
            written += 1
        return written

    def flush(self) -> None:
        """Write the last, partial shard."""
        if self.pending_rows:
            self._write(np.concatenate(self.pending))
            self.pending = []

    def pending_array(self, row_len: int) -> np.ndarray:
        return np.concatenate(self.pending) if self.pending else np.empty((0, row_len), np.int32)

    def _write(self, rows: np.ndarray) -> None:
        rel = f"{self.split}/part-{len(self.shards):05d}.parquet"
        write_shard(rows, f"{self.out_dir}/{rel}")
        self.shards.append({"file": rel, "rows": int(len(rows))})
