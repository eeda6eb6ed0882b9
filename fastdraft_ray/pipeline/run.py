"""The pipeline driver: every selected stage in order inside one process (one Ray job), each skipped, resumed or
re-run as its records say, then the report.

Decision per stage (``decide``), from the stage's own completion record (``Stage.marker``) and the pipeline's
record of it in ``<run_dir>/pipeline.json`` (settings, input fingerprints, output fingerprint):

- finished, same settings and inputs as recorded               -> skipped
- finished outside the pipeline (a stage job), same settings   -> skipped (adopted: recorded from now on)
- finished, or partly done, with other settings or inputs      -> its folders are set aside (``<folder>.previous``)
                                                                  and it runs from scratch
- unfinished work (checkpoints, finished shards/units) and no
  record of other settings                                     -> resumed (the stage functions resume by themselves)
- otherwise                                                    -> started

A stage's input fingerprint is the sha256 of the upstream stage's completion record, so a re-made upstream
output (e.g. a new PT export) re-runs everything downstream of it. ``pipeline.force`` re-runs chosen stages.

``only`` runs some of the selected stages and leaves the others as they are (their finished outputs are still
inputs): each stage job (``jobs/pretrain.py``, ...) is ``run_pipeline(cfg, only=[its stage])``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastdraft_ray import stage_graph
from fastdraft_ray.config import ConfigError, FastDraftConfig, check_run
from fastdraft_ray.layout import LayoutError, RunLayout
from fastdraft_ray.pipeline.stages import (
    PipelineError,
    Stage,
    build_stage,
    describe_change,
    output_fingerprint,
    with_searched_draft,
)
from fastdraft_ray.ray_runtime import DATA_CPUS, local_ray_cpus


@dataclass
class StageOutcome:
    """What one stage did in this invocation: action is skipped, started, resumed, rerun or not_selected."""

    stage: str
    action: str
    reason: str = ""
    wall_time_s: float = 0.0
    summary: dict = field(default_factory=dict)
    output: str | None = None  # the draft a training stage exported


@dataclass
class PipelineResult:
    """Every stage's outcome, in order, and where the report went (None when nothing was evaluated yet)."""

    run_dir: str
    outcomes: list[StageOutcome]
    report: str | None = None

    def actions(self) -> dict[str, str]:
        """``{stage: action}``."""
        return {o.stage: o.action for o in self.outcomes}

    def outcome(self, stage: str) -> StageOutcome:
        return next(o for o in self.outcomes if o.stage == stage)


# --------------------------------------------------------------------------------------------- config


def resolve_run(cfg: FastDraftConfig) -> FastDraftConfig:
    """``cfg`` checked across its sections (``config.check_run``) with an absolute local storage path (the
    pipeline writes through the local filesystem: a local disk, or NFS shared by every node)."""
    try:
        check_run(cfg)
        RunLayout.of(cfg).require_local("the pipeline")
    except (ConfigError, LayoutError) as exc:
        raise PipelineError(str(exc)) from None
    return dataclasses.replace(cfg, storage=str(Path(cfg.storage).expanduser().resolve()))


def selected_stages(cfg: FastDraftConfig, only: list[str] | None = None) -> list[str]:
    """The stage names ``pipeline.stages`` selects, and those ``only`` names, in pipeline order."""
    try:
        return stage_graph.expand([*cfg.pipeline.stages, *(only or [])])
    except stage_graph.StageError as exc:
        raise PipelineError(str(exc)) from None


def _forced(cfg: FastDraftConfig) -> set[str]:
    return set(stage_graph.expand(cfg.pipeline.force))


def _to_run(cfg: FastDraftConfig, only: list[str] | None) -> list[str]:
    """The stages this invocation runs: ``only`` (expanded), else every selected stage."""
    try:
        return stage_graph.expand(only) if only else selected_stages(cfg)
    except stage_graph.StageError as exc:
        raise PipelineError(str(exc)) from None


def local_ray_resources(cfg: FastDraftConfig, only: list[str] | None = None) -> dict:
    """``ray.init`` arguments when no cluster is given: logical CPUs enough for the training workers plus one for
    Ray Data's reads, for the generation actors, and for a search's trials when it runs."""
    searching = "search" in _to_run(cfg, only)
    return local_ray_cpus(
        max(
            cfg.train.num_workers * cfg.train.cpus_per_worker + DATA_CPUS,
            cfg.generate.num_actors * cfg.generate.cpus_per_actor,
            # + 1: the trial's own driver reserves a sliver of a CPU (search/run.py)
            cfg.search.num_workers * cfg.search.cpus_per_worker + DATA_CPUS + 1 if searching else 0,
        )
    )


# --------------------------------------------------------------------------------------------- records


def _read_records(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def _write_records(path: Path, records: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.part")
    tmp.write_text(json.dumps(records, indent=1, default=str))
    os.replace(tmp, path)


def fingerprint(settings: dict, inputs: dict) -> str:
    """sha256 of a stage's settings and its inputs' output fingerprints."""
    blob = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _change(record: dict, stage: Stage, inputs: dict) -> str:
    change = describe_change(record.get("settings", {}), stage.settings, record.get("inputs", {}), inputs)
    return change or "settings or inputs changed"


def decide(stage: Stage, record: dict | None, inputs: dict, forced: bool) -> tuple[str, str]:
    """``(action, reason)`` for a stage: skip, adopt, start, resume or rerun (see the module docstring)."""
    fp = fingerprint(stage.settings, inputs)
    has_files = any(f.exists() for f in stage.folders)
    if forced:
        return ("rerun" if has_files else "start"), "forced (pipeline.force)"
    if stage.done():
        if record and record.get("status") == "done" and record.get("output") == output_fingerprint(stage.marker):
            if record.get("fingerprint") == fp:
                return "skip", "done, settings and inputs unchanged"
            return "rerun", _change(record, stage, inputs)
        why = stage.adopt()
        if why is None:
            return "adopt", "done outside the pipeline with the same settings"
        return "rerun", why
    if record and record.get("fingerprint") != fp and has_files:
        return "rerun", f"unfinished work of other settings ({_change(record, stage, inputs)})"
    progress = stage.unfinished()
    if progress:
        conflict = None if record else stage.conflict()
        if conflict:
            return "rerun", f"unfinished work of other settings ({conflict})"
        return "resume", f"{progress}, no completion record"
    return "start", ""


def _set_aside(folders: tuple[Path, ...]) -> list[str]:
    """Move each existing folder to ``<folder>.previous`` (replacing an older one); returns the new names."""
    moved = []
    for folder in folders:
        if folder.exists():
            previous = folder.with_name(folder.name + ".previous")
            shutil.rmtree(previous, ignore_errors=True)
            folder.rename(previous)
            moved.append(previous.name)
    return moved


# ---------------------------------------------------------------------------------------------- driver


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def format_summary(summary: dict) -> str:
    """A stage's summary as ``key value, ...`` (floats to 4 significant digits; a train/val dict by its train)."""
    parts = []
    for key, value in summary.items():
        if key in ("output", "drafts") or value is None:
            continue
        if isinstance(value, dict):
            value = value.get("train", value)
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts)


def run_pipeline(
    cfg: FastDraftConfig, only: list[str] | None = None, echo: Callable[[str], None] | None = None
) -> PipelineResult:
    """Run the selected stages of ``cfg`` in order (Ray must be initialised), then write the report.

    ``only`` (stage names or ``pipeline.stages`` entries) runs just those, leaving the others as they are; the
    stages ``pipeline.stages`` selects still decide where a stage's draft comes from (FT from PT when there is no
    CP). ``echo`` receives one line per stage transition (default: print, flushed, as ``[pipeline] ...``).
    """
    say = echo or (lambda line: print(f"[pipeline] {line}", flush=True))
    cfg = resolve_run(cfg)
    layout = RunLayout.of(cfg)
    run_dir, record_path = layout.require_local("the pipeline"), layout.pipeline_record
    selected, to_run, forced = selected_stages(cfg, only), _to_run(cfg, only), _forced(cfg)
    records = _read_records(record_path)
    outcomes: list[StageOutcome] = []
    say(f"run directory {run_dir}; stages: {', '.join(to_run)}")
    if cfg.pipeline.preflight and to_run:
        _preflight(cfg, to_run, say)
    for name in stage_graph.ORDER:
        if name not in to_run:
            outcomes.append(StageOutcome(name, "not_selected"))
            if name == "search" and name in selected and layout.search.done.exists():
                cfg = with_searched_draft(cfg)  # a finished search still gives later stages its shape
            continue
        stage = build_stage(name, cfg, selected)
        inputs = {}
        for upstream in stage.inputs:
            inputs[upstream] = output_fingerprint(build_stage(upstream, cfg, selected).marker)
            if inputs[upstream] is None:
                todo = "run that stage first" if only else "add it to pipeline.stages"
                raise PipelineError(
                    f"{stage.label} needs the output of {stage_graph.label(upstream)}, which is not finished: {todo}"
                )
        outcomes.append(_run_stage(stage, records, record_path, inputs, name in forced, say))
        if name == "search":  # PT and everything after it train the shape the search chose
            cfg = with_searched_draft(cfg)
            d = cfg.draft
            say(f"draft shape from the search: {d.num_layers} x {d.hidden_size}, K={d.head_vocab}")
    report = None
    if (only is None or "evaluate" in to_run) and (Path(layout.eval_dir) / "results.json").exists():
        from fastdraft_ray.pipeline.report import write_pipeline_report

        report, text = write_pipeline_report(cfg, outcomes, records)
        say(f"report: {report}")
        print(text, flush=True)
    elif only is None:
        say("no evaluation results yet: add 'evaluate' to pipeline.stages for the report")
    return PipelineResult(str(run_dir), outcomes, report)


def _preflight(cfg: FastDraftConfig, stages: list[str], say: Callable[[str], None]) -> None:
    """The preflight checks for ``stages``: one summary line, or a PipelineError listing every failed check."""
    from fastdraft_ray.pipeline.preflight import preflight

    started = time.time()
    checks = preflight(cfg, stages)
    failed = [c for c in checks if c.status == "fail"]
    if failed:
        lines = "\n".join(f"- {c.name}: {c.detail}" for c in failed)
        raise PipelineError(
            f"preflight: {len(failed)} check(s) failed before any stage started (python jobs/pipeline.py --check "
            f"lists every check; pipeline.preflight=false skips them):\n{lines}"
        )
    skipped = sum(c.status == "skip" for c in checks)
    say(
        f"preflight: {len(checks) - skipped} checks passed, {skipped} skipped, in {_minutes(time.time() - started)}"
    )


def _run_stage(
    stage: Stage, records: dict, record_path: Path, inputs: dict, forced: bool, say: Callable[[str], None]
) -> StageOutcome:
    record = records["stages"].get(stage.name)
    action, reason = decide(stage, record, inputs, forced)
    fp = fingerprint(stage.settings, inputs)
    if action in ("skip", "adopt"):
        if action == "adopt":
            records["stages"][stage.name] = _record(stage, inputs, fp, "done", "adopted", 0.0, {})
            _write_records(record_path, records)
        say(f"{stage.label}: skipped ({reason})")
        return StageOutcome(stage.name, "skipped", reason)
    if action == "rerun":
        moved = _set_aside(stage.folders)
        say(
            f"{stage.label}: re-running from scratch ({reason}){'; previous output in ' + ', '.join(moved) if moved else ''}"
        )
    elif action == "resume":
        say(f"{stage.label}: resumed ({reason})")
    else:
        say(f"{stage.label}: started")
    records["stages"][stage.name] = _record(stage, inputs, fp, "running", action, 0.0, {})
    _write_records(record_path, records)
    started = time.time()
    try:
        summary = stage.run()
    except BaseException as exc:
        say(f"{stage.label}: FAILED after {_minutes(time.time() - started)}: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        raise
    elapsed = time.time() - started
    records["stages"][stage.name] = _record(stage, inputs, fp, "done", action, elapsed, summary)
    _write_records(record_path, records)
    say(f"{stage.label}: done in {_minutes(elapsed)}{' (' + format_summary(summary) + ')' if summary else ''}")
    action = {"start": "started", "resume": "resumed"}.get(action, action)
    return StageOutcome(stage.name, action, reason, elapsed, summary, str(stage.output) if stage.output else None)


def _record(stage: Stage, inputs: dict, fp: str, status: str, action: str, elapsed: float, summary: dict) -> dict:
    return {
        "status": status,
        "fingerprint": fp,
        "settings": stage.settings,
        "inputs": inputs,
        "output": output_fingerprint(stage.marker) if status == "done" else None,
        "action": action,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S") if status == "done" else None,
        "wall_time_s": round(elapsed, 1),
        "summary": summary,
    }


def plan(cfg: FastDraftConfig, only: list[str] | None = None) -> list[tuple[str, str, str]]:
    """What ``run_pipeline`` would do, without doing it: ``[(stage, action, reason)]``. A stage after one that
    will run is reported as ``after upstream`` (its inputs are not known yet)."""
    cfg = resolve_run(cfg)
    selected, forced = selected_stages(cfg, only), _forced(cfg)
    records = _read_records(RunLayout.of(cfg).pipeline_record)
    out, pending, to_run = [], set(), _to_run(cfg, only)
    for name in stage_graph.ORDER:
        if name not in to_run:
            if name == "search" and name in selected and RunLayout.of(cfg).search.done.exists():
                cfg = with_searched_draft(cfg)
            continue
        stage = build_stage(name, cfg, selected)
        if pending & set(stage.inputs) or (name == "evaluate" and pending & set(stage_graph.TRAINING)):
            out.append((name, "run", "after upstream stages"))
            pending.add(name)
            continue
        inputs = {u: output_fingerprint(build_stage(u, cfg, selected).marker) for u in stage.inputs}
        action, reason = decide(stage, records["stages"].get(name), inputs, name in forced)
        out.append((name, action, reason))
        if action not in ("skip", "adopt"):
            pending.add(name)
        elif name == "search":
            cfg = with_searched_draft(cfg)
    return out
