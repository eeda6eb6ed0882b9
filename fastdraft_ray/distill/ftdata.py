"""KD data -> FT training shards: one fixed-width row per (prompt, response) example (see ``train/kd_rows.py``).

The shards use the token-shard folder format (``manifest.json`` + ``<split>/part-NNNNN.parquet`` with one
``input_ids`` column of fixed-size int32 lists), so the FT stage streams, orders and resumes them exactly like
PT/CP shards. Extra manifest keys: ``kd_layout`` (row layout; tells the training loop to use the FT loss) and
``build`` (what the rows were made from).

* ``responses="target"``: every row of the KD folder; rows with the same prompt and response (e.g. greedy and a
  low temperature agreeing) are kept once; on-policy rows (written by the draft) are marked not-hard.
* ``responses="original"``: the baseline -- the SAME prompts (the KD folder's ``prompts.parquet``) with their
  datasets' own responses (+ EOS); prompts without one (Magpie) are skipped.

Train/val split by prompt: all responses to one prompt land in the same split.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from fastdraft_ray.config import FastDraftConfig
from fastdraft_ray.data.packing import ShardWriter
from fastdraft_ray.layout import KDLayout
from fastdraft_ray.train.kd_rows import FORMAT, RowLayout


def _examples_target(kd_dir: Path, topk: int):
    from fastdraft_ray.distill.generate import read_kd

    table = read_kd(kd_dir)
    has_topk = "topk_ids" in table.column_names
    if topk and not has_topk:
        raise ValueError(f"{kd_dir} has no top-k log-probs: re-generate with generate.topk_logprobs > 0")
    seen = set()
    for row in table.to_pylist():
        key = hashlib.sha1(json.dumps([row["prompt_ids"], row["response_ids"]]).encode()).digest()
        if key in seen or not row["response_ids"]:
            continue
        seen.add(key)
        extra = {}
        if topk:
            extra = {
                "topk_ids": np.asarray(row["topk_ids"], np.int32).reshape(-1, len(row["topk_ids"][0])),
                "topk_logprobs": np.asarray(row["topk_logprobs"], np.float32).reshape(-1, len(row["topk_ids"][0])),
            }
        yield row["prompt_id"], row["prompt_ids"], row["response_ids"], row["writer"] == "target", extra


def _examples_original(kd_dir: Path, tokenizer):
    path = kd_dir / "prompts.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run jobs/generate.py first (it fixes the prompt list)")
    for row in pq.read_table(path).to_pylist():
        if row["reference"]:
            ids = list(tokenizer(row["reference"], add_special_tokens=False)["input_ids"]) + [
                tokenizer.eos_token_id
            ]
            yield row["prompt_id"], row["prompt_ids"], ids, True, {}


def _is_val(prompt_id: str, val_fraction: float) -> bool:
    return zlib.crc32(prompt_id.encode()) % 10_000 < val_fraction * 10_000


def build_ft_rows(
    kd_dir: str | Path,
    out_dir: str | Path,
    tokenizer,
    *,
    seq_len: int,
    topk: int = 0,
    responses: str = "target",
    val_fraction: float = 0.05,
    rows_per_shard: int = 2048,
    seed: int = 0,
) -> dict:
    """Write FT row shards for ``kd_dir`` into ``out_dir``; returns the manifest. Reuses an identical build and
    refuses to overwrite a different one."""
    from fastdraft_ray.models.target import tokenizer_fingerprint

    kd_dir, out_dir = Path(kd_dir).resolve(), Path(out_dir)
    if responses not in ("target", "original"):
        raise ValueError(f"train.ft_responses must be target or original, got {responses!r}")
    layout = RowLayout(seq_len, topk if responses == "target" else 0)
    build = {
        "kd_dir": str(kd_dir),
        "responses": responses,
        "layout": layout.to_dict(),
        "val_fraction": val_fraction,
        "seed": seed,
    }
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("build") != build:
            raise ValueError(
                f"{out_dir} holds FT rows built differently ({manifest.get('build')}); use another data.name"
            )
        return manifest
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = (
        _examples_target(kd_dir, layout.topk) if responses == "target" else _examples_original(kd_dir, tokenizer)
    )
    rows = {"train": [], "val": []}
    dropped = 0
    for prompt_id, prompt_ids, response_ids, hard, extra in examples:
        row = layout.encode(prompt_ids, response_ids, pad, hard=hard, **extra)
        if row is None:
            dropped += 1
            continue
        rows["val" if _is_val(prompt_id, val_fraction) else "train"].append(row)
    if not rows["train"]:
        raise ValueError(f"no FT training rows from {kd_dir} ({responses} responses, seq_len {seq_len})")
    splits = {}
    for split, items in rows.items():
        if not items:
            continue
        block = np.stack(items)[np.random.default_rng([seed, len(split)]).permutation(len(items))]
        writer = ShardWriter(str(out_dir), split, rows_per_shard)
        writer.add(block)
        writer.flush()
        tokens = int(block[:, seq_len + 1 : 2 * seq_len + 1].sum())  # response (loss) tokens
        splits[split] = {"rows": len(items), "tokens": tokens, "documents": len(items), "shards": writer.shards}
    manifest = {
        "format": FORMAT,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "tokenizer_hash": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "seq_len": seq_len,
        "row_len": layout.width,
        "column": "input_ids",
        "dtype": "int32",
        "rows": {s: v["rows"] for s, v in splits.items()},
        "tokens": {s: v["tokens"] for s, v in splits.items()},
        "splits": splits,
        "kd_layout": layout.to_dict(),
        "build": build,
        "dropped_too_long": dropped,
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def kd_topk(kd_dir: Path) -> int:
    """k of the top-k log-probs stored in a KD folder (0 if it has none)."""
    files = KDLayout(Path(kd_dir)).response_files()
    if not files or "topk_ids" not in pq.read_schema(files[0]).names:
        return 0
    first = pq.read_table(files[0], columns=["topk_ids"]).column("topk_ids").to_pylist()
    return next((len(r[0]) for r in first if r), 0)


def build_ft_data(cfg: FastDraftConfig, kd_dir: Path, data_dir: str | Path) -> dict:
    """FT row shards from the KD folder (``cfg`` with the ``ft`` stage applied); returns their manifest."""
    from fastdraft_ray.models.target import load_tokenizer

    if not KDLayout(Path(kd_dir)).done.exists():
        raise FileNotFoundError(
            f"no finished KD data in {kd_dir}: run the generate stage (jobs/generate.py) first"
        )
    return build_ft_rows(
        kd_dir,
        data_dir,
        load_tokenizer(cfg.model.target, cfg.model.trust_remote_code),
        seq_len=cfg.data.seq_len,
        topk=kd_topk(kd_dir) if cfg.train.kd_loss != "ce" else 0,
        responses=cfg.train.ft_responses,
        val_fraction=cfg.data.val_fraction,
        rows_per_shard=cfg.data.rows_per_shard,
        seed=cfg.data.seed,
    )
