"""Target-generated distillation data: Ray Data batch inference with the target in an actor pool.

Output folder (``generate.output`` or ``<run_dir>/kd``)::

  config.json                    what was asked (a re-run with other settings is refused)
  magpie/part-NNNNN.parquet      Magpie instructions written by the target (``magpie_prompts > 0``)
  prompts.parquet                the fixed prompt list (selection + Magpie), written once
  responses/<writer>-t<T>/part-NNNNN.parquet   one file per (shard of prompts, temperature): the unit of work
  DONE.json                      counts and timing, once every unit exists

Response rows: ``prompt_id, source, writer, temperature, prompt_ids, response_ids, finished`` and, with
``topk_logprobs = k > 0``, ``topk_ids``/``topk_logprobs`` (``[len(response), k]``: the TARGET's log-softmax at
temperature 1 for every response position -- the distribution the draft should match at any temperature).
``writer`` is ``target``, or ``draft`` for on-policy rows (DistillSpec: the draft wrote the response, the target
scored it). ``temperature = 0.0`` is greedy.

**Exactly once.** Prompts are split into fixed shards; a unit = (writer, temperature, shard) writes its file
atomically (temporary name, then rename) when done. A re-run plans only the units whose file is missing, so an
interrupted job, re-run, yields every (prompt, temperature) exactly once.

**Batched HF backend** (``backend=hf``): one ``model.generate`` per batch with LEFT padding and the KV cache,
sampling from the target's full distribution (``top_k=0``, ``top_p`` from config, no repetition penalty).
Padding does not change a row's distribution; greedy rows can differ from an unpadded greedy run only where fp32
rounding flips a near-tie. ``backend=vllm`` uses ``ray.data.llm`` (needs the ``gpu`` extra and GPUs).
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fastdraft_ray.config import FastDraftConfig, section_settings, to_dict
from fastdraft_ray.distill.actor import GenerateActor, write_atomic
from fastdraft_ray.layout import KDLayout, RunLayout

log = logging.getLogger(__name__)


def _seed(*parts) -> int:
    return zlib.crc32(json.dumps(parts).encode()) & 0x7FFFFFFF


def kd_settings(cfg: FastDraftConfig) -> dict:
    """What KD data depends on: the target, its dtype and the ``generate`` keys that change the rows (speed-only
    keys such as the actor count or batch size may change when a run resumes)."""
    return {
        "target": cfg.model.target,
        "dtype": cfg.model.dtype,
        "generate": section_settings(cfg.generate, "generate"),
    }


def recorded_kd_settings(kd: KDLayout) -> dict | None:
    """The settings a KD folder's ``config.json`` records (read as ``kd_settings`` compares them), None if none."""
    if not kd.config.exists():
        return None
    have = json.loads(kd.config.read_text())
    return {**have, "generate": section_settings(have.get("generate", {}), "generate")}


def check_config(kd: KDLayout, cfg: FastDraftConfig) -> None:
    """Record the settings in the KD folder's ``config.json``; refuse a folder generated with other settings."""
    have, wanted = recorded_kd_settings(kd), kd_settings(cfg)
    if have is None:
        kd.root.mkdir(parents=True, exist_ok=True)
        kd.config.write_text(json.dumps(wanted, indent=1))
    elif have != wanted:
        raise ValueError(
            f"{kd.root} holds KD data generated with other settings ({kd.config}); use another generate.output "
            "(or delete the folder) to generate with these"
        )


def run_units(cfg: FastDraftConfig, units: list[dict], draft: str | None) -> list[dict]:
    """Run units through the actor pool; returns one summary row per unit."""
    import ray

    if not units:
        return []
    g = cfg.generate
    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
    ds = ds.map_batches(
        GenerateActor,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=max(1, min(g.num_actors, len(units)))),
        num_cpus=g.cpus_per_actor,
        num_gpus=1 if g.use_gpu else 0,
        fn_constructor_kwargs={
            "target": cfg.model.target,
            "dtype": cfg.model.dtype,
            "cpus": g.cpus_per_actor,
            "use_gpu": g.use_gpu,
            "gen": to_dict(g),
            "draft": draft,
        },
    )
    return ds.take_all()


def _magpie_phase(cfg: FastDraftConfig, kd: KDLayout, tokenizer, max_units: int | None) -> list[str] | None:
    """Magpie instructions (oversampled 1.5x to survive filtering); None if interrupted by ``max_units``."""
    from fastdraft_ray.distill.magpie import prefix_ids

    g = cfg.generate
    per_unit = max(1, g.shard_prompts)
    n_units = math.ceil(1.5 * g.magpie_prompts / per_unit)
    prefix = prefix_ids(tokenizer)
    units = [
        {
            "kind": "magpie",
            "n": per_unit,
            "seed": _seed(g.seed, "magpie", i),
            "prefix_ids": prefix,
            "path": str(kd.magpie_part(i)),
        }
        for i in range(n_units)
    ]
    pending = [u for u in units if not Path(u["path"]).exists()]
    if max_units is not None and len(pending) > max_units:
        run_units(cfg, pending[:max_units], None)
        return None
    run_units(cfg, pending, None)
    return [t for u in units for t in pq.read_table(u["path"]).column("text").to_pylist()]


def _prompt_table(cfg: FastDraftConfig, tokenizer, magpie_texts: list[str]) -> pa.Table:
    from fastdraft_ray.data.holdout import normalise
    from fastdraft_ray.distill.magpie import select_instructions
    from fastdraft_ray.distill.prompts import Prompt, encode_prompt, load_prompts

    g = cfg.generate
    prompts = (
        load_prompts(
            g.prompt_sources,
            tokenizer,
            g.num_prompts,
            seed=g.seed,
            max_prompt_tokens=g.max_prompt_tokens,
            min_chars=g.min_prompt_chars,
        )
        if g.num_prompts > 0
        else []
    )
    seen = {normalise(p.message) for p in prompts}
    magpie = select_instructions(magpie_texts, g.magpie_prompts, g.min_prompt_chars, exclude=seen)
    if len(magpie) < g.magpie_prompts:
        log.warning("Magpie gave %d usable instructions of %d asked", len(magpie), g.magpie_prompts)
    for i, text in enumerate(magpie):
        ids = encode_prompt(tokenizer, text)
        if len(ids) <= g.max_prompt_tokens:
            prompts.append(Prompt(f"magpie:{i}", "magpie", text, None, ids))
    n_draft = round(g.onpolicy_fraction * len(prompts))
    order = np.random.default_rng(_seed(g.seed, "onpolicy")).permutation(len(prompts))
    on_policy = set(order[:n_draft].tolist())
    return pa.table(
        {
            "prompt_id": [p.id for p in prompts],
            "source": [p.source for p in prompts],
            "message": [p.message for p in prompts],
            "reference": pa.array([p.reference for p in prompts], pa.string()),
            "prompt_ids": pa.array([p.prompt_ids for p in prompts], pa.list_(pa.int32())),
            "writer": ["draft" if i in on_policy else "target" for i in range(len(prompts))],
        }
    )


def response_units(cfg: FastDraftConfig, kd: KDLayout, prompts: pa.Table) -> list[dict]:
    """Every (writer, temperature, shard) unit of the run, in a fixed order."""
    g = cfg.generate
    rows = prompts.to_pylist()
    units = []
    for writer in ("target", "draft"):
        mine = [r for r in rows if r["writer"] == writer]
        for temp in sorted(g.temperatures):  # greedy first: the most useful rows if a run is cut short
            for s, start in enumerate(range(0, len(mine), g.shard_prompts)):
                shard = mine[start : start + g.shard_prompts]
                units.append(
                    {
                        "kind": "respond",
                        "writer": writer,
                        "temperature": float(temp),
                        "seed": _seed(g.seed, writer, float(temp), s),
                        "prompt_id": [r["prompt_id"] for r in shard],
                        "source": [r["source"] for r in shard],
                        "prompt_ids": [r["prompt_ids"] for r in shard],
                        "path": str(kd.response_part(writer, temp, s)),
                    }
                )
    return units


def run_generation(
    cfg: FastDraftConfig, *, onpolicy_draft: str | None = None, max_units: int | None = None, processor=None
) -> dict:
    """Generate (or finish generating) the KD data of ``cfg``; returns the DONE.json record.

    ``onpolicy_draft``: the draft that writes on-policy rows when ``generate.onpolicy_draft`` names none (the
    pipeline passes the export FT starts from). ``max_units`` stops after that many pending units (a controlled
    interruption; returns ``{"done": False}``). ``processor``: what ``backend=vllm`` sends its rows through
    (default: vLLM engines; tests: the HF stand-in, ``vllm_backend.hf_processor``).
    """
    from fastdraft_ray.models.target import load_tokenizer

    g = cfg.generate
    started = time.time()
    layout = RunLayout.of(cfg)
    kd = layout.kd
    check_config(kd, cfg)
    tokenizer = load_tokenizer(cfg.model.target, cfg.model.trust_remote_code)
    prompts_path = kd.prompts
    if not prompts_path.exists():
        magpie_texts: list[str] = []
        if g.magpie_prompts > 0:
            magpie_texts = _magpie_phase(cfg, kd, tokenizer, max_units)
            if magpie_texts is None:
                return {"done": False}
        write_atomic(_prompt_table(cfg, tokenizer, magpie_texts), str(prompts_path))
    prompts = pq.read_table(prompts_path)
    units = response_units(cfg, kd, prompts)
    pending = [u for u in units if not Path(u["path"]).exists()]
    log.info("KD data: %d prompts, %d units, %d pending", prompts.num_rows, len(units), len(pending))
    draft = None
    if any(u["writer"] == "draft" for u in pending):
        draft = g.onpolicy_draft or onpolicy_draft
        if not draft or not Path(draft, "config.json").exists():
            raise ValueError(
                f"on-policy generation needs a draft; {draft} is not an HF folder (set generate.onpolicy_draft)"
            )
    if max_units is not None:
        pending = pending[:max_units]
    if g.backend == "vllm":
        from fastdraft_ray.distill.vllm_backend import run_vllm_units

        run_vllm_units(cfg, pending, processor)
    else:
        run_units(cfg, pending, draft)
    if any(not Path(u["path"]).exists() for u in units):
        return {"done": False}
    record = summarize(kd.root, units)
    record["wall_time_s"] = round(time.time() - started, 1)
    kd.done.write_text(json.dumps(record, indent=1))
    return record


def summarize(out: Path, units: list[dict]) -> dict:
    """Counts over the finished response files."""
    by_temp: dict[str, dict] = {}
    for u in units:
        table = pq.read_table(u["path"], columns=["response_ids", "finished"])
        lengths = [len(r) for r in table.column("response_ids").to_pylist()]
        key = f"{u['writer']}-t{u['temperature']:.2f}"
        entry = by_temp.setdefault(key, {"rows": 0, "tokens": 0, "finished": 0})
        entry["rows"] += len(lengths)
        entry["tokens"] += sum(lengths)
        entry["finished"] += int(sum(table.column("finished").to_pylist()))
    return {
        "done": True,
        "output": str(out),
        "rows": sum(v["rows"] for v in by_temp.values()),
        "tokens": sum(v["tokens"] for v in by_temp.values()),
        "by_writer_temperature": by_temp,
    }


def read_kd(out: str | Path) -> pa.Table:
    """All response rows of a KD folder (every writer and temperature) as one table."""
    files = KDLayout(Path(out)).response_files()
    if not files:
        raise FileNotFoundError(f"{out} has no KD responses: run jobs/generate.py first")
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
