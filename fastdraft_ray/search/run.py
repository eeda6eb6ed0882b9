"""The search driver: validate, price the target, run the Tuner (resumable), and write what it found.

``<run_dir>/search/`` holds ``tune/`` (Ray Tune's experiment: ``Tuner.restore`` continues an interrupted search;
every trial's TensorBoard events), ``trials/<shape>_<trial id>/`` (each trial's run directory: its ``pt/tb``
has the proxy scalars), ``profile.json`` (the device profile), ``results.csv``/``.md``, the plots, the winner as
``recipe.yaml`` and ``DONE.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastdraft_ray.config import ConfigError, FastDraftConfig, stage_config, to_dict
from fastdraft_ray.layout import RunLayout, SearchLayout
from fastdraft_ray.ray_runtime import DATA_CPUS
from fastdraft_ray.search.latency import DeviceProfile, measure_drafts, profile_target
from fastdraft_ray.search.objective import data_dir, run_trial, trial_steps
from fastdraft_ray.search.space import Architecture, enumerate_space, sample_points

log = logging.getLogger(__name__)
TRIAL_DRIVER_CPUS = 0.01  # a Tune trial needs some resource; the trial function only drives its Ray Train run


class SearchError(ValueError):
    """The search cannot run as configured; the message says what to change."""


@dataclass
class SearchResult:
    """What a finished search found: its trials as rows, the best shape, and the files written."""

    rows: list[dict]
    best: dict
    files: dict[str, str]
    wall_time_s: float


def check_search(cfg: FastDraftConfig, target_config) -> list[Architecture]:
    """Validate ``cfg.search`` against the target and the run's data; returns the constrained space."""
    s = cfg.search  # its own ranges and keys were checked when it was built (SearchConfig.validate)
    data = Path(data_dir(cfg))
    if not (data / "manifest.json").exists():
        raise SearchError(
            f"search.data: no prepared shards in {data}; run `python jobs/prepare_data.py --stage cp` (or the "
            "pipeline's prepare stage) first, or point search.data at a prepared shard folder"
        )
    try:
        return enumerate_space(target_config, s)
    except ConfigError as exc:
        raise SearchError(str(exc)) from None


def device_profile(cfg: FastDraftConfig, layout: SearchLayout, target_config) -> DeviceProfile:
    """``search.device_profile`` if set, else this run's ``profile.json`` when it matches, else measured now."""
    import ray

    from fastdraft_ray.specdec.precision import resolve_precision

    s = cfg.search
    precision = resolve_precision(cfg.evaluate.precision, cfg.model.dtype)
    device = "cuda" if cfg.evaluate.use_gpu else "cpu"  # where the drafts will run: beside the evaluated target
    for path in [Path(s.device_profile)] if s.device_profile else [layout.profile]:
        if path.exists():
            profile = DeviceProfile.load(path)
            if profile.target != cfg.model.target and s.device_profile:
                raise SearchError(f"{path} profiles target {profile.target}, not {cfg.model.target}")
            if s.device_profile or (
                profile.device,
                profile.threads,
                profile.context,
                profile.precision,
                profile.linear_kernel,
            ) == (device, s.threads, s.latency_context, precision, cfg.evaluate.linear_kernel):
                return profile
        elif s.device_profile:
            raise SearchError(
                f"search.device_profile={path}: no such file (a profile.json an earlier search wrote)"
            )
    args = (cfg.model, device, precision, s.threads, s.latency_context, max(15, s.latency_repeats))
    task = ray.remote(profile_target).options(num_cpus=s.threads, num_gpus=1 if device == "cuda" else 0)
    profile = ray.get(task.remote(*args, cfg.evaluate.linear_kernel))  # on the drafts' device, not the driver
    log.info(
        "device profile %s (%s): target step %.1f ms, v(2..4) = %s",
        profile.key,
        profile.machine,
        1000 * profile.target_step_s,
        [round(v, 2) for v in profile.verify_cost[1:4]],
    )
    profile.save(layout.profile)
    return profile


def _check_state_api() -> None:
    """Ray Train releases an early-stopped trial's workers through the state API (the dashboard): without it
    the next trial would wait for CPUs forever."""
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException

    try:
        list_nodes(limit=1, timeout=10)
    except (RayStateApiException, ConnectionError) as exc:
        raise SearchError(
            "search.scheduler=asha stops trials early, and Ray Train frees a stopped trial's workers through the "
            "Ray dashboard's state API, which this cluster does not serve: start Ray with its dashboard "
            f"(`ray start --head`, ray.init(include_dashboard=True)) or set search.scheduler=none ({exc})"
        ) from None


def _concurrency(cfg: FastDraftConfig) -> int:
    import ray

    s = cfg.search
    if s.max_concurrent_trials > 0:
        return s.max_concurrent_trials
    cpus = ray.cluster_resources().get("CPU", 1)
    per_trial = s.num_workers * s.cpus_per_worker + TRIAL_DRIVER_CPUS
    return max(1, int((cpus - DATA_CPUS) // per_trial))


def default_point(cfg: FastDraftConfig, points: list[Architecture]) -> Architecture | None:
    """The point of the space with the run's own draft shape (None when the space does not hold it)."""
    d = cfg.draft
    want = (d.num_layers, d.hidden_size, d.num_heads, d.num_kv_heads, d.intermediate_size, d.head_vocab, d.init)
    for p in points:
        if (
            p.num_layers,
            p.hidden_size,
            p.num_heads,
            p.num_kv_heads,
            p.intermediate_size,
            p.head_vocab,
            p.init,
        ) == want:
            return p
    log.info("the run's draft shape is not in the search space: no default-shape trial")
    return None


def chosen_points(
    points: list[Architecture], default: Architecture | None, n: int, seed: int
) -> list[Architecture]:
    """The ``n`` points a random search tries, ``default`` (the run's own shape, when given) first."""
    chosen = sample_points([p for p in points if p != default], n - (default is not None), seed)
    return [default, *chosen] if default is not None else chosen


def _tuner(
    cfg: FastDraftConfig,
    layout: SearchLayout,
    trainable,
    points: list[Architecture],
    default: Architecture | None,
    total_steps: int,
):
    """The Tuner over ``points`` (optuna: the whole space; random: the chosen points, each tried once)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.search
    scheduler = None
    if s.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="step",
            metric=s.metric,
            mode="max",
            max_t=total_steps + 1,  # a trial that reaches its last step is never stopped: it is measured
            grace_period=min(max(1, s.grace_steps), total_steps),
            reduction_factor=max(2, s.reduction_factor),
        )
    if s.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        keys = list(s.objectives) or [s.metric]
        modes = ["min" if k.endswith(("_ms", "params", "/c")) else "max" for k in keys]
        search_alg = OptunaSearch(
            metric=keys if len(keys) > 1 else keys[0],
            mode=modes if len(keys) > 1 else modes[0],
            sampler=optuna.samplers.TPESampler(seed=s.seed)
            if len(keys) == 1
            else optuna.samplers.NSGAIISampler(seed=s.seed),
            points_to_evaluate=[{"arch": default.name}] if default is not None else None,
        )
        param_space, num_samples = {"arch": tune.choice([p.name for p in points])}, s.num_samples
    else:
        search_alg, param_space, num_samples = None, {"arch": tune.grid_search([p.name for p in points])}, 1
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=num_samples,
            scheduler=scheduler,
            search_alg=search_alg,
            max_concurrent_trials=_concurrency(cfg),
        ),
        run_config=tune.RunConfig(name=layout.tune.name, storage_path=str(layout.tune.parent)),
    )


def run_search(cfg: FastDraftConfig, echo: Callable[[str], None] | None = None) -> SearchResult:
    """Run (or resume) the search of ``cfg.search`` for ``cfg.model.target`` on the current Ray cluster."""
    from ray import tune

    from fastdraft_ray.data.stream import read_manifest
    from fastdraft_ray.models.target import load_target_config
    from fastdraft_ray.search.report import write_outputs
    from fastdraft_ray.train.proxy import load_or_build

    echo = echo or log.info
    started = time.perf_counter()
    target_config = load_target_config(cfg.model.target, cfg.model.trust_remote_code)
    points = check_search(cfg, target_config)
    if cfg.search.scheduler == "asha":
        _check_state_api()
    layout = RunLayout.of(cfg).search
    layout.root.mkdir(parents=True, exist_ok=True)
    s, pt = cfg.search, stage_config(cfg, "pt")
    echo(f"search space: {len(points)} valid shapes within {s.params_budget:.3g} {s.budget_kind} parameters")
    proxy = load_or_build(pt)
    profile = device_profile(cfg, layout, target_config)
    default = default_point(cfg, points) if s.include_default else None
    tried = points if s.algorithm == "optuna" else chosen_points(points, default, s.num_samples, s.seed)
    if s.algorithm == "random":  # priced here, one after another, before any trial loads the machine
        measure_drafts(tried, target_config, profile, s.latency_repeats)
        if not s.device_profile:
            profile.save(layout.profile)
    total_steps = trial_steps(cfg, int(read_manifest(data_dir(cfg))["seq_len"]))
    by_name = {p.name: p.to_dict() for p in points}
    trainable = tune.with_parameters(
        tune.with_resources(run_trial, {"CPU": TRIAL_DRIVER_CPUS}),  # its workers reserve their own CPUs
        base=to_dict(cfg),
        proxy=proxy,
        profile=dataclasses.asdict(profile),
        points=by_name,
    )
    if tune.Tuner.can_restore(str(layout.tune)):
        echo(f"search: resuming {layout.tune}")
        tuner = tune.Tuner.restore(str(layout.tune), trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = _tuner(cfg, layout, trainable, tried, default, total_steps)
    grid = tuner.fit()
    rows = []
    for result in grid:
        name = (result.config or {}).get("arch")
        if name is None or name not in by_name:
            continue
        m = dict(result.metrics or {})
        trial = layout.trial(f"{name}_{m.get('trial_id')}")
        if "search/draft_step_ms" not in m and trial.search_latency.exists():  # stopped before its final report
            m.update(json.loads(trial.search_latency.read_text()))
        rows.append(
            {
                **{k: v for k, v in by_name[name].items() if k != "init_layers"},
                "init_layers": "-".join(map(str, by_name[name]["init_layers"])),
                "trial_id": m.get("trial_id"),
                "status": "error"
                if result.error
                else ("measured" if "search/measured_speedup" in m else "stopped"),
                **{k: v for k, v in m.items() if k.startswith(("train/", "search/", "val/")) or k == "step"},
            }
        )
        if "search/draft_step_ms" in m:
            profile.drafts.setdefault(name, m["search/draft_step_ms"] / 1000)
    if not rows:
        raise SearchError(
            f"no trial of the search in {layout.tune} reported a result; see the trials' errors there"
        )
    files, best = write_outputs(cfg, layout, rows, profile, target_config)
    wall = time.perf_counter() - started
    layout.done.write_text(
        json.dumps(
            {"config": to_dict(cfg), "best": best, "files": files, "wall_time_s": wall}, indent=1, default=str
        )
    )
    echo(f"search: {len(rows)} trials in {wall / 60:.1f} min; best {best['name']} -> {files['recipe']}")
    return SearchResult(rows, best, files, wall)
