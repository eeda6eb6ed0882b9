"""Acceptance against compute, runs side by side: the training proxy along each stage, the proxy of each stage's
draft, and the measured alpha/token of the run's evaluation, against wall minutes spent (PT, CP, KD, FT):

    python benchmarks/bench_alpha_compute.py --config cpu_quick --runs before=/tmp/a/cpu_quick after=/tmp/b/cpu_quick

For each run directory: the proxy curve its training stages logged to TensorBoard (``train/proxy_acceptance``
against ``train/elapsed_s``, stages end to end; absent for runs made before the proxy existed), and, for every
comparison the same way, each stage's draft (PT's untrained ``init``, then the PT, CP and FT exports) scored on ONE
proxy set built here with ``--config``'s settings, placed at the wall minutes the run had spent when that draft
existed (DONE.json wall times). The run's ``eval/results.json`` adds the measured alpha/token (sampling and greedy,
all families) and speedup of each evaluated draft. Writes ``benchmarks/results/alpha_compute_<date>.{md,csv,png}``.
Minutes are wall minutes on this machine (2 cores: CPU-minutes are twice that).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from pathlib import Path

import harness  # the repository on sys.path and the offline hub, before any model library loads

# isort: split

import torch

from fastdraft_ray.config import load_config
from fastdraft_ray.evaluate.metrics import ALL, EvalResults
from fastdraft_ray.layout import RunLayout
from fastdraft_ray.models.draft import load_draft
from fastdraft_ray.stage_graph import COMPUTE
from fastdraft_ray.train.curves import proxy_curve, stage_wall_s
from fastdraft_ray.train.proxy import load_or_build, score_draft


def measured(layout: RunLayout) -> dict[tuple[str, str], dict]:
    """``(draft name, mode) -> the pooled headline row`` of the run's evaluation (empty without one); the
    pipeline's evaluation names each draft by its stage."""
    path = Path(layout.eval_dir) / "results.json"
    if not path.exists():
        return {}
    results = EvalResults.from_dict(json.loads(path.read_text()))
    gamma = results.settings["gamma"]  # rows written before the gamma column ran at the evaluation's gamma
    return {
        (r["draft"], r["mode"]): {"gamma": gamma, **r}
        for r in results.rows
        if r["task"] == ALL and results.headline(r)
    }


def draft_points(layout: RunLayout, proxy, temperature: float, clock: RunLayout | None = None) -> list[dict]:
    """Each stage's draft scored on ``proxy``, at the minutes spent when it existed (stage wall times of ``clock``,
    default the run itself)."""
    spent, points = 0.0, []
    init = layout.stage("pt").init
    if (init / "config.json").exists():
        points.append({"draft": "init", "minutes": 0.0, **score_draft(load_draft(init), proxy, temperature)})
    evaluated = measured(layout)
    for stage in COMPUTE:
        spent += stage_wall_s(clock or layout, stage) or 0.0
        export = None if stage == "generate" else layout.stage(stage).export
        if export is None or not (export / "config.json").exists():
            continue
        point = {"draft": stage, "minutes": spent / 60, **score_draft(load_draft(export), proxy, temperature)}
        for mode in ("sampling", "greedy"):
            row = evaluated.get((stage, mode), {})
            point[f"{mode}_alpha_per_token"] = row.get("alpha_per_token")
            point[f"{mode}_speedup"] = row.get("speedup")
            point[f"{mode}_gamma"] = row.get("gamma")
        points.append(point)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu_default", help="settings of the shared proxy set")
    parser.add_argument("--runs", nargs="+", required=True, help="label=run_dir")
    parser.add_argument(
        "--clock",
        default="",
        help="label of the run whose stage wall times place every run's drafts (for runs with the same budgets "
        "when another one was timed on a busy machine)",
    )
    parser.add_argument("--out", default=str(harness.result_path("alpha_compute", "")))
    args = parser.parse_args()
    cfg = load_config(args.config, [])
    torch.set_num_threads(os.cpu_count() or 1)
    proxy = load_or_build(cfg, path=Path(tempfile.mkdtemp(prefix="alpha_compute_")) / "proxy.npz")
    temperature = cfg.train.proxy_temperature

    runs = {label: RunLayout.at(root) for label, _, root in (spec.partition("=") for spec in args.runs)}
    clock = runs[args.clock] if args.clock else None
    curves, points = {}, []
    for label, layout in runs.items():
        curves[label] = proxy_curve(layout)
        points += [{"run": label, **p} for p in draft_points(layout, proxy, temperature, clock)]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = [
        "run",
        "draft",
        "minutes",
        "proxy_acceptance",
        "proxy_top1",
        "sampling_alpha_per_token",
        "greedy_alpha_per_token",
        "sampling_speedup",
        "greedy_speedup",
    ]
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
        for label, rows in curves.items():  # the TensorBoard curves, same columns
            writer.writerows({"run": label, "draft": f"{r['stage']}@{r['step']}", **r} for r in rows)

    def fmt(value, digits=3):
        return "—" if value is None else f"{value:.{digits}f}"

    lines = [
        f"# Acceptance against compute, {harness.now()}",
        "",
        f"Shared proxy set: {len(proxy)} held-out prompts x <= {cfg.train.proxy_tokens} target-written tokens "
        f"({proxy.positions} positions), T = {temperature}. {harness.machine()}.",
        "",
        harness.table(
            ["run", "draft", "wall minutes spent", "proxy_acceptance", "proxy_top1", "measured α/token sampling"]
            + ["measured α/token greedy", "speedup sampling (γ)", "speedup greedy (γ)"],
            [
                [p["run"], p["draft"], f"{p['minutes']:.1f}", fmt(p["proxy_acceptance"]), fmt(p["proxy_top1"])]
                + [fmt(p.get("sampling_alpha_per_token")), fmt(p.get("greedy_alpha_per_token"))]
                + [f"{fmt(p.get('sampling_speedup'), 2)} ({p.get('sampling_gamma') or '—'})"]
                + [f"{fmt(p.get('greedy_speedup'), 2)} ({p.get('greedy_gamma') or '—'})"]
                for p in points
            ],
            "ll" + "r" * 7,
        ),
    ]
    if clock is not None:
        lines += ["", f"Stage drafts are placed at the stage wall times of `{args.clock}` (same budgets)."]
    clock_arg = f" --clock {args.clock}" if args.clock else ""
    lines += [
        "",
        f"Command: `python benchmarks/bench_alpha_compute.py --config {args.config} --runs {' '.join(args.runs)}"
        f"{clock_arg}`",
    ]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    _plot(curves, points, out.with_suffix(".png"))
    print(text)


def _plot(curves: dict, points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for ax, key, measured_key in zip(
        axes,
        ("proxy_acceptance", "proxy_top1"),
        ("sampling_alpha_per_token", "greedy_alpha_per_token"),
        strict=False,
    ):
        for i, (label, rows) in enumerate(curves.items()):
            color = f"C{i}"
            if rows:
                ax.plot(
                    [r["minutes"] for r in rows],
                    [r[key] for r in rows],
                    "-",
                    color=color,
                    lw=1,
                    label=f"{label}: proxy during training",
                )
            mine = [p for p in points if p["run"] == label]
            ax.plot(
                [p["minutes"] for p in mine],
                [p[key] for p in mine],
                "o",
                color=color,
                label=f"{label}: stage drafts (shared proxy set)",
            )
            got = [p for p in mine if p.get(measured_key) is not None]
            ax.plot(
                [p["minutes"] for p in got],
                [p[measured_key] for p in got],
                "x",
                color=color,
                ms=8,
                label=f"{label}: measured α/token",
            )
        ax.set_xlabel("wall minutes spent (PT, CP, KD generation, FT)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
