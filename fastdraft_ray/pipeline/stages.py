"""How each stage of the graph (``stage_graph``) runs inside the pipeline: what its result depends on, where it
writes, and how it starts (by calling the library functions: ``prepare``, ``train_stage``, ``run_generation``,
``run_search``, ``evaluate``). The stage jobs under ``jobs/`` are the pipeline with one stage selected, so this is
the one place that decides whether a stage is done, adopted, resumed or re-run.

A stage's result depends on its *settings* (the config sections it reads, minus keys that only change how fast
it runs) and on its *inputs* (the completion records of the stages it reads from). The driver (``run.py``)
fingerprints both; a stage whose fingerprint is unchanged is skipped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fastdraft_ray import stage_graph
from fastdraft_ray.assets import sha256_file
from fastdraft_ray.config import (
    ConfigError,
    FastDraftConfig,
    config_from_dict,
    section_settings,
    stage_config,
    to_dict,
    training_settings,
)
from fastdraft_ray.layout import RunLayout, done_file


class PipelineError(RuntimeError):
    """The pipeline cannot run as configured; the message says what to change."""


@dataclass
class Stage:
    """One step of the pipeline, built when its turn comes (so its inputs are already final)."""

    name: str
    marker: Path  # the completion record the stage writes itself; its sha256 is the stage's output fingerprint
    folders: tuple[Path, ...]  # what the stage writes (set aside before a re-run with other settings)
    settings: dict
    inputs: tuple[str, ...]  # upstream stage names
    run: Callable[[], dict]  # does (or finishes) the work; returns a short summary
    adopt: Callable[[], str | None]  # a finished stage with no pipeline record: None = same settings, else why not
    unfinished: Callable[[], str | None]  # unfinished work a run would resume, described; None if none
    conflict: Callable[[], str | None] = lambda: None  # unfinished work known to have other settings: why
    output: Path | None = None  # the draft a training stage exports (what a stage job reports)

    @property
    def label(self) -> str:
        return stage_graph.label(self.name)

    def done(self) -> bool:
        return self.marker.exists()


def output_fingerprint(marker: Path) -> str | None:
    """sha256 of a stage's completion record (None while unfinished)."""
    return sha256_file(marker) if marker.exists() else None


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def describe_change(
    old: dict, new: dict, old_inputs: dict | None = None, new_inputs: dict | None = None
) -> str | None:
    """Why a stage's recorded result does not stand for ``new`` settings (and inputs): the changed keys and
    inputs, or None when nothing changed. The one wording of every "settings changed" message."""
    why = []
    keys = changed_keys(old, new)
    if keys:
        why.append(f"settings changed: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
    before, now = old_inputs or {}, new_inputs or {}
    moved = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if moved:
        why.append(f"input changed: {', '.join(moved)}")
    return "; ".join(why) or None


def _load_old_config(data: dict) -> FastDraftConfig | str:
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        return f"its record's config no longer loads ({exc})"


def init_source(cfg: FastDraftConfig, stage: str, selected: Iterable[str]) -> str | None:
    """The HF draft folder a training stage starts from: ``draft.init_from``, else the export of the stage the
    graph names for this selection (``stage_graph.draft_source``), else None (PT: a fresh draft)."""
    if cfg.draft.init_from:
        return cfg.draft.init_from
    upstream = stage_graph.draft_source(stage, selected)
    return str(RunLayout.of(cfg).stage(upstream).export) if upstream else None


def _weights_sha256(folder: str, key: str) -> str:
    weights = Path(folder, "model.safetensors")
    if not weights.exists():
        raise PipelineError(f"{key}={folder}: no model.safetensors there (an HF draft folder?)")
    return sha256_file(weights)


# ------------------------------------------------------------------------------------------------ stages


def build_stage(name: str, cfg: FastDraftConfig, selected: Iterable[str]) -> Stage:
    """The stage ``name`` of ``cfg`` (whose storage is an absolute local path) in a run selecting ``selected``."""
    selected = list(selected)
    spec = stage_graph.spec(name)
    if name in stage_graph.PREPARE:
        return _prepare(cfg, name.split("/")[1])
    if spec.trains:
        return _training(cfg, name, selected)
    return {"search": _search, "generate": _generate, "evaluate": _evaluate}[name](cfg, selected)


def _counted_data(cfg: FastDraftConfig) -> list[str]:
    """The pipeline's prepared data sets (pt, cp) that ``draft.head_vocab_from`` names."""
    from fastdraft_ray.models.construct import head_vocab_sources

    if not cfg.draft.head_vocab:
        return []
    layout = RunLayout.of(cfg)
    return [
        src.name
        for src in head_vocab_sources(cfg)
        if src == Path(layout.data(src.name)) and f"prepare/{src.name}" in stage_graph.PREPARE
    ]


def _prepare(cfg: FastDraftConfig, which: str) -> Stage:
    scfg = stage_config(cfg, which)
    out = Path(RunLayout.of(scfg).data(scfg.data))
    settings = {"target": cfg.model.target, "data": section_settings(scfg.data, "data")}

    def run() -> dict:
        from fastdraft_ray.data.prepare import prepare

        m = prepare(scfg.data, cfg.model.target, str(out), trust_remote_code=cfg.model.trust_remote_code)
        return {"rows": m["rows"], "tokens": m["tokens"], "output": str(out)}

    def adopt() -> str | None:
        manifest = json.loads((out / "manifest.json").read_text())
        old = _load_old_config({"data": manifest.get("config", {})})
        if isinstance(old, str):
            return old
        return describe_change(
            {"target": manifest.get("tokenizer"), "data": section_settings(old.data, "data")}, settings
        )

    def unfinished() -> str | None:
        return "an interrupted prepare" if (out / ".progress" / "state.json").exists() else None

    return Stage(f"prepare/{which}", out / "manifest.json", (out,), settings, (), run, adopt, unfinished)


def _training(cfg: FastDraftConfig, stage: str, selected: list[str]) -> Stage:
    scfg = stage_config(cfg, stage)
    layout = RunLayout.of(scfg)
    paths = layout.stage(stage)
    sdir, data_dir = paths.root, Path(layout.data(scfg.data))
    init_from = init_source(scfg, stage, selected)
    settings = training_settings(scfg)
    spec = stage_graph.spec(stage)
    inputs: tuple[str, ...] = (spec.data_from,)
    folders: tuple[Path, ...] = (sdir, data_dir) if spec.data_from == "generate" else (sdir,)  # FT rows: re-built
    upstream = stage_graph.draft_source(stage, selected)
    if scfg.draft.init_from:  # a draft from outside the pipeline: fingerprint its weights
        settings["init_sha256"] = _weights_sha256(init_from, "draft.init_from")
    elif upstream:
        inputs += (upstream,)
    else:  # a fresh draft's trimmed head counts tokens on prepared data (e.g. data/pt,data/cp): re-run with it
        inputs += tuple(f"prepare/{name}" for name in _counted_data(scfg) if f"prepare/{name}" not in inputs)

    def run() -> dict:
        from fastdraft_ray.train.run import train_stage

        if init_from and not Path(init_from, "config.json").exists():
            raise PipelineError(f"{stage.upper()} starts from {init_from}, which is not an HF draft folder")
        rows = None
        if spec.data_from == "generate":
            from fastdraft_ray.distill.ftdata import build_ft_data

            try:
                rows = build_ft_data(scfg, layout.kd.root, data_dir)["rows"]
            except FileNotFoundError as exc:  # no finished KD data: say what to run, as every stage does
                raise PipelineError(str(exc)) from None
        record = train_stage(scfg, str(data_dir), init_from=init_from)
        metrics = record["metrics"]
        return {
            "resumed_from_step": (record["resumed_from"] or {}).get("step", 0),
            "total_steps": record["geometry"]["total_steps"],
            "tokens": record["geometry"]["tokens"],
            "train/loss": metrics.get("train/loss"),
            "val/loss": metrics.get("val/loss"),
            **({"ft_rows": rows} if rows is not None else {}),
        }

    def adopt() -> str | None:
        record = json.loads(paths.done.read_text())
        old = _load_old_config(record.get("config", {}))
        if isinstance(old, str):
            return old
        inputs_now = record.get("inputs", {})
        manifest = data_dir / "manifest.json"  # a path: URLs are refused when the config loads
        if not manifest.exists() or inputs_now.get("manifest_sha256") != sha256_file(manifest):
            return f"its training data changed ({data_dir})"
        if init_from and inputs_now.get("init_sha256") != output_fingerprint(Path(init_from, "model.safetensors")):
            return f"the draft it started from changed ({init_from})"
        return describe_change(training_settings(old), {k: v for k, v in settings.items() if k != "init_sha256"})

    def unfinished() -> str | None:
        from fastdraft_ray.train.run import resume_position  # the checkpoint train_stage would resume

        resume = resume_position(sdir)
        return f"checkpoint at step {resume.step}" if resume else None

    return Stage(stage, paths.done, folders, settings, inputs, run, adopt, unfinished, output=paths.export)


def with_searched_draft(cfg: FastDraftConfig) -> FastDraftConfig:
    """``cfg`` whose draft is the finished search's best shape (what PT trains when the search stage ran)."""
    from fastdraft_ray.search.report import searched_draft

    best = json.loads(RunLayout.of(cfg).search.done.read_text())["best"]
    return dataclasses.replace(cfg, draft=searched_draft(cfg, best))


def _search_settings(cfg: FastDraftConfig) -> dict:
    """What a search's result depends on: the target, the search keys and the PT settings its trials train with."""
    return {
        "model": to_dict(cfg.model),
        "search": section_settings(cfg.search, "search"),
        "pt": training_settings(stage_config(cfg, "pt")),
    }


def _search(cfg: FastDraftConfig, selected: list[str]) -> Stage:
    layout = RunLayout.of(cfg)
    search = layout.search
    settings = _search_settings(cfg)
    data = Path(layout.inside(cfg.search.data))
    inputs = tuple(name for name in stage_graph.PREPARE if data == Path(layout.data(name.split("/")[1])))

    def run() -> dict:
        from fastdraft_ray.search.run import SearchError, run_search

        try:
            result = run_search(cfg)
        except SearchError as exc:
            raise PipelineError(str(exc)) from None
        best = result.best
        return {"trials": len(result.rows), "best": best["name"], cfg.search.metric: best.get(cfg.search.metric)}

    def adopt() -> str | None:
        old = _load_old_config(json.loads(search.done.read_text()).get("config", {}))
        if isinstance(old, str):
            return old
        return describe_change(_search_settings(old), settings)

    def unfinished() -> str | None:
        return "a Tune experiment to restore" if search.tune.exists() else None

    return Stage("search", search.done, (search.root,), settings, inputs, run, adopt, unfinished)


def _generate(cfg: FastDraftConfig, selected: list[str]) -> Stage:
    from fastdraft_ray.distill.generate import kd_settings, recorded_kd_settings

    g, kd = cfg.generate, RunLayout.of(cfg).kd
    out = kd.root
    settings = kd_settings(cfg)
    inputs: tuple[str, ...] = ()
    onpolicy_draft = None
    if g.onpolicy_fraction > 0:  # on-policy rows are written by a draft: the one named, else FT's starting draft
        if g.onpolicy_draft:
            settings["onpolicy_draft_sha256"] = _weights_sha256(g.onpolicy_draft, "generate.onpolicy_draft")
        else:
            inputs = (stage_graph.draft_source("ft", selected),)
            onpolicy_draft = init_source(stage_config(cfg, "ft"), "ft", selected)

    def run() -> dict:
        from fastdraft_ray.distill.generate import run_generation

        record = run_generation(cfg, onpolicy_draft=onpolicy_draft)
        if not record.get("done"):
            raise PipelineError(f"KD generation into {out} stopped before every unit was written")
        return {"rows": record["rows"], "tokens": record["tokens"], "output": str(out)}

    def adopt() -> str | None:
        have = recorded_kd_settings(kd) or {}
        return describe_change(have, {k: v for k, v in settings.items() if k != "onpolicy_draft_sha256"})

    def unfinished() -> str | None:
        parts = kd.response_files() + kd.magpie_files()
        return f"{len(parts)} finished work units" if parts else None

    return Stage("generate", kd.done, (out,), settings, inputs, run, adopt, unfinished, adopt)


def finished_drafts(cfg: FastDraftConfig, stages: list[str]) -> dict[str, str]:
    """``{stage: export folder}`` for the training stages in ``stages`` that finished (DONE.json + export)."""
    layout = RunLayout.of(cfg)
    paths = {s: layout.stage(s) for s in stages}
    return {s: str(p.export) for s, p in paths.items() if p.done.exists() and (p.export / "config.json").exists()}


def _evaluate(cfg: FastDraftConfig, selected: list[str]) -> Stage:
    """The drafts ``evaluate.drafts`` names (any folders, fingerprinted by their weights), else the finished
    exports of the stages ``pipeline.evaluate_drafts`` names, against one shared target baseline."""
    layout = RunLayout.of(cfg)
    out = Path(layout.eval_dir)
    settings = {"model": to_dict(cfg.model), "evaluate": section_settings(cfg.evaluate, "evaluate")}
    if cfg.evaluate.drafts:
        drafts = {str(p): str(p) for p in cfg.evaluate.drafts}
        settings["drafts"] = {p: _weights_sha256(p, "evaluate.drafts") for p in drafts}
        inputs: tuple[str, ...] = ()
    else:
        drafts = finished_drafts(cfg, list(cfg.pipeline.evaluate_drafts))
        settings["drafts"] = list(drafts)
        inputs = tuple(drafts)

    def run() -> dict:
        from fastdraft_ray.evaluate.report import write_report
        from fastdraft_ray.evaluate.run import evaluate

        if not drafts:
            raise PipelineError(
                f"no finished draft to evaluate among {cfg.pipeline.evaluate_drafts} (pipeline.evaluate_drafts): "
                "run their training stages, or name draft folders with evaluate.drafts=[...] (an untrained one: "
                "python jobs/derive_draft.py)"
            )
        run_cfg = dataclasses.replace(
            cfg, evaluate=dataclasses.replace(cfg.evaluate, drafts=list(drafts.values()))
        )
        results = evaluate(cfg.model, list(drafts.values()), run_cfg.evaluate)
        write_report(results, layout.eval_dir, to_dict(run_cfg))
        return {"drafts": list(drafts), "wall_time_s": round(results.wall_time_s, 1)}

    def adopt() -> str | None:
        return "evaluated outside the pipeline (its drafts may have changed since)"

    return Stage("evaluate", done_file(out), (out,), settings, inputs, run, adopt, lambda: None)
