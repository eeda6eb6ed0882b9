"""The pipeline's final report in ``<run_dir>/report/``: the paper's main table for this run, side by side with
the paper's published numbers.

- ``report.md``     the draft after each evaluated stage (PT, PT->FT; PT->CP->FT when the run has CP) x the four
                    task families: acceptance rate α at the evaluation protocol (paper: γ = 3, T = 0.6), then block
                    efficiency τ, MBSU and wall-clock speedup over the target alone; greedy α and the lossless check;
                    what each stage did.
- ``results.csv``   one row per (draft, mode, task) with those metrics, plus the paper's rows (``source=paper``).
- ``acceptance.png`` α per task per stage next to the paper's.
- ``loss_curve.png`` train/val loss of PT, CP and FT on one tokens axis.

Everything is rendered from ``<run_dir>/eval/results.json`` (written by the evaluate stage) and the pipeline's
records, so the report can be re-made without re-running anything.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fastdraft_ray import markdown, stage_graph
from fastdraft_ray.config import FastDraftConfig
from fastdraft_ray.evaluate.metrics import ALL, EvalResults
from fastdraft_ray.evaluate.paper import FASTDRAFT_PHI3_50M_FT, PaperResult
from fastdraft_ray.evaluate.report import baselines_table, interval_table
from fastdraft_ray.layout import RunLayout
from fastdraft_ray.pipeline.run import format_summary

METRICS = (
    ("acceptance_rate", "Acceptance rate α", "{:.3f}"),
    ("block_efficiency", "Block efficiency τ (tokens per target forward)", "{:.2f}"),
    ("mbsu", "MBSU (memory-bound speedup, c = draft/target parameter bytes)", "{:.2f}"),
    ("speedup", "Wall-clock speedup over the target alone (measured, same prompts)", "{:.2f}×"),
)
CSV_FIELDS = (
    "source",
    "draft",
    "stage",
    "mode",
    "task",
    "gamma",
    "selected",
    "prompts",
    "acceptance_rate",
    "alpha_per_token",
    "block_efficiency",
    "mbsu",
    "hw_speedup",
    "speedup",
    "speedup_lo",
    "speedup_hi",
    "matches_target",
    "target",
)


def load_results(layout: RunLayout) -> EvalResults:
    """The evaluate stage's results (``<run_dir>/eval/results.json``)."""
    return EvalResults.from_dict(json.loads((Path(layout.eval_dir) / "results.json").read_text()))


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def stage_labels(cfg: FastDraftConfig) -> dict[str, str]:
    """Each training stage's draft named by the stages it went through in this run ("PT→FT" when the pipeline
    leaves CP out, "PT→CP→FT" when it runs it)."""
    labels: dict[str, str] = {}
    selected = stage_graph.expand(cfg.pipeline.stages)
    for stage in stage_graph.TRAINING:
        upstream = stage_graph.draft_source(stage, selected)
        labels[stage] = f"{labels[upstream]}→{stage.upper()}" if upstream else stage.upper()
    return labels


def _row(results: EvalResults, draft: str, mode: str, task: str) -> dict | None:
    return results.row(draft, mode, task)  # the headline row: the selected gamma's when one was selected


def main_mode(results: EvalResults) -> str:
    """The mode of the paper's table (sampling) if it was evaluated, else the first one."""
    modes = results.settings["modes"]
    return "sampling" if "sampling" in modes else modes[0]


def metric_table(
    results: EvalResults,
    labels: dict[str, str],
    mode: str,
    metric: str,
    fmt: str,
    paper: PaperResult | None = None,
) -> list[str]:
    """Markdown lines: rows = drafts (stage order), columns = tasks + ``all``; the paper's row last, if given."""
    tasks = [*results.tasks, ALL]
    rows = []
    for info in results.drafts:
        cells = [labels.get(info.name, info.name)]
        for task in tasks:
            row = _row(results, info.name, mode, task)
            cells.append("—" if row is None or row[metric] is None else fmt.format(row[metric]))
        rows.append(cells)
    if paper is not None:
        values = [paper.acceptance_rate.get(t) for t in tasks]
        label = f"*{paper.label} ({paper.target.split('/')[-1]} target)*"
        rows.append([label] + ["—" if v is None else fmt.format(v) for v in values])
    return markdown.table(["draft", *tasks], rows, "l" + "r" * len(tasks)).splitlines()


def _protocol_note(results: EvalResults, labels: dict[str, str], mode: str, paper: PaperResult) -> str:
    s = results.settings
    selected = s.get("selected_gamma") or {}
    if selected:
        chosen = "; ".join(
            f"{labels.get(d, d)} " + ", ".join(f"{m} γ = {g}" for m, g in by_mode.items())
            for d, by_mode in selected.items()
        )
        return (
            f"The tables show each draft at the γ chosen from {s.get('gamma_select')} on "
            f"{s.get('calibration_prompts_per_task', '')} calibration prompts per task (held out, not the reported "
            f"ones): {chosen}; every draft also ran at the paper's γ = {s['gamma']} (interval table below)."
        )
    same = mode == "sampling" and s["gamma"] == paper.gamma and abs(s["temperature"] - paper.temperature) < 1e-9
    if same:
        return f"Same protocol as the paper: γ = {paper.gamma}, multinomial sampling at T = {paper.temperature}."
    used = f"{mode} at T = {s['temperature']}" if mode == "sampling" else mode
    return (
        f"**Protocol differs from the paper's** (γ = {paper.gamma}, sampling at T = {paper.temperature}): this run "
        f"used γ = {s['gamma']}, {used}."
    )


def _stages_table(outcomes, records: dict) -> list[str]:
    rows = []
    for outcome in outcomes:
        if outcome.action == "not_selected" and outcome.stage not in records.get("stages", {}):
            continue
        rec = records.get("stages", {}).get(outcome.stage, {})
        rows.append(
            [
                stage_graph.label(outcome.stage),
                outcome.action.replace("_", " ") + (f" ({outcome.reason})" if outcome.reason else ""),
                rec.get("finished_at") or "—",
                f"{rec.get('wall_time_s', 0) / 60:.1f} min",
                format_summary(rec.get("summary") or {}) or "—",
            ]
        )
    return markdown.table(["stage", "this run", "produced", "wall time", "result"], rows, "lllrl").splitlines()


def _markdown(
    cfg: FastDraftConfig, results: EvalResults, labels: dict[str, str], outcomes, records: dict, paper: PaperResult
) -> str:
    mode, s = main_mode(results), results.settings
    drafts = ", ".join(
        f"{labels.get(d.name, d.name)} `{d.path}` ({_params(d.params)} params, c = {d.c_params:.3f})"
        for d in results.drafts
    )
    parts = [
        f"# FastDraft pipeline report: `{cfg.run_name}`",
        "",
        f"Target `{results.target}`. Drafts: {drafts}. {s['prompts_per_task']} held-out prompts per task "
        f"({s['source']} sources), up to {s['max_new_tokens']} new tokens; evaluation wall time "
        f"{results.wall_time_s / 60:.1f} min. {_protocol_note(results, labels, mode, paper)}",
        "",
        f"Paper row: {paper.citation} — draft {paper.draft}. Its target is {paper.target} (3.8B); this run's "
        f"target is `{results.target}`, so the row shows what the method reached at scale, not a like-for-like "
        "number.",
    ]
    for metric, title, fmt in METRICS:
        parts += ["", f"## {title} ({mode})", ""]
        parts += metric_table(results, labels, mode, metric, fmt, paper if metric == "acceptance_rate" else None)
    if mode != "greedy" and "greedy" in s["modes"]:
        parts += [
            "",
            "## Greedy decoding: acceptance rate α (output identical to the target's: lossless check)",
            "",
        ]
        parts += metric_table(results, labels, "greedy", "acceptance_rate", "{:.3f}")
        same = [
            f"{labels.get(d.name, d.name)} {r['matches_target']:.0%}"
            for d in results.drafts
            if (r := _row(results, d.name, "greedy", ALL)) is not None and r["matches_target"] is not None
        ]
        parts += ["", f"Prompts whose greedy speculative output equals the target's own: {', '.join(same)}."]
    parts += ["", "## Wall-clock speedup over all families, every γ run, 90% bootstrap interval over prompts", ""]
    parts += [interval_table(results)]
    if results.baselines:
        parts += ["", "## What a user would try instead: transformers' own speculation, greedy, same prompts", ""]
        parts += [baselines_table(results)]
    parts += ["", "## Stages", ""] + _stages_table(outcomes, records)
    parts += [
        "",
        "Definitions (docs/definitions.md in the repository): α = accepted / proposed draft tokens; τ = tokens emitted per target forward "
        "(bonus token included); MBSU = τ / (γ·c + 1); wall-clock speedup = target-only time / speculative time on "
        "the same prompts, per emitted token. `all` pools every prompt. Full evaluation: `../eval/results.md`; "
        "loss curves: `loss_curve.png`; α chart: `acceptance.png`; every number: `results.csv`.",
    ]
    return "\n".join(parts) + "\n"


def _csv_rows(results: EvalResults, labels: dict[str, str], paper: PaperResult) -> list[dict]:
    rows = [
        {
            "source": "this run",
            "draft": labels.get(r["draft"], r["draft"]),
            "stage": r["draft"],
            **{k: r.get(k) for k in CSV_FIELDS if k in r and k not in ("draft",)},
            "target": results.target,
        }
        for r in results.rows
    ]
    for task, alpha in paper.acceptance_rate.items():
        rows.append(
            {
                "source": "paper",
                "draft": paper.label,
                "stage": "ft",
                "mode": "sampling",
                "task": task,
                "acceptance_rate": alpha,
                "target": paper.target,
            }
        )
    return rows


def plot_acceptance(
    results: EvalResults, labels: dict[str, str], mode: str, paper: PaperResult, path: Path
) -> Path:
    """Grouped bars: α per task for each stage's draft, and the paper's (hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results.tasks)
    series = [
        (
            labels.get(d.name, d.name),
            [(_row(results, d.name, mode, t) or {}).get("acceptance_rate") or 0.0 for t in tasks],
            {},
        )
        for d in results.drafts
    ]
    series.append(
        (
            f"{paper.label} ({paper.target.split('/')[-1]})",
            [paper.acceptance_rate.get(t, 0.0) for t in tasks],
            {"hatch": "//", "color": "lightgrey", "edgecolor": "dimgrey"},
        )
    )
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(series)
    for i, (label, values, style) in enumerate(series):
        ax.bar([x + i * width for x in range(len(tasks))], values, width, label=label, **style)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(tasks))], tasks)
    ax.set_ylabel("acceptance rate α")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    s = results.settings
    temp = f", T={s['temperature']}" if mode == "sampling" else ""
    ax.set_title(
        f"α per task after each stage (γ={s['gamma']}, {mode}{temp}); target {results.target}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def console_summary(results: EvalResults, labels: dict[str, str], paper: PaperResult) -> str:
    """A few lines for the job log: α per task per stage, the paper's row, and pooled τ / MBSU / speedup."""
    mode, tasks = main_mode(results), list(results.tasks)
    head = f"{'draft':<12}" + "".join(f"{t[:13]:>14}" for t in tasks) + "   all: α / τ / MBSU / speedup"
    lines = [f"acceptance rate α ({mode}, γ={results.settings['gamma']}), target {results.target}", head]
    for d in results.drafts:
        cells = "".join(
            f"{(_row(results, d.name, mode, t) or {}).get('acceptance_rate', 0.0):>14.3f}" for t in tasks
        )
        pooled = _row(results, d.name, mode, ALL) or {}
        lines.append(
            f"{labels.get(d.name, d.name):<12}{cells}   {pooled.get('acceptance_rate', 0):.3f} / "
            f"{pooled.get('block_efficiency', 0):.2f} / {pooled.get('mbsu', 0):.2f} / {pooled.get('speedup', 0):.2f}x"
        )
    cells = "".join(
        f"{paper.acceptance_rate[t]:>14.3f}" if t in paper.acceptance_rate else f"{'—':>14}" for t in tasks
    )
    lines.append(f"{'paper (FT)':<12}{cells}   ({paper.target.split('/')[-1]} target, 50M draft)")
    return "\n".join(lines)


def write_pipeline_report(
    cfg: FastDraftConfig, outcomes, records: dict, paper: PaperResult = FASTDRAFT_PHI3_50M_FT
) -> tuple[str, str]:
    """Write ``<run_dir>/report/`` from the evaluation results; returns (path of report.md, console summary)."""
    layout = RunLayout.of(cfg)
    out = layout.report_dir
    out.mkdir(parents=True, exist_ok=True)
    results = load_results(layout)
    mode, labels = main_mode(results), stage_labels(cfg)
    (out / "report.md").write_text(_markdown(cfg, results, labels, outcomes, records, paper))
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(_csv_rows(results, labels, paper))
    plot_acceptance(results, labels, mode, paper, out / "acceptance.png")
    if any(layout.stage(s).tensorboard.exists() for s in stage_graph.TRAINING):
        from fastdraft_ray.train.curves import plot_loss_curves

        plot_loss_curves(layout, out / "loss_curve.png")
    return str(out / "report.md"), console_summary(results, labels, paper)
