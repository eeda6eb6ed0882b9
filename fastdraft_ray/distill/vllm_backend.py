"""vLLM backend for KD generation (``generate.backend=vllm``) through ``ray.data.llm``: the engine runs on GPUs;
everything around it runs here, the same way with any processor behind the same interface.

- **Rows**: one per (unit, prompt), each with its own sampling seed (a function of the run's seed, the unit and
  the row: samples of one prompt at one temperature are independent), ``max_tokens``, the stop tokens of
  ``models.prompting.stop_token_ids`` (what the HF backend stops at), and the unit's temperature.
- **One processor for every unit**: ``ray.data.llm``'s ``vLLMEngineProcessorConfig`` with ``max_model_len`` =
  the longest prompt + answer the run allows (vLLM would otherwise reserve the model's whole context, 128k
  tokens for Llama-3.1), ``generate.num_actors`` engines of one GPU each.
- **Streaming writes**: results are read as they finish (``iter_batches``) and a unit's file is written, atomically,
  as soon as its last prompt is answered, so an interruption loses only unfinished units; a re-run plans only the
  units whose file is missing (the HF backend's contract, ``distill/generate.py``). Regrouping is one dict lookup
  per answer.

``processor`` (default: ``vllm_processor``) turns a Ray Dataset of rows into a Dataset with ``generated_tokens``;
the tests put the HF stand-in (``hf_processor``) behind it to check all of the above on CPU. Top-k log-probs and
on-policy units are HF-backend only (refused at config load).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from fastdraft_ray.config import FastDraftConfig

Processor = Callable[[object], object]  # ray.data.Dataset of rows -> Dataset with a generated_tokens column


def row_seed(unit_seed: int, row: int) -> int:
    """The sampling seed of one prompt of a unit: distinct per (run seed, writer, temperature, shard, row)."""
    return int.from_bytes(hashlib.sha256(f"{unit_seed}/{row}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def unit_rows(units: list[dict], max_tokens: int, stop_ids: list[int]) -> list[dict]:
    """One row per (unit, prompt) in unit order: what the processor reads."""
    return [
        {
            "unit": i,
            "row": j,
            "prompt_token_ids": list(ids),
            "sampling_params": {
                "temperature": float(unit["temperature"]),
                "top_p": 1.0,  # replaced by generate.top_p when sampling (vllm_processor / hf_processor)
                "max_tokens": max_tokens,
                "seed": row_seed(unit["seed"], j),
                "stop_token_ids": list(stop_ids),
            },
        }
        for i, unit in enumerate(units)
        for j, ids in enumerate(unit["prompt_ids"])
    ]


def response_table(unit: dict, responses: list[list[int]], finished: list[bool]) -> pa.Table:
    """A response unit's rows (the schema of ``distill/generate.py``)."""
    n = len(responses)
    return pa.table(
        {
            "prompt_id": pa.array(unit["prompt_id"], pa.string()),
            "source": pa.array(unit["source"], pa.string()),
            "writer": pa.array([unit["writer"]] * n, pa.string()),
            "temperature": pa.array([unit["temperature"]] * n, pa.float32()),
            "prompt_ids": pa.array(unit["prompt_ids"], pa.list_(pa.int32())),
            "response_ids": pa.array(responses, pa.list_(pa.int32())),
            "finished": pa.array(finished, pa.bool_()),
        }
    )


def write_as_finished(results, units: list[dict], max_tokens: int, stop_ids: list[int]) -> int:
    """Read ``results`` (a Dataset of ``unit``, ``row``, ``generated_tokens``) as it streams and write each unit's
    file as soon as all its prompts are answered; returns the number of units written."""
    from fastdraft_ray.distill.actor import write_atomic

    waiting = {i: {} for i in range(len(units))}
    stops, written = set(stop_ids), 0
    # block by block, nothing prefetched: what finished is written even when a later block fails
    for batch in results.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        for i, j, tokens in zip(batch["unit"], batch["row"], batch["generated_tokens"], strict=True):
            got = waiting[int(i)]
            got[int(j)] = [int(t) for t in np.asarray(tokens).tolist()]
            unit = units[int(i)]
            if len(got) == len(unit["prompt_ids"]):
                responses = [got[r] for r in range(len(got))]
                finished = [len(r) < max_tokens or (bool(r) and r[-1] in stops) for r in responses]
                write_atomic(response_table(unit, responses, finished), unit["path"])
                del waiting[int(i)]
                written += 1
    return written


def _check_available(cfg: FastDraftConfig) -> None:
    try:
        import vllm  # noqa: F401
        from ray.data.llm import build_llm_processor, vLLMEngineProcessorConfig  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"generate.backend=vllm needs vLLM and ray.data.llm ({exc}); install the gpu extra, or use backend=hf"
        ) from None
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        raise RuntimeError("generate.backend=vllm needs GPUs in the Ray cluster; use backend=hf on CPU")


def vllm_processor(cfg: FastDraftConfig) -> Processor:
    """``ray.data.llm``'s vLLM processor for this run (one GPU per engine, ``generate.num_actors`` engines)."""
    from ray.data.llm import build_llm_processor, vLLMEngineProcessorConfig

    from fastdraft_ray.models.target import resolve_target

    _check_available(cfg)
    g = cfg.generate
    model_source, gguf = resolve_target(cfg.model.target)
    if gguf:
        raise RuntimeError("backend=vllm needs an HF folder or hub id as model.target, not a .gguf file")
    return build_llm_processor(
        vLLMEngineProcessorConfig(
            model_source=model_source,
            engine_kwargs={
                "dtype": cfg.model.dtype,
                "max_model_len": g.max_prompt_tokens + g.max_new_tokens,
                "trust_remote_code": cfg.model.trust_remote_code,
            },
            concurrency=g.num_actors,
            batch_size=g.batch_size,
            apply_chat_template=False,
            tokenize=False,
            detokenize=False,
        ),
        preprocess=lambda r: {
            **r,
            "prompt": "",
            "tokenized_prompt": r["prompt_token_ids"],
            "sampling_params": _sampling(r["sampling_params"], g.top_p),
        },
        postprocess=lambda r: {
            "unit": r["unit"],
            "row": r["row"],
            "generated_tokens": list(r["generated_tokens"]),
        },
    )


def _sampling(params: dict, top_p: float) -> dict:
    greedy = params["temperature"] == 0.0
    return {**params, "top_p": 1.0 if greedy else top_p, "top_k": -1}


class HFRows:
    """The HF stand-in behind the processor interface (tests, CPU): each row generated alone with the target,
    seeded with the row's seed, stopping at its stop tokens; output columns as vLLM's processor gives them.
    ``crash_after`` rows it fails (an interruption mid-stream), a moment after its earlier answers went out."""

    def __init__(self, target: str, dtype: str, top_p: float, crash_after: int | None = None):
        from fastdraft_ray.models.target import load_target

        self.model, _ = load_target(target, dtype=dtype)
        self.top_p, self.crash_after, self.done = top_p, crash_after, 0

    def __call__(self, batch: dict) -> dict:
        import time

        import torch

        if self.crash_after is not None and self.done >= self.crash_after:
            time.sleep(2)  # the answers already produced reach the reader first
            raise RuntimeError(f"planted interruption after {self.crash_after} rows")
        self.done += len(batch["row"])
        out = []
        for ids, params in zip(batch["prompt_token_ids"], batch["sampling_params"], strict=True):
            p = _sampling(params, self.top_p)
            torch.manual_seed(int(p["seed"]))
            sample = p["temperature"] > 0
            generated = self.model.generate(
                torch.tensor([list(ids)]),
                max_new_tokens=int(p["max_tokens"]),
                do_sample=sample,
                **({"temperature": p["temperature"], "top_p": p["top_p"], "top_k": 0} if sample else {}),
                eos_token_id=list(p["stop_token_ids"]),
                pad_token_id=int(p["stop_token_ids"][0]),
            )[0, len(ids) :].tolist()
            out.append(generated)
        return {"unit": batch["unit"], "row": batch["row"], "generated_tokens": np.array(out, dtype=object)}


def hf_processor(cfg: FastDraftConfig, crash_after_rows: int | None = None) -> Processor:
    """The HF stand-in as a processor: one actor answering one row at a time (``HFRows``)."""
    import ray

    kwargs = {"target": cfg.model.target, "dtype": cfg.model.dtype, "top_p": cfg.generate.top_p}

    def process(rows):
        return rows.map_batches(
            HFRows,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=1),
            fn_constructor_kwargs={**kwargs, "crash_after": crash_after_rows},
        )

    return process


def run_vllm_units(cfg: FastDraftConfig, units: list[dict], processor: Processor | None = None) -> int:
    """Generate the response units through ``processor`` (default: vLLM engines); returns the units written."""
    import ray

    from fastdraft_ray.models.prompting import stop_token_ids
    from fastdraft_ray.models.target import load_generation_config, load_tokenizer

    if any(u["writer"] == "draft" for u in units):
        raise RuntimeError("on-policy units are produced by backend=hf only")
    if not units:
        return 0
    g = cfg.generate
    stop_ids = stop_token_ids(
        load_tokenizer(cfg.model.target, cfg.model.trust_remote_code), load_generation_config(cfg.model.target)
    )
    for unit in units:
        Path(unit["path"]).parent.mkdir(parents=True, exist_ok=True)
    rows = unit_rows(units, g.max_new_tokens, stop_ids)  # about one block per unit: answers stream unit by unit
    rows = ray.data.from_items(rows, override_num_blocks=min(len(rows), len(units)))
    results = (processor or vllm_processor(cfg))(rows)
    return write_as_finished(results, units, g.max_new_tokens, stop_ids)
