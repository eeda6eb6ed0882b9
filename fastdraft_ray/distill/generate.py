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
import os
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fastdraft_ray.config import GenerateConfig, RunConfig, to_dict

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ kernels


def eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends a response (tokenizer EOS + the model's generation-config EOS)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    if not ids:
        raise ValueError("the target defines no EOS token: responses would never end")
    return sorted(ids)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def generate_batch(
    model,
    prompts: list[list[int]],
    *,
    temperature: float,
    max_new_tokens: int,
    pad: int,
    eos: list[int],
    top_p: float = 1.0,
) -> list[tuple[list[int], bool]]:
    """Responses to left-padded ``prompts`` in one KV-cached ``generate`` call: ``[(ids incl. EOS, finished)]``."""
    from transformers import GenerationConfig

    sample = temperature > 0
    sampling = {"do_sample": False}
    if sample:  # HF's default top_k=50 would truncate the target's distribution: top_k=0 turns it off
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p}
    gen = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, **sampling)
    ids, mask = _left_pad(prompts, pad)
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
    out = out[:, ids.shape[1] :].cpu().tolist()
    stops, results = set(eos), []
    for row in out:
        end = next((j for j, t in enumerate(row) if t in stops), None)
        results.append((row[: end + 1], True) if end is not None else (row, False))
    return results


@torch.no_grad()
def score_topk(
    model, prompts: list[list[int]], responses: list[list[int]], k: int, *, pad: int, chunk: int = 4
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``model``'s top-``k`` next-token ids and log-probs (temperature 1) at every response position:
    ``[(ids int32 [len(r), k], logprobs float32 [len(r), k])]``. Teacher-forced, left-padded, in ``chunk`` rows."""
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(prompts), chunk):
        ps, rs = prompts[start : start + chunk], responses[start : start + chunk]
        seqs = [list(p) + list(r) for p, r in zip(ps, rs, strict=True)]
        ids, mask = _left_pad(seqs, pad)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        r_max = max(len(r) for r in rs)
        kwargs = dict(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device)
        )
        try:
            logits = model(**kwargs, logits_to_keep=r_max + 1).logits
        except TypeError:  # a model class without logits_to_keep
            logits = model(**kwargs).logits[:, -(r_max + 1) :]
        for i, r in enumerate(rs):
            if not r:
                results.append((np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)))
                continue
            lp = torch.log_softmax(logits[i, r_max - len(r) : r_max].float(), dim=-1)
            top = lp.topk(k, dim=-1)
            results.append(
                (top.indices.cpu().numpy().astype(np.int32), top.values.cpu().numpy().astype(np.float32))
            )
    return results


# ------------------------------------------------------------------------------------------------ the actor


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
            from transformers import AutoModelForCausalLM

            self.draft = AutoModelForCausalLM.from_pretrained(draft, dtype=self.model.dtype).to(device).eval()
        self.gen = GenerateConfig(**gen)
        self.pad, self.eos = pad_id(self.tokenizer), eos_ids(self.model, self.tokenizer)

    def __call__(self, batch: dict) -> dict:
        out = {"path": [], "rows": [], "tokens": [], "seconds": []}
        for raw in batch["unit"]:
            unit = json.loads(raw)
            t0 = time.perf_counter()
            table, tokens = self._magpie(unit) if unit["kind"] == "magpie" else self._respond(unit)
            _write_atomic(table, unit["path"])
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
        for start in range(0, len(order), self.gen.batch_size):
            idx = order[start : start + self.gen.batch_size]
            batch = generate_batch(
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


def _write_atomic(table: pa.Table, path: str) -> None:
    tmp = f"{path}.{os.getpid()}.part"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ planning


def output_dir(cfg: RunConfig) -> Path:
    """``generate.output`` or ``<run_dir>/kd``."""
    return Path(cfg.generate.output or f"{cfg.run_dir}/kd").expanduser().resolve()


def _seed(*parts) -> int:
    return zlib.crc32(json.dumps(parts).encode()) & 0x7FFFFFFF


def check_config(out: Path, cfg: RunConfig) -> None:
    """Record the settings in ``out/config.json``; refuse a folder generated with other settings."""
    wanted = {"target": cfg.model.target, "dtype": cfg.model.dtype, "generate": to_dict(cfg.generate)}
    for key in ("num_actors", "cpus_per_actor", "use_gpu", "batch_size", "backend"):  # may change on resume
        wanted["generate"].pop(key)
    path = out / "config.json"
    if path.exists():
        have = json.loads(path.read_text())
        if have != wanted:
            raise ValueError(
                f"{out} holds KD data generated with other settings ({path}); use another generate.output "
                "(or delete the folder) to generate with these"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=1))


def _run_units(cfg: RunConfig, units: list[dict], draft: str | None) -> list[dict]:
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


def _magpie_phase(cfg: RunConfig, out: Path, tokenizer, max_units: int | None) -> list[str] | None:
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
            "path": str(out / "magpie" / f"part-{i:05d}.parquet"),
        }
        for i in range(n_units)
    ]
    pending = [u for u in units if not Path(u["path"]).exists()]
    if max_units is not None and len(pending) > max_units:
        _run_units(cfg, pending[:max_units], None)
        return None
    _run_units(cfg, pending, None)
    return [t for u in units for t in pq.read_table(u["path"]).column("text").to_pylist()]


def _prompt_table(cfg: RunConfig, tokenizer, magpie_texts: list[str]) -> pa.Table:
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


def response_units(cfg: RunConfig, out: Path, prompts: pa.Table) -> list[dict]:
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
                        "path": str(out / "responses" / f"{writer}-t{float(temp):.2f}" / f"part-{s:05d}.parquet"),
                    }
                )
    return units


def run_generation(cfg: RunConfig, *, max_units: int | None = None) -> dict:
    """Generate (or finish generating) the KD data of ``cfg``; returns the DONE.json record.

    ``max_units`` stops after that many pending units (a controlled interruption; returns ``{"done": False}``).
    """
    from fastdraft_ray.models.target import load_tokenizer

    g = cfg.generate
    started = time.time()
    if g.backend not in ("hf", "vllm"):
        raise ValueError(f"generate.backend must be hf or vllm, got {g.backend!r}")
    if not g.temperatures or any(t < 0 for t in g.temperatures):
        raise ValueError(f"generate.temperatures must be a non-empty list of values >= 0, got {g.temperatures}")
    if not 0.0 <= g.onpolicy_fraction <= 1.0:
        raise ValueError("generate.onpolicy_fraction must lie in [0, 1]")
    if g.onpolicy_fraction > 0 and g.topk_logprobs <= 0:
        raise ValueError("on-policy rows are learned from the target's scores: set generate.topk_logprobs > 0")
    out = output_dir(cfg)
    check_config(out, cfg)
    tokenizer = load_tokenizer(cfg.model.target, cfg.model.trust_remote_code)
    prompts_path = out / "prompts.parquet"
    if not prompts_path.exists():
        magpie_texts: list[str] = []
        if g.magpie_prompts > 0:
            magpie_texts = _magpie_phase(cfg, out, tokenizer, max_units)
            if magpie_texts is None:
                return {"done": False}
        _write_atomic(_prompt_table(cfg, tokenizer, magpie_texts), str(prompts_path))
    prompts = pq.read_table(prompts_path)
    units = response_units(cfg, out, prompts)
    pending = [u for u in units if not Path(u["path"]).exists()]
    log.info("KD data: %d prompts, %d units, %d pending", prompts.num_rows, len(units), len(pending))
    draft = None
    if any(u["writer"] == "draft" for u in pending):
        draft = g.onpolicy_draft or f"{cfg.run_dir}/cp/export"
        if not Path(draft, "config.json").exists():
            raise ValueError(
                f"on-policy generation needs a draft; {draft} is not an HF folder (set generate.onpolicy_draft)"
            )
    if max_units is not None:
        pending = pending[:max_units]
    if g.backend == "vllm":
        from fastdraft_ray.distill.vllm_backend import run_vllm_units

        run_vllm_units(cfg, pending)
    else:
        _run_units(cfg, pending, draft)
    if any(not Path(u["path"]).exists() for u in units):
        return {"done": False}
    record = summarize(out, units)
    record["wall_time_s"] = round(time.time() - started, 1)
    (out / "DONE.json").write_text(json.dumps(record, indent=1))
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
    files = sorted(Path(out).glob("responses/*/part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{out} has no KD responses: run jobs/generate.py first")
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
