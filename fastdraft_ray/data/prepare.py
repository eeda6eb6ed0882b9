"""Prepare token shards with Ray Data: read -> tokenize (actor pool) -> mix, dedup, split, pack -> parquet + manifest.

Pipeline: the sources are planned into small units (:mod:`.sources`) and interleaved in proportion to their
token quotas (:mod:`.mixture`). Ray Data reads units in parallel tasks (dropping nothing yet, but flagging
documents reserved for evaluation and hashing each text) and tokenizes them in an actor pool
(``map_batches``), with ``preserve_order`` so the stream order is a pure function of the inputs and config.
The driver consumes that stream: it enforces quotas, drops reserved and duplicate documents (exact text
hash), routes documents to train/val, packs rows of ``seq_len + 1`` ids and writes shards (:mod:`.progress`).

Memory stays flat: the driver holds one shard of rows, the dedup set (8 bytes per document hash plus Python
set overhead) and Ray's bounded streaming buffers. After every train shard the driver checkpoints its state
under ``<out>/.progress``; re-running the same prepare resumes from there without rewriting finished shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from fastdraft_ray.config import DataConfig
from fastdraft_ray.data import mixture, sources
from fastdraft_ray.data.progress import (
    FLAG_EMPTY,
    FLAG_OK,
    FLAG_RESERVED,
    Interrupted,
    PrepareProgress,
    read_json,
    write_json,
)

log = logging.getLogger(__name__)

FORMAT = "fastdraft-ray/token-shards/v1"
READ_CPUS = 0.25


class PrepareError(RuntimeError):
    """The output folder cannot be used (it holds a different dataset) or the result would be unusable."""


# ---------------------------------------------------------------------------------------------- Ray stages


def _read_units(batch: dict) -> Iterator[pa.Table]:
    """Ray task: one unit -> a stream of document rows (reserved ones flagged, text emptied)."""
    for k in range(len(batch["pos"])):
        unit, pos, src, skip = (
            json.loads(batch["unit"][k]),
            int(batch["pos"][k]),
            int(batch["src"][k]),
            int(batch["skip"][k]),
        )
        rows: dict[str, list] = {
            c: [] for c in ("src", "pos", "idx", "flag", "hash", "replaced", "doc_id", "text", "messages")
        }
        for idx, doc in enumerate(sources.read_unit(unit, skip), start=skip):
            flag = FLAG_RESERVED if doc.reserved else FLAG_OK if doc.text.strip() else FLAG_EMPTY
            digest = hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).digest()[:8]
            for col, value in (
                ("src", src),
                ("pos", pos),
                ("idx", idx),
                ("flag", flag),
                ("hash", int.from_bytes(digest, "little")),
                ("replaced", doc.replaced),
                ("doc_id", doc.doc_id),
                ("text", doc.text if flag == FLAG_OK else ""),
                ("messages", json.dumps(doc.messages) if doc.messages and flag == FLAG_OK else None),
            ):
                rows[col].append(value)
            if len(rows["idx"]) >= 64:
                yield _doc_table(rows)
                rows = {c: [] for c in rows}
        if rows["idx"]:
            yield _doc_table(rows)


def _doc_table(rows: dict) -> pa.Table:
    types = {
        "src": pa.int32(),
        "pos": pa.int64(),
        "idx": pa.int64(),
        "flag": pa.int8(),
        "hash": pa.uint64(),
        "replaced": pa.int64(),
        "doc_id": pa.string(),
        "text": pa.large_string(),
        "messages": pa.large_string(),
    }
    return pa.table({c: pa.array(rows[c], type=types[c]) for c in types})


class Tokenize:
    """Ray actor: text (or chat turns, via the target's chat template) -> ids + EOS, as a list<int32> column.

    Fast tokenizers travel as their ``tokenizer.json`` string and load in well under a second without
    importing transformers; the full HF tokenizer is loaded only for chat templates or slow tokenizers.
    """

    def __init__(
        self, tokenizer_spec: str, eos_id: int, backend_json: str | None = None, trust_remote_code: bool = False
    ):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.spec, self.eos, self.trust = tokenizer_spec, eos_id, trust_remote_code
        self._hf = None
        self.backend = None
        if backend_json is not None:
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_str(backend_json)

    @property
    def hf(self):
        """The full Hugging Face tokenizer (loaded on first use)."""
        if self._hf is None:
            from fastdraft_ray.models.target import load_tokenizer

            self._hf = load_tokenizer(self.spec, self.trust)
        return self._hf

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids without special tokens (the Rust backend when there is one)."""
        if not texts:
            return []
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        flags = batch.column("flag").to_numpy()
        keep = np.flatnonzero(flags == FLAG_OK)
        texts_col, msgs_col = batch.column("text"), batch.column("messages")
        texts = []
        for i in keep:
            msgs = msgs_col[int(i)].as_py()
            texts.append(sources.format_chat(json.loads(msgs), self.hf) if msgs else texts_col[int(i)].as_py())
        encoded = iter(self.encode(texts))
        lengths = np.zeros(len(flags), np.int64)
        chunks = []
        for i in keep:
            ids = next(encoded)
            ids.append(self.eos)
            chunks.append(ids)
            lengths[i] = len(ids)
        offsets = np.zeros(len(flags) + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((t for c in chunks for t in c), np.int32, count=int(offsets[-1]))
        ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        return batch.drop_columns(["text", "messages"]).append_column("ids", ids)


# ---------------------------------------------------------------------------------------------- driver


def _fingerprint(data: DataConfig, tok_hash: str, order: list) -> str:
    payload = {
        "data": {
            k: v
            for k, v in asdict(data).items()
            if k not in ("output", "num_tokenizer_actors", "tokenizer_actor_cpus", "tokenize_batch_size")
        },
        "tokenizer": tok_hash,
        "units": [[name, unit] for name, unit in order],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _source_error(exc: BaseException) -> BaseException | None:
    """The SourceError inside a Ray task failure, if any."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, sources.SourceError):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    text = str(exc)
    if "SourceError: " in text:
        return sources.SourceError(text.split("SourceError: ", 1)[1].strip().splitlines()[0])
    return None


def prepare(
    data: DataConfig,
    tokenizer_spec: str,
    out_dir: str,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> dict:
    """Prepare shards for ``data`` with the tokenizer of ``tokenizer_spec`` into ``out_dir``; return the manifest.

    Re-running with the same inputs returns the existing manifest, or resumes an interrupted run.
    ``stop_after_shards`` interrupts after that many train shards (``progress.Interrupted``; tests resuming).
    """
    from tqdm.auto import tqdm

    from fastdraft_ray.models.target import load_tokenizer, tokenizer_fingerprint

    t0 = time.time()
    out_dir = out_dir.rstrip("/")
    tok = load_tokenizer(tokenizer_spec, trust_remote_code)
    if tok.eos_token_id is None:
        raise PrepareError(f"tokenizer of {tokenizer_spec} has no EOS token to separate documents")
    tok_hash = tokenizer_fingerprint(tok)
    names = list(data.sources)
    quota = mixture.quotas(names, data.weights, data.token_budget)
    units = {name: sources.plan_units(data.sources[name], seed=data.seed) for name in names}
    order = mixture.interleave(units, quota)
    fp = _fingerprint(data, tok_hash, order)

    done = read_json(f"{out_dir}/manifest.json")
    if done is not None:
        if done.get("fingerprint") == fp:
            log.info("%s is already prepared with these inputs; nothing to do", out_dir)
            return done
        raise PrepareError(
            f"{out_dir} already holds a prepared dataset made from different inputs or tokenizer; "
            "choose another data.output or delete the folder"
        )
    state = read_json(f"{out_dir}/.progress/state.json")
    if state is not None and state["fingerprint"] != fp:
        raise PrepareError(
            f"{out_dir} holds an interrupted prepare of different inputs; delete {out_dir}/.progress "
            "and its shards, or choose another data.output"
        )
    if state is None:
        run = PrepareProgress(out_dir, data, fp, quota, stop_after_shards)
    else:
        run = PrepareProgress.resume(out_dir, data, fp, quota, state, stop_after_shards=stop_after_shards)
        log.info("resuming %s after %d train shards", out_dir, len(run.writers["train"].shards))

    items = [
        {
            "pos": p,
            "src": names.index(name),
            "unit": json.dumps(unit),
            "skip": run.position[1] + 1 if p == run.position[0] else 0,
        }
        for p, (name, unit) in enumerate(order)
        if p >= run.position[0]
    ]
    bar = tqdm(
        total=data.token_budget,
        initial=run.tokens_taken,
        unit="tok",
        unit_scale=True,
        desc=f"prepare {os.path.basename(out_dir)}",
        disable=not progress,
    )
    unit_paths = [unit["path"] for _, unit in order]
    received = [0, 0]  # documents and tokens that came out of the tokenizer pool (this run)
    try:
        stream = _tokenized_stream(items, data, tok, tokenizer_spec, trust_remote_code) if items else []
        for batch in stream:
            received[0] += batch.num_rows
            ids = batch.column("ids").combine_chunks().offsets.to_numpy()
            received[1] += int(ids[-1] - ids[0])
            run.consume(batch, unit_paths, bar.update)
            if run.quotas_met:
                break
    except Interrupted:
        raise
    except Exception as exc:
        err = _source_error(exc)
        if err is not None:
            raise sources.SourceError(str(err)) from None
        raise
    finally:
        bar.close()
    _check_sources(run, log)
    tail = {s: dict(Counter(dict((src, n) for src, n in run.packers[s].segments))) for s in run.packers}
    run.finish()
    if not run.writers["val"].shards and data.val_fraction > 0:
        log.warning("validation split is empty: raise data.val_fraction or data.token_budget")
    manifest = _manifest(run, tok, tokenizer_spec, tok_hash, tail, received, time.time() - t0)
    write_json(f"{out_dir}/manifest.json", manifest)
    run.clear()
    return manifest


def _tokenized_stream(items: list[dict], data: DataConfig, tok, tokenizer_spec: str, trust_remote_code: bool):
    """The Ray Data graph: read units (tasks) -> tokenize (actor pool), in order, bounded ahead of the driver;
    yields pyarrow batches."""
    import ray

    if not ray.is_initialized():
        ray.init()
    cpus = float(ray.cluster_resources().get("CPU", 1))
    actors = max(1, data.num_tokenizer_actors)
    actor_cpus = max(0.05, min(data.tokenizer_actor_cpus, (cpus - 2 * READ_CPUS) / actors))
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(_read_units, batch_size=1, batch_format="numpy", num_cpus=READ_CPUS)
    backend = getattr(tok, "backend_tokenizer", None)
    ctor = (tokenizer_spec, tok.eos_token_id, backend.to_str() if backend is not None else None, trust_remote_code)
    ds = ds.map_batches(
        Tokenize,
        fn_constructor_args=ctor,
        batch_format="pyarrow",
        batch_size=data.tokenize_batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus,
    )
    ds.context.execution_options.preserve_order = True
    ds.context.target_max_block_size = 2 * 1024 * 1024  # small blocks spread one big file over all actors
    ds.context.enable_progress_bars = False
    # Bound how far Ray runs ahead of the driver: work past the point where every quota is met is wasted.
    ds.context.execution_options.resource_limits = ds.context.execution_options.resource_limits.copy(
        object_store_memory=data.max_buffer_mb * 1024 * 1024
    )
    return ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2)


def _check_sources(run: PrepareProgress, logger) -> None:
    """An empty source is an error; one that ran out before its quota, or had invalid UTF-8, a warning."""
    for name, t in run.tallies.items():
        if t.taken == 0:
            raise sources.SourceError(
                f"source {name!r} ({t.spec}) is empty: no usable documents (read {t.seen_documents}; dropped "
                f"{t.dropped['reserved_for_eval']} reserved for evaluation, {t.dropped['duplicate']} duplicates, "
                f"{t.dropped['empty']} empty)"
            )
        if t.taken < t.quota:
            logger.warning(
                "source %r ran out after %d of its %d tokens: proportions will differ from the weights",
                name,
                t.taken,
                t.quota,
            )
    for path, n in sorted(run.replaced_files.items()):
        logger.warning("%s: %d bytes were not valid UTF-8 and were replaced by U+FFFD", path, n)


def _manifest(run: PrepareProgress, tok, tokenizer_spec: str, tok_hash: str, tail, received, seconds) -> dict:
    """``manifest.json`` of a finished prepare (the file contract in docs/design.md)."""
    data, writers, row_len = run.data, run.writers, run.row_len
    split_tokens = {s: dict(run.packers[s].emitted) for s in run.packers}
    rows = {s: sum(x["rows"] for x in writers[s].shards) for s in writers}
    return {
        "format": FORMAT,
        "tokenizer": tokenizer_spec,
        "tokenizer_name_or_path": str(tok.name_or_path),
        "tokenizer_hash": tok_hash,
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "seq_len": data.seq_len,
        "row_len": row_len,
        "column": "input_ids",
        "dtype": "int32",
        "rows": rows,
        "tokens": {s: rows[s] * row_len for s in writers},
        "splits": {
            s: {
                "rows": rows[s],
                "tokens": rows[s] * row_len,
                "documents": sum(t.documents[s] for t in run.tallies.values()),
                "shards": writers[s].shards,
            }
            for s in writers
        },
        "token_budget": data.token_budget,
        "weights": run.weights,
        "sources": mixture.achieved(list(run.tallies.values()), split_tokens),
        "dropped": {
            k: sum(t.dropped[k] for t in run.tallies.values()) for k in ("reserved_for_eval", "duplicate", "empty")
        },
        "dropped_tail_tokens": {s: sum(tail[s].values()) for s in tail},
        "replaced_bytes": dict(run.replaced_files),
        "received_this_run": {"documents": received[0], "tokens": received[1]},
        "fingerprint": run.fp,
        "config": asdict(data),
        "wall_time_s": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
