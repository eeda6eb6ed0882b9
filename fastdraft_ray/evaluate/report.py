"""Evaluation reports in ``<run_dir>/eval/``: results.json, results.csv, results.md, results.png, DONE.json.

``results.md`` holds one table per metric family (rows = draft x mode, columns = tasks) so it stays readable
at four tasks; ``results.csv`` has one row per (draft, mode, task) with every metric; ``results.json`` adds
the per-prompt records, the drafts' sizes and measured latencies, and the settings. ``run_dir`` may be a
local path or a ``pyarrow.fs`` URI (``s3://...``): reports are written locally, then copied there.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

from fastdraft_ray import markdown
from fastdraft_ray.evaluate.metrics import ALL, TABLE_METRICS, EvalResults, interval_text
from fastdraft_ray.layout import done_file, is_url

LABELS = {
    "acceptance_rate": "α",
    "block_efficiency": "τ",
    "mbsu": "MBSU",
    "speedup": "speedup",
    "hw_speedup": "hw speedup",
}
CSV_FIELDS = (
    "draft",
    "mode",
    "task",
    "gamma",
    "prompts",
    "proposed",
    "accepted",
    "steps",
    "new_tokens",
    "acceptance_rate",
    "alpha_per_token",
    "block_efficiency",
    "ideal_block_efficiency",
    "selected",
    "mean_gamma",
    "plain_steps",
    "mbsu",
    "hw_speedup",
    "hw_speedup_verify",
    "speedup",
    "speedup_lo",
    "speedup_hi",
    "target_tokens_per_s",
    "spec_tokens_per_s",
    "matches_target",
    "wall_time_s",
    "base_wall_time_s",
    "base_new_tokens",
)


def _groups(results: EvalResults) -> list[tuple[str, int, str]]:
    """(draft, gamma, mode) in row order."""
    seen: list[tuple[str, int, str]] = []
    for row in results.rows:
        key = (row["draft"], row.get("gamma", results.settings["gamma"]), row["mode"])
        if key not in seen:
            seen.append(key)
    return seen


def _value(results: EvalResults, draft: str, gamma: int, mode: str, task: str, metric: str) -> float | None:
    row = results.row(draft, mode, task, gamma)
    return None if row is None else row[metric]


def _group_label(results: EvalResults, draft: str, gamma: int, mode: str) -> str:
    """The draft's name, with its gamma when it ran at several (``*``: the gamma selected on calibration)."""
    if len({g for d, g, _ in _groups(results) if d == draft}) == 1 and not results.settings.get("selected_gamma"):
        return draft
    row = results.row(draft, mode, ALL, gamma) or {}
    return f"{draft} γ={gamma}{'*' if row.get('selected') else ''}"


def markdown_table(results: EvalResults) -> str:
    """One wide table: rows = draft x mode; columns = task x (α, τ, MBSU, speedup), then the pooled ``all``."""
    tasks = [*results.tasks, ALL]
    head = ["draft", "mode"] + [f"{t} {LABELS[m]}" for t in tasks for m in TABLE_METRICS]
    rows = []
    for draft, gamma, mode in _groups(results):
        cells = [_group_label(results, draft, gamma, mode), mode]
        for task in tasks:
            for metric in TABLE_METRICS:
                value = _value(results, draft, gamma, mode, task, metric)
                cells.append(
                    "—" if value is None else f"{value:.3f}" if metric == "acceptance_rate" else f"{value:.2f}"
                )
        rows.append(cells)
    return markdown.table(head, rows, "ll" + "r" * (len(head) - 2))


def interval_table(results: EvalResults) -> str:
    """Per draft x mode: the pooled speedup with its 90% bootstrap interval over prompts, and the gamma charged."""
    rows = [
        [
            row["draft"],
            row["mode"],
            f"{row.get('gamma', results.settings['gamma']):g}{' (selected)' if row.get('selected') else ''}",
            f"{row.get('alpha_per_token', 0.0):.3f}",
            f"{row['speedup']:.2f}",
            interval_text(row.get("speedup_lo"), row.get("speedup_hi"), row["prompts"]),
        ]
        for row in results.rows
        if row["task"] == ALL
    ]
    return markdown.table(["draft", "mode", "γ", "α/token", "speedup (all)", "90% interval"], rows, "llrrrl")


def baselines_table(results: EvalResults) -> str:
    """transformers' prompt lookup / assisted generation on the same prompts (greedy), '' when none ran."""
    if not results.baselines:
        return ""
    header = [
        "method",
        "draft",
        "γ",
        "speedup (all)",
        "90% interval",
        "tokens per target call",
        "output = target's",
    ]
    rows = [
        [
            f"transformers {row['method'].replace('_', ' ')}",
            row["draft"] or "—",
            row["gamma"],
            f"{row['speedup']:.2f}",
            interval_text(row["speedup_lo"], row["speedup_hi"], row["prompts"]),
            f"{row['tokens_per_call']:.2f}",
            f"{row['matches_target']:.0%}",
        ]
        for row in results.baselines
        if row["task"] == ALL
    ]
    return markdown.table(header, rows, "llrrlrr")


def _markdown(results: EvalResults) -> str:
    s = results.settings
    drafts = markdown.table(
        ["draft", "path", "params", "c (bytes)", "draft step ms", "target step ms", "verify (γ+1) ms"],
        [
            [d.name, f"`{d.path}`", f"{d.params:,}", f"{d.c_params:.4f}", f"{d.draft_step_s * 1e3:.2f}"]
            + [f"{d.target_step_s * 1e3:.2f}", f"{d.verify_step_s * 1e3:.2f}"]
            for d in results.drafts
        ],
        "llrrrrr",
    )
    return f"""# Speculative-decoding evaluation

Target `{results.target}`; γ = {s["gamma"]}; modes: {", ".join(s["modes"])} (sampling: T = {s["temperature"]}, top-p {s["top_p"]});
{s["prompts_per_task"]} prompts per task ({s["source"]} sources), up to {s["max_new_tokens"]} new tokens;
seed {s["seed"]}; {s["num_workers"]} worker(s); evaluation wall time {results.wall_time_s:.1f} s.

α = accepted / proposed draft tokens; τ = tokens per target verify forward (bonus included);
MBSU = τ / (γ·c + 1) with c = the bytes a draft decode step reads / the target's (one embedding row each); speedup = wall-clock, target alone vs
speculative, same prompts, per emitted token. `all` pools every prompt.

{markdown_table(results)}

{interval_table(results)}

{baselines_table(results)}

{drafts}
"""


def _plot(results: EvalResults, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [*results.tasks, ALL]
    groups = _groups(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(len(groups), 1)
    for ax, metric in zip(axes, ("acceptance_rate", "speedup"), strict=True):
        for i, (draft, gamma, mode) in enumerate(groups):
            values = [_value(results, draft, gamma, mode, t, metric) or 0.0 for t in tasks]
            label = f"{_group_label(results, draft, gamma, mode)} ({mode})"
            ax.bar([x + i * width for x in range(len(tasks))], values, width, label=label)
        ax.set_xticks([x + width * (len(groups) - 1) / 2 for x in range(len(tasks))], tasks, rotation=15)
        ax.set_title({"acceptance_rate": "acceptance rate α", "speedup": "wall-clock speedup"}[metric])
        if metric == "speedup":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"target {results.target}, γ={results.settings['gamma']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_local(results: EvalResults, out: Path, config: dict | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results.to_dict(), indent=1))
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results.rows)
    (out / "results.md").write_text(_markdown(results))
    _plot(results, out / "results.png")
    metrics = {
        f"{d.name}/{mode}": results.metrics(d.name, mode)
        for d in results.drafts
        for mode in results.settings["modes"]
    }
    done = {
        "stage": "eval",
        "config": config,
        "metrics": metrics,
        "wall_time_s": results.wall_time_s,
        "inputs": {"target": results.target, "drafts": [d.path for d in results.drafts]},
    }
    done_file(out).write_text(json.dumps(done, indent=1))


def write_report(results: EvalResults, dest: str | Path, config: dict | None = None) -> str:
    """Write every report file to ``dest`` (``RunLayout.eval_dir``: a folder or an fsspec URL); returns it."""
    if isinstance(dest, Path) or not is_url(dest):
        _write_local(results, Path(dest), config)
        return str(dest)
    import pyarrow.fs

    with tempfile.TemporaryDirectory() as tmp:
        _write_local(results, Path(tmp), config)
        pyarrow.fs.copy_files(tmp, dest)
    return dest


def summary(results: EvalResults) -> str:
    """A few lines for the console: per draft and mode, the pooled α, τ, MBSU and speedups."""
    s = results.settings
    lines = [
        f"target {results.target}: γ={s['gamma']} ({s.get('gamma_policy', 'constant')}), "
        f"{s.get('precision', 'fp32')}, {len(results.tasks)} tasks, "
        f"{s['prompts_per_task']} prompts each, {results.wall_time_s:.0f} s"
    ]
    for draft, gamma, mode in _groups(results):
        row = results.row(draft, mode, ALL, gamma)
        lines.append(
            f"  {_group_label(results, draft, gamma, mode):<24} {mode:<8} α={row['acceptance_rate']:.3f}  τ={row['block_efficiency']:.2f}  "
            f"MBSU={row['mbsu']:.2f}  hw={row['hw_speedup']:.2f}  wall-clock={row['speedup']:.2f}x  "
            f"({row['spec_tokens_per_s']:.1f} vs {row['target_tokens_per_s']:.1f} tok/s)"
        )
        per_task = "  ".join(
            f"{r['task']}={r['acceptance_rate']:.2f}"
            for r in results.rows
            if (r["draft"], r["mode"], r.get("gamma", gamma)) == (draft, mode, gamma) and r["task"] != ALL
        )
        same = (
            "" if row["matches_target"] is None else f"  (output = target's greedy: {row['matches_target']:.0%})"
        )
        lines.append(f"  {'':<24} {'':<8} α by task: {per_task}{same}")
    return "\n".join(lines)
