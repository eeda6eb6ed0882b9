"""``GenerateActor``: the Ray Data callable class that runs one KD unit of work and writes its file atomically."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fastdraft_ray.config import GenerateConfig
from fastdraft_ray.models.batched import generate_batch, sample_batch, score_topk
from fastdraft_ray.models.prompting import pad_token_id, stop_token_ids


class GenerateActor:
    """Ray Data callable class: one target (and, for on-policy units, one draft) per actor; ``__call__`` runs
    one unit (a batch of one row holding the unit as JSON) and writes its file atomically."""

    def __init__(self, target: str, dtype: str, cpus: int, use_gpu: bool, gen: dict, draft: str | None = None):
        from fastdraft_ray.models.target import load_target

        torch.set_num_threads(max(1, int(cpus)))
        device = "cuda" if use_gpu else "cpu"
        self.model, self.tokenizer = load_target(target, dtype=dtype, device=device)
        self.draft = None
        if draft:
            from fastdraft_ray.models.draft import (
                load_draft,
            )  # trimmed-head drafts: the locally registered classes

            self.draft = load_draft(draft, dtype=self.model.dtype).to(device)
        self.gen = GenerateConfig(**gen)
        self.pad, self.eos = pad_token_id(self.tokenizer), stop_token_ids(self.tokenizer, self.model)

    def __call__(self, batch: dict) -> dict:
        out = {"path": [], "rows": [], "tokens": [], "seconds": []}
        for raw in batch["unit"]:
            unit = json.loads(raw)
            t0 = time.perf_counter()
            table, tokens = self._magpie(unit) if unit["kind"] == "magpie" else self._respond(unit)
            write_atomic(table, unit["path"])
            seconds = time.perf_counter() - t0
            out["path"].append(unit["path"])
            out["rows"].append(table.num_rows)
            out["tokens"].append(tokens)
            out["seconds"].append(seconds)
            # progress in the job's log (Ray forwards actor stdout; Ray Data's bars need a terminal)
            name = "/".join(Path(unit["path"]).parts[-2:])
            print(f"KD unit {name}: {table.num_rows} rows, {tokens} tokens in {seconds:.0f} s", flush=True)
        return {k: np.array(v) for k, v in out.items()}

    def _generate(self, model, prompts: list[list[int]], temperature: float, max_new: int):
        # batches of similar length: left padding to a long prompt makes every short one pay its prefill
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results = [None] * len(prompts)
        # the draft writes on-policy rows in the lean loop: generate()'s per-step overhead dwarfs its forward
        sampler = sample_batch if model is self.draft else generate_batch
        for start in range(0, len(order), self.gen.batch_size):
            idx = order[start : start + self.gen.batch_size]
            batch = sampler(
                model,
                [prompts[i] for i in idx],
                temperature=temperature,
                max_new_tokens=max_new,
                pad=self.pad,
                eos=self.eos,
                top_p=self.gen.top_p,
            )
            for i, result in zip(idx, batch, strict=True):
                results[i] = result
        return results

    def _magpie(self, unit: dict) -> tuple[pa.Table, int]:
        """Instructions continued from the user-turn prefix; only those that reached end-of-turn are kept."""
        torch.manual_seed(unit["seed"])
        prefix = unit["prefix_ids"]
        g = self.gen
        results = self._generate(self.model, [prefix] * unit["n"], g.magpie_temperature, g.magpie_max_tokens)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids, finished in results if finished]
        return pa.table({"text": pa.array(texts, pa.string())}), sum(len(r) for r, _ in results)

    def _respond(self, unit: dict) -> tuple[pa.Table, int]:
        torch.manual_seed(unit["seed"])
        prompts = unit["prompt_ids"]
        writer = self.draft if unit["writer"] == "draft" else self.model
        if writer is None:
            raise RuntimeError("an on-policy unit reached an actor without a draft")
        results = self._generate(writer, prompts, unit["temperature"], self.gen.max_new_tokens)
        responses = [r for r, _ in results]
        cols = {
            "prompt_id": pa.array(unit["prompt_id"], pa.string()),
            "source": pa.array(unit["source"], pa.string()),
            "writer": pa.array([unit["writer"]] * len(prompts), pa.string()),
            "temperature": pa.array([unit["temperature"]] * len(prompts), pa.float32()),
            "prompt_ids": pa.array(prompts, pa.list_(pa.int32())),
            "response_ids": pa.array(responses, pa.list_(pa.int32())),
            "finished": pa.array([f for _, f in results], pa.bool_()),
        }
        k = self.gen.topk_logprobs
        if k:
            scored = score_topk(self.model, prompts, responses, k, pad=self.pad)
            cols["topk_ids"] = pa.array([s[0].tolist() for s in scored], pa.list_(pa.list_(pa.int32())))
            cols["topk_logprobs"] = pa.array([s[1].tolist() for s in scored], pa.list_(pa.list_(pa.float32())))
        return pa.table(cols), sum(len(r) for r in responses)


def write_atomic(table: pa.Table, path: str) -> None:
    """Write ``table`` to ``path`` under a temporary name, then rename: a unit's file exists only when complete."""
    tmp = f"{path}.{os.getpid()}.part"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
