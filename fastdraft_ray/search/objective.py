"""One search trial (a Ray Tune function trainable): price the shape, train it briefly, measure it.

1. The shape's draft decode step is measured on the profile's device and threads (``latency.measure_drafts``), so
   c and the target's verify curve form the trial's ``SpeedupModel``.
2. The draft is trained through the project's own stack (``train.run.train_stage``: Ray Train V2 ``TorchTrainer``
   + DeepSpeed, launched inside this trainable) for ``search.token_budget_per_trial`` tokens of ``search.data``,
   in the trial's own run directory. Every ``search.report_every`` steps the workers score the training proxy and
   report it with ``train/predicted_speedup`` (the speedup the proxy's per-token acceptance predicts with this
   trial's latency model); ``TuneReportCallback`` forwards each report to Tune, so ASHA stops trials on it.
3. A trial that finishes is measured: speculative decoding against the target on held-out prompts no proxy or
   evaluation uses (``search.eval_prompts_per_task`` per family), at the predicted gamma: measured alpha/token and
   wall-clock speedup with its bootstrap interval, reported once more.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from fastdraft_ray.config import (
    SEARCH_MEASURED,
    SEARCH_TRAIN_KEYS,
    FastDraftConfig,
    config_from_dict,
    stage_config,
)
from fastdraft_ray.layout import RunLayout
from fastdraft_ray.models.construct import head_vocab_sources
from fastdraft_ray.search.latency import DeviceProfile, measure_drafts
from fastdraft_ray.search.space import Architecture
from fastdraft_ray.specdec import stats
from fastdraft_ray.train.position import Geometry

log = logging.getLogger(__name__)


def data_dir(cfg: FastDraftConfig) -> str:
    """The shards the trials train on: ``search.data`` (relative = inside the run directory)."""
    return str(RunLayout.of(cfg).inside(cfg.search.data))


def trial_steps(cfg: FastDraftConfig, seq_len: int) -> int:
    """Optimizer steps of one trial: ``search.token_budget_per_trial`` with PT's batch on the trial's workers."""
    pt = stage_config(cfg, "pt").train
    geo = Geometry(cfg.search.num_workers, pt.micro_batch_size, pt.grad_accum_steps, seq_len)
    return geo.total_steps(cfg.search.token_budget_per_trial)


def trial_config(cfg: FastDraftConfig, arch: Architecture, trial: str, seq_len: int) -> FastDraftConfig:
    """The run config of one trial: PT's settings with the trial's shape, budget and workers, in its own run
    directory ``<run_dir>/search/trials/<trial>``; a trimmed head counts tokens where the run's PT would."""
    s, pt = cfg.search, stage_config(cfg, "pt")
    heads_from = ",".join(str(p) for p in head_vocab_sources(pt, data_dir(cfg))) if arch.head_vocab else ""
    draft = arch.draft_config(dataclasses.replace(pt.draft, head_vocab_from=heads_from, init_from=None))
    steps = trial_steps(cfg, seq_len)
    train = dataclasses.replace(
        pt.train,
        stage="pt",
        token_budget=s.token_budget_per_trial,
        num_workers=s.num_workers,
        cpus_per_worker=s.cpus_per_worker,
        proxy_every=s.report_every,
        checkpoint_every=s.report_every,
        eval_every=max(steps, 1),  # one validation loss, at the end
        warmup_steps=min(pt.train.warmup_steps, max(1, steps // 10)),
        checkpoints_to_keep=1,
    )
    trial_root = RunLayout.of(cfg).search.trial(trial).root
    return dataclasses.replace(
        pt, storage=str(trial_root.parent), run_name=trial_root.name, draft=draft, train=train, stages={}
    )


def measure_trial(cfg: FastDraftConfig, export: Path, gamma: int) -> dict[str, float]:
    """Speculative decoding of the trial's draft against the target on the search's held-out prompts (after the
    evaluated and the proxy's), at ``gamma``: ``search/<mode>/<speedup, interval, alpha_per_token>``."""
    from fastdraft_ray.data.tasks import load_tasks
    from fastdraft_ray.evaluate.run import evaluate
    from fastdraft_ray.models.target import load_tokenizer

    s, ev = cfg.search, cfg.evaluate
    prompts = load_tasks(
        load_tokenizer(cfg.model.target, cfg.model.trust_remote_code),
        ev.tasks,
        s.eval_prompts_per_task,
        ev.seed,
        ev.source,
        ev.max_article_tokens,
        ev.code_chat,
        skip=ev.prompts_per_task + cfg.train.proxy_prompts_per_task,
    )
    settings = dataclasses.replace(
        ev,
        drafts=[str(export)],
        modes=list(s.eval_modes),
        max_new_tokens=s.eval_max_new_tokens,
        gamma=max(1, gamma),
        gamma_policy="constant",
        gamma_select=[],
        baselines=[],
        endpoint="",
        num_workers=1,
        cpus_per_worker=s.threads,
    )
    results = evaluate(cfg.model, [str(export)], settings, prompts)
    out: dict[str, float] = {}
    for mode in s.eval_modes:
        row = next(r for r in results.rows if r["mode"] == mode and r["task"] == "all")
        out.update({f"search/{mode}/{k}": float(row[k]) for k in SEARCH_MEASURED if row[k] is not None})
    return out


def run_trial(config: dict, base: dict, proxy, profile: dict, points: dict) -> None:
    """The Tune function trainable: ``config["arch"]`` names a point of ``points`` (name -> Architecture dict);
    ``base`` is the run's config as a dict, ``proxy`` the run's ``ProxySet``, ``profile`` the ``DeviceProfile``."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from fastdraft_ray.data.stream import read_manifest
    from fastdraft_ray.models.draft import count_params
    from fastdraft_ray.models.target import load_target_config
    from fastdraft_ray.train.run import train_stage

    cfg = config_from_dict(base)
    arch = Architecture.from_dict(points[config["arch"]])
    device = DeviceProfile(**profile)
    target_config = load_target_config(cfg.model.target, cfg.model.trust_remote_code)
    step_s = measure_drafts([arch], target_config, device, cfg.search.latency_repeats)[arch.name]
    model = device.speedup_model(arch, cfg.evaluate.max_gamma)
    trial = f"{arch.name}_{ray.tune.get_context().get_trial_id()}"
    data = data_dir(cfg)
    tcfg = trial_config(cfg, arch, trial, int(read_manifest(data)["seq_len"]))
    trial_layout = RunLayout.of(tcfg)
    trial_layout.root.mkdir(parents=True, exist_ok=True)
    priced = {"search/draft_step_ms": 1000 * step_s, "search/c": model.c}
    trial_layout.search_latency.write_text(json.dumps(priced))  # a trial ASHA stops still has its price
    done = trial_layout.stage("pt").done
    started = time.perf_counter()
    if done.exists():  # restored after training finished: measure only
        record = json.loads(done.read_text())
    else:
        record = train_stage(
            tcfg,
            data,
            proxy=proxy,
            speedup_model=model,
            callbacks=[TuneReportCallback()],
        )
    metrics = {k: record["metrics"][k] for k in SEARCH_TRAIN_KEYS if record["metrics"].get(k) is not None}
    gamma = int(metrics.get("train/predicted_gamma", 1))
    target_params = count_params(target_config).total
    final = {
        **metrics,
        "search/params": arch.params,
        "search/non_embedding_params": arch.non_embedding_params,
        **priced,
        "search/mbsu": stats.mbsu(
            stats.ideal_block_efficiency(metrics.get("train/proxy_acceptance", 0.0), gamma),
            gamma,
            arch.params / target_params,
        ),
        "search/train_s": float(record.get("wall_time_s", time.perf_counter() - started)),
        "search/measured_gamma": gamma,
    }
    measured = measure_trial(cfg, Path(record["outputs"]["export"]), gamma)
    first = cfg.search.eval_modes[0]
    final["search/measured_speedup"] = measured[f"search/{first}/speedup"]
    final["search/measured_alpha_per_token"] = measured[f"search/{first}/alpha_per_token"]
    ray.tune.report({**final, **measured})
