"""Evaluation driver: speculative decoding of the target with each draft over the four task families.

``evaluate()`` checks the settings and the drafts on the driver, builds the prompts (``data.tasks``), runs the
workers (``evaluate.worker.Evaluator``: in this process, or ``num_workers`` Ray actors) and aggregates their
records into rows (``evaluate.metrics``: alpha, tau, MBSU, hardware-aware and wall-clock speedups).

Target and drafts run at ``evaluate.precision`` (fp32 | bf16 | fp16 | int8, ``specdec.precision``): the
baseline is the target alone AT THE SAME PRECISION. ``evaluate.gamma_policy`` picks the draft length per step
(``specdec.policy``), with ``evaluate.prior_alpha`` as the drafts' known per-token acceptance for the ``cost``
policy (the ``alpha_per_token`` an earlier evaluation reports; < 0 = unknown); a fresh policy is built per
generation, so prompts stay independent.

``num_workers == 1`` runs in this process (CPU); more, or ``use_gpu``, spreads the prompts round-robin over Ray
actors that each load the models once; records come back in prompt order whatever the worker count.
``endpoint=URL`` sends the same prompts and seeds to a running server instead (``evaluate.endpoint``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch

from fastdraft_ray.config import EvaluateConfig, ModelConfig, to_dict
from fastdraft_ray.data.tasks import EvalPrompt, load_tasks
from fastdraft_ray.evaluate.endpoint import EndpointError, EndpointEvaluator
from fastdraft_ray.evaluate.metrics import ALL, DraftInfo, EvalResults, aggregate, aggregate_baselines
from fastdraft_ray.evaluate.worker import Evaluator
from fastdraft_ray.models.draft import check_compatible, count_params, load_draft, param_bytes
from fastdraft_ray.models.target import load_target_config, load_tokenizer
from fastdraft_ray.specdec.precision import PrecisionError, resolve_precision
from fastdraft_ray.specdec.stats import decode_step_bytes

log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """The evaluation cannot run as configured; the message says what to change."""


GENERIC_FOLDERS = {"export", "model", "hf", "final"}  # folder names that say nothing: show the parent


def _draft_names(paths: list[str]) -> dict[str, str]:
    """Short display names: the folder name, or its stage folder for ``<run>/<stage>/export``-style paths."""
    names: dict[str, str] = {}
    for path in paths:
        parts = Path(path).parts
        base = (
            (parts[-2] if len(parts) > 1 and parts[-1] in GENERIC_FOLDERS else parts[-1]) if parts else str(path)
        )
        name = base if base not in names else f"{base}#{len(names)}"
        names[name] = str(path)
    return names


def _check_drafts(model: ModelConfig, drafts: dict[str, str], tokenizer) -> None:
    """Fail early, on the driver, for a missing or vocabulary-incompatible draft (configs only, no weights)."""
    from transformers import AutoConfig, AutoTokenizer

    target_cfg = load_target_config(model.target, model.trust_remote_code)
    for name, path in drafts.items():
        if not (Path(path) / "config.json").exists():
            raise EvaluationError(f"draft {name!r}: {path} is not an HF model folder (no config.json)")
        draft_tok = (
            AutoTokenizer.from_pretrained(path) if (Path(path) / "tokenizer_config.json").exists() else None
        )
        check_compatible(target_cfg, AutoConfig.from_pretrained(path), tokenizer, draft_tok)


def _threads(cfg: EvaluateConfig) -> int:
    """Torch threads per worker. On a shared, oversubscribed CPU more threads than free cores is far slower
    (measured here: 2 threads 16x slower than 1 per SmolLM2 step under load), so set cpus_per_worker there."""
    return cfg.cpus_per_worker or max(1, (os.cpu_count() or 1) // cfg.num_workers)


def _run_workers(
    model: ModelConfig,
    drafts: dict[str, str],
    prompts: list[EvalPrompt],
    cfg: EvaluateConfig,
    gammas: dict[str, list[int]] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Evaluate prompts one at a time, here (1 worker on CPU), through ``cfg.endpoint``, or on ``num_workers`` Ray
    actors, with a progress bar; records come back in prompt order whatever the worker count."""
    from tqdm import tqdm

    bar = tqdm(total=len(prompts), desc="evaluate", unit="prompt")
    if cfg.endpoint or (cfg.num_workers == 1 and not cfg.use_gpu):  # here: the server, or this process
        previous = torch.get_num_threads()
        try:
            if cfg.endpoint:
                evaluator = EndpointEvaluator(cfg.endpoint, drafts, cfg, gammas or {})
            else:
                evaluator = Evaluator(model, drafts, cfg, _threads(cfg), gammas)
            records = []
            for prompt in prompts:
                records += evaluator.run([prompt])[0]
                bar.update()
        except EndpointError as exc:
            raise EvaluationError(str(exc)) from None
        finally:
            torch.set_num_threads(previous)  # this process keeps its own setting afterwards
            bar.close()
        latencies = evaluator.measured_latencies()
        return records, [latencies] if latencies else []
    import ray
    from ray.util import ActorPool

    if not ray.is_initialized():
        raise EvaluationError("evaluate.num_workers > 1 needs Ray: call ray.init() first (jobs/evaluate.py does)")
    threads = _threads(cfg)
    actor_cls = ray.remote(num_cpus=threads, num_gpus=1 if cfg.use_gpu else 0)(Evaluator)
    actors = [
        actor_cls.remote(model, drafts, cfg, threads, gammas) for _ in range(min(cfg.num_workers, len(prompts)))
    ]
    records = []
    try:
        for recs, _ in ActorPool(actors).map(lambda actor, prompt: actor.run.remote([prompt]), prompts):
            records += recs
            bar.update()
        latencies = [lat for lat in ray.get([a.measured_latencies.remote() for a in actors]) if lat]
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    return records, latencies


def evaluate(
    model: ModelConfig,
    draft_paths: list[str],
    cfg: EvaluateConfig,
    prompts: dict[str, list[EvalPrompt]] | None = None,
) -> EvalResults:
    """Evaluate each draft folder against ``model.target`` on the configured tasks and modes (``cfg`` checked
    itself when it was built: ``EvaluateConfig.validate``)."""
    start = time.perf_counter()
    if not draft_paths:
        raise EvaluationError("no draft to evaluate: set evaluate.drafts=[path, ...]")
    modes = list(cfg.modes)
    try:
        precision = resolve_precision(cfg.precision, model.dtype)
        draft_precision = resolve_precision(cfg.draft_precision or precision)
    except PrecisionError as exc:
        raise EvaluationError(f"evaluate.precision / draft_precision: {exc}") from None
    tokenizer = load_tokenizer(model.target, model.trust_remote_code)
    drafts = _draft_names([str(p) for p in draft_paths])
    _check_drafts(model, drafts, tokenizer)
    if prompts is None:
        prompts = load_tasks(
            tokenizer, cfg.tasks, cfg.prompts_per_task, cfg.seed, cfg.source, cfg.max_article_tokens, cfg.code_chat
        )
    flat = [p for task_prompts in prompts.values() for p in task_prompts]
    workers_cfg = dataclasses.replace(cfg, precision=precision, draft_precision=draft_precision)  # as resolved
    settings = {k: v for k, v in to_dict(workers_cfg).items() if k != "drafts"}  # the drafts: results.drafts
    log.info(
        "evaluating %d draft(s) on %d prompts x %d mode(s) with %d worker(s)",
        len(drafts),
        len(flat),
        len(modes),
        cfg.num_workers,
    )
    tasks = list(prompts)
    chosen: dict[str, dict[str, int]] = {}
    if cfg.gamma_select:
        calibration = load_tasks(
            tokenizer,
            tasks,
            cfg.calibration_prompts_per_task,
            cfg.seed,
            cfg.source,
            cfg.max_article_tokens,
            cfg.code_chat,
            skip=max(len(v) for v in prompts.values()),
        )
        chosen, settings["calibration"] = _select_gammas(model, drafts, calibration, workers_cfg, tasks)
        settings.update(
            gamma_select=list(cfg.gamma_select),
            selected_gamma=chosen,
            calibration_prompts_per_task=cfg.calibration_prompts_per_task,
        )
    gammas = {name: sorted({cfg.gamma, *chosen.get(name, {}).values()}) for name in drafts}
    records, latencies = _run_workers(model, drafts, flat, workers_cfg, gammas)
    baseline_records = [r for r in records if "method" in r]
    records = [r for r in records if "method" not in r]
    order = {p.id: i for i, p in enumerate(flat)}
    records.sort(
        key=lambda r: (order[r["prompt_id"]], modes.index(r["mode"]), list(drafts).index(r["draft"]), r["gamma"])
    )
    infos = _draft_infos(model, drafts, latencies, precision, draft_precision)
    rows = aggregate(records, infos, cfg.gamma, tasks, cfg.gamma_policy)
    for row in rows:
        row["selected"] = chosen.get(row["draft"], {}).get(row["mode"]) == row["gamma"]
    baselines = aggregate_baselines(baseline_records, tasks)
    return EvalResults(model.target, settings, infos, records, rows, tasks, time.perf_counter() - start, baselines)


def _draft_infos(
    model: ModelConfig, drafts: dict[str, str], latencies: list[dict], precision: str, draft_precision: str
) -> list[DraftInfo]:
    """Each draft's size, c (decode-step bytes at the draft's / the target's precision) and the latencies its
    workers measured (means over workers)."""
    target_bytes = _target_step_bytes(model, precision)
    infos = []
    for name, path in drafts.items():
        d_model = load_draft(path)
        info = DraftInfo(name, path, count_params(d_model).total, param_bytes(d_model), precision=draft_precision)
        info.step_bytes = decode_step_bytes(d_model, draft_precision)
        info.c_params = info.step_bytes / target_bytes
        worker_lat = [lat[name] for lat in latencies if name in lat]
        for key in ("draft_step_s", "target_step_s", "verify_step_s"):
            setattr(info, key, sum(w[key] for w in worker_lat) / len(worker_lat) if worker_lat else 0.0)
        if worker_lat:  # mean curve over workers
            curves = [w["verify_cost"] for w in worker_lat]
            info.verify_cost = [sum(v) / len(curves) for v in zip(*curves, strict=True)]
        infos.append(info)
    return infos


def _select_gammas(
    model: ModelConfig, drafts: dict[str, str], prompts: dict[str, list[EvalPrompt]], cfg: EvaluateConfig, tasks
) -> tuple[dict[str, dict[str, int]], dict]:
    """Per draft and mode, the gamma of ``cfg.gamma_select`` with the highest expected speedup
    ``tau(alpha, gamma) / (gamma c + v(gamma + 1))``, from the alpha/token measured on the calibration ``prompts``
    (run at the largest candidate, so the measured verify curve covers every candidate) and the measured c; and
    what the choice was based on."""
    from fastdraft_ray.specdec.stats import expected_speedup

    flat = [p for rows in prompts.values() for p in rows]
    log.info("choosing gamma from %s on %d calibration prompts", list(cfg.gamma_select), len(flat))
    cfg = dataclasses.replace(cfg, gamma=max(cfg.gamma_select), baselines=[])  # calibration: the drafts only
    records, latencies = _run_workers(model, drafts, flat, cfg)
    infos = {
        info.name: info for info in _draft_infos(model, drafts, latencies, cfg.precision, cfg.draft_precision)
    }
    chosen: dict[str, dict[str, int]] = {}
    basis: dict = {}
    for row in aggregate(records, list(infos.values()), cfg.gamma, tasks):
        if row["task"] != ALL:
            continue
        info = infos[row["draft"]]
        c = info.draft_step_s / info.target_step_s if info.target_step_s else 1.0
        curve = tuple(info.verify_cost) or None
        alpha = row["alpha_per_token"]
        predicted = {int(g): expected_speedup(alpha, int(g), c, curve) for g in cfg.gamma_select}
        best = max(predicted, key=predicted.get)
        chosen.setdefault(row["draft"], {})[row["mode"]] = best
        basis.setdefault(row["draft"], {})[row["mode"]] = {
            "alpha_per_token": alpha,
            "c": c,
            "prompts": row["prompts"],
            "predicted_speedup": {str(g): s for g, s in predicted.items()},
        }
    return chosen, basis


def _target_step_bytes(model: ModelConfig, precision: str) -> int:
    """The bytes a target decode step reads at ``precision``, counted on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    config = load_target_config(model.target, model.trust_remote_code)
    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)
    return decode_step_bytes(target, precision)
