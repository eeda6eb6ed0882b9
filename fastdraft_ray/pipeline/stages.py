"""The pipeline's stages: what each one's result depends on, where it writes, and how it runs (by calling the
library functions the stage jobs call: ``prepare``, ``train_stage``, ``run_generation``, ``evaluate``).

Stages, in order (the ``pipeline.stages`` entry that selects each in brackets):

  prepare/pt, prepare/cp [prepare]   token shards     <run_dir>/data/<data.name>/manifest.json
  search [search, opt-in]            draft shape      <run_dir>/search/DONE.json (PT then trains its best shape)
  pt, cp [pt, cp]                    trained drafts   <run_dir>/<stage>/DONE.json (+ export/)
  generate [generate]                KD data          <run_dir>/kd/DONE.json
  ft [ft]                            FT rows + draft  <run_dir>/data/<ft data.name>/, <run_dir>/ft/DONE.json
  evaluate [evaluate]                all stage drafts <run_dir>/eval/DONE.json (+ results.*)

A stage's result depends on its *settings* (the config sections it reads, minus knobs that only change how fast
it runs) and on its *inputs* (the completion records of the stages it reads from). The driver (``run.py``)
fingerprints both; a stage whose fingerprint is unchanged is skipped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastdraft_ray.assets import sha256_file
from fastdraft_ray.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    section_settings,
    stage_config,
    to_dict,
    training_settings,
)
from fastdraft_ray.layout import RunLayout, done_file
from fastdraft_ray.train.run import UPSTREAM_DRAFT, init_source, upstream_stage

ORDER = ("prepare/pt", "prepare/cp", "search", "pt", "cp", "generate", "ft", "evaluate")
GROUPS = {
    "prepare": ("prepare/pt", "prepare/cp"),
    "search": ("search",),
    "pt": ("pt",),
    "cp": ("cp",),
    "generate": ("generate",),
    "ft": ("ft",),
    "evaluate": ("evaluate",),
}
LABELS = {
    "prepare/pt": "prepare PT data",
    "prepare/cp": "prepare CP data",
    "search": "architecture search",
    "pt": "PT",
    "cp": "CP",
    "generate": "generate KD data",
    "ft": "FT",
    "evaluate": "evaluate",
}


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
    adopt: Callable[
        [], str | None
    ]  # for a finished stage with no pipeline record: None = same settings, else why not
    unfinished: Callable[[], str | None]  # unfinished work a run would resume, described; None if none
    conflict: Callable[[], str | None] = lambda: None  # unfinished work known to have other settings: why

    @property
    def label(self) -> str:
        return LABELS[self.name]

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


def _differs(old: dict, new: dict) -> str | None:
    keys = changed_keys(old, new)
    return f"settings changed: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}" if keys else None


def _load_old_config(data: dict) -> RunConfig | str:
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        return f"its record's config no longer loads ({exc})"


# ------------------------------------------------------------------------------------------------ stages


def build_stage(name: str, cfg: RunConfig, evaluate_drafts: list[str] | None = None) -> Stage:
    """The stage ``name`` of ``cfg`` (whose storage is an absolute local path)."""
    if name.startswith("prepare/"):
        return _prepare(cfg, name.split("/")[1])
    if name in UPSTREAM_DRAFT:
        return _training(cfg, name)
    if name == "search":
        return _search(cfg)
    if name == "generate":
        return _generate(cfg)
    if name == "evaluate":
        return _evaluate(cfg, evaluate_drafts or [])
    raise PipelineError(f"unknown stage {name!r}; stages: {', '.join(ORDER)}")


def _counted_data(cfg: RunConfig) -> list[str]:
    """The pipeline's prepared data sets (pt, cp) that ``draft.head_vocab_from`` names."""
    from fastdraft_ray.models.construct import head_vocab_sources

    if not cfg.draft.head_vocab:
        return []
    layout = RunLayout.of(cfg)
    return [
        src.name
        for src in head_vocab_sources(cfg)
        if src == Path(layout.data(src.name)) and f"prepare/{src.name}" in ORDER
    ]


def _prepare(cfg: RunConfig, which: str) -> Stage:
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
        return _differs(
            {"target": manifest.get("tokenizer"), "data": section_settings(old.data, "data")}, settings
        )

    def unfinished() -> str | None:
        return "an interrupted prepare" if (out / ".progress" / "state.json").exists() else None

    return Stage(f"prepare/{which}", out / "manifest.json", (out,), settings, (), run, adopt, unfinished)


def _training(cfg: RunConfig, stage: str) -> Stage:
    scfg = stage_config(cfg, stage)
    layout = RunLayout.of(scfg)
    paths = layout.stage(stage)
    sdir, data_dir = paths.root, Path(layout.data(scfg.data))
    init_from = init_source(scfg, stage)
    settings = training_settings(scfg)
    if stage == "ft":
        inputs: tuple[str, ...] = ("generate",)
        folders: tuple[Path, ...] = (sdir, data_dir)  # FT rows are built from the KD data: re-built with it
    else:
        inputs, folders = (f"prepare/{stage}",), (sdir,)
    if scfg.draft.init_from:  # a draft from outside the pipeline: fingerprint its weights
        weights = Path(init_from, "model.safetensors")
        if not weights.exists():
            raise PipelineError(f"draft.init_from={init_from}: no model.safetensors there (an HF draft folder?)")
        settings["init_sha256"] = sha256_file(weights)
    elif upstream_stage(scfg, stage):
        inputs += (upstream_stage(scfg, stage),)
    else:  # a fresh draft's trimmed head counts tokens on prepared data (e.g. data/pt,data/cp): re-run with it
        inputs += tuple(f"prepare/{name}" for name in _counted_data(scfg) if f"prepare/{name}" not in inputs)

    def run() -> dict:
        from fastdraft_ray.train.run import train_stage

        if init_from and not Path(init_from, "config.json").exists():
            raise PipelineError(f"{stage.upper()} starts from {init_from}, which is not an HF draft folder")
        rows = None
        if stage == "ft":
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
        manifest = data_dir / "manifest.json"
        if not manifest.exists() or inputs_now.get("manifest_sha256") != sha256_file(manifest):
            return f"its training data changed ({data_dir})"
        if init_from and inputs_now.get("init_sha256") != output_fingerprint(Path(init_from, "model.safetensors")):
            return f"the draft it started from changed ({init_from})"
        return _differs(training_settings(old), {k: v for k, v in settings.items() if k != "init_sha256"})

    def unfinished() -> str | None:
        from fastdraft_ray.train.run import resume_position  # the checkpoint train_stage would resume

        resume = resume_position(sdir)
        return f"checkpoint at step {resume.step}" if resume else None

    return Stage(stage, paths.done, folders, settings, inputs, run, adopt, unfinished)


def with_searched_draft(cfg: RunConfig) -> RunConfig:
    """``cfg`` whose draft is the finished search's best shape (what PT trains when the search stage ran)."""
    from fastdraft_ray.search.report import searched_draft

    best = json.loads(RunLayout.of(cfg).search.done.read_text())["best"]
    return dataclasses.replace(cfg, draft=searched_draft(cfg, best))


def _search_settings(cfg: RunConfig) -> dict:
    """What a search's result depends on: the target, the search keys and the PT settings its trials train with."""
    return {
        "model": to_dict(cfg.model),
        "search": section_settings(cfg.search, "search"),
        "pt": training_settings(stage_config(cfg, "pt")),
    }


def _search(cfg: RunConfig) -> Stage:
    layout = RunLayout.of(cfg)
    search = layout.search
    settings = _search_settings(cfg)
    data = Path(layout.inside(cfg.search.data))
    inputs = tuple(f"prepare/{name}" for name in ("pt", "cp") if data == Path(layout.data(name)))

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
        return _differs(_search_settings(old), settings)

    def unfinished() -> str | None:
        return "a Tune experiment to restore" if search.tune.exists() else None

    return Stage("search", search.done, (search.root,), settings, inputs, run, adopt, unfinished)


def _generate(cfg: RunConfig) -> Stage:
    g, kd = cfg.generate, RunLayout.of(cfg).kd
    out = kd.root
    settings = {"target": cfg.model.target, "dtype": cfg.model.dtype, "generate": section_settings(g, "generate")}
    inputs: tuple[str, ...] = ()
    ft_loss = stage_config(cfg, "ft").train.kd_loss
    if g.onpolicy_fraction > 0 and (g.topk_logprobs <= 0 or ft_loss == "ce"):
        raise PipelineError(
            f"generate.onpolicy_fraction={g.onpolicy_fraction}: on-policy rows are learned from the target's scores "
            f"only (no CE on draft-written tokens), so set generate.topk_logprobs > 0 (now {g.topk_logprobs}) and a "
            f"soft FT loss, e.g. stages.ft.train.kd_loss=kl or ce_kl (now {ft_loss})"
        )
    if g.onpolicy_fraction > 0:  # on-policy rows are written by a draft
        if g.onpolicy_draft:
            weights = Path(g.onpolicy_draft, "model.safetensors")
            if not weights.exists():
                raise PipelineError(f"generate.onpolicy_draft={g.onpolicy_draft}: no model.safetensors there")
            settings["onpolicy_draft_sha256"] = sha256_file(weights)
        else:
            inputs = (upstream_stage(cfg, "ft"),)

    def run() -> dict:
        from fastdraft_ray.distill.generate import run_generation

        record = run_generation(cfg)
        if not record.get("done"):
            raise PipelineError(f"KD generation into {out} stopped before every unit was written")
        return {"rows": record["rows"], "tokens": record["tokens"], "output": str(out)}

    def adopt() -> str | None:
        have = json.loads(kd.config.read_text()) if kd.config.exists() else {}
        have = {**have, "generate": section_settings(have.get("generate", {}), "generate")}
        return _differs(have, {k: v for k, v in settings.items() if k != "onpolicy_draft_sha256"})

    def unfinished() -> str | None:
        parts = kd.response_files() + kd.magpie_files()
        return f"{len(parts)} finished work units" if parts else None

    return Stage("generate", kd.done, (out,), settings, inputs, run, adopt, unfinished, adopt)


def finished_drafts(cfg: RunConfig, stages: list[str]) -> dict[str, str]:
    """``{stage: export folder}`` for the training stages in ``stages`` that finished (DONE.json + export)."""
    layout = RunLayout.of(cfg)
    paths = {s: layout.stage(s) for s in stages}
    return {s: str(p.export) for s, p in paths.items() if p.done.exists() and (p.export / "config.json").exists()}


def _evaluate(cfg: RunConfig, stages: list[str]) -> Stage:
    drafts = finished_drafts(cfg, stages)
    layout = RunLayout.of(cfg)
    out = Path(layout.eval_dir)
    settings = {
        "model": to_dict(cfg.model),
        "evaluate": section_settings(cfg.evaluate, "evaluate"),
        "drafts": list(drafts),
    }

    def run() -> dict:
        from fastdraft_ray.evaluate.report import write_report
        from fastdraft_ray.evaluate.run import evaluate

        if not drafts:
            raise PipelineError(f"no finished draft to evaluate among {stages} (pipeline.evaluate_drafts)")
        run_cfg = dataclasses.replace(
            cfg, evaluate=dataclasses.replace(cfg.evaluate, drafts=list(drafts.values()))
        )
        results = evaluate(cfg.model, list(drafts.values()), run_cfg.evaluate)
        write_report(results, layout.eval_dir, to_dict(run_cfg))
        return {"drafts": list(drafts), "wall_time_s": round(results.wall_time_s, 1)}

    def adopt() -> str | None:
        return "evaluated outside the pipeline (its drafts may have changed since)"

    return Stage("evaluate", done_file(out), (out,), settings, tuple(drafts), run, adopt, lambda: None)
