"""What a search writes: the trials as a table (CSV + Markdown), three plots and the winner as a recipe.

Plots: ``pareto.png`` (draft step latency vs proxy acceptance, the non-dominated trials joined), ``depth.png``
(predicted and measured speedup against depth within the parameter budget: the paper's inverted U, if it holds
here) and ``latency_heatmap.png`` (measured draft step latency over depth x width on this device: does depth cost
more than width?). The best trial is the highest ``search.metric`` among the trials that ran to the end.
"""

from __future__ import annotations

import dataclasses
import math

import yaml

from fastdraft_ray import markdown
from fastdraft_ray.config import MODES, DraftConfig, FastDraftConfig, to_dict
from fastdraft_ray.evaluate.metrics import interval_text
from fastdraft_ray.layout import SearchLayout
from fastdraft_ray.search.latency import DeviceProfile, measure_drafts
from fastdraft_ray.search.space import Architecture, shape_at

COLUMNS = (
    ("name", "shape"),
    ("params", "params (M)"),
    ("search/draft_step_ms", "draft ms"),
    ("search/c", "c"),
    ("train/proxy_acceptance", "proxy α"),
    ("train/proxy_top1", "proxy top-1"),
    ("search/mbsu", "MBSU"),
    ("train/predicted_speedup", "predicted"),
    ("search/measured_alpha_per_token", "measured α/token"),
    ("search/measured_speedup", "measured"),
    ("step", "steps"),
    ("status", "status"),
)


def _fmt(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if key == "params":
        return f"{value / 1e6:.1f}"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict], metric: str) -> str:
    """The trials, best ``metric`` first; measured speedup with its 90% interval when a mode reported one."""
    ordered = sorted(rows, key=lambda r: -(r.get(metric) if r.get(metric) is not None else -math.inf))
    table = []
    for r in ordered:
        cells = []
        for key, _ in COLUMNS:
            cell = _fmt(key, r.get(key))
            if key == "search/measured_speedup" and r.get(key) is not None:
                mode = next((m for m in MODES if f"search/{m}/speedup" in r), None)
                if mode:
                    lo, hi = r.get(f"search/{mode}/speedup_lo"), r.get(f"search/{mode}/speedup_hi")
                    cell += " " + interval_text(lo, hi, int(r.get(f"search/{mode}/prompts", 0)))
            cells.append(cell)
        table.append(cells)
    return markdown.table([label for _, label in COLUMNS], table) + "\n"


def best_row(rows: list[dict], metric: str) -> dict:
    """The highest ``metric`` among trials that finished (measured); among all trials if none did."""
    finished = [r for r in rows if r["status"] == "measured" and r.get(metric) is not None]
    pool = finished or [r for r in rows if r.get(metric) is not None]
    if not pool:
        raise ValueError(f"no trial reported {metric}")
    return max(pool, key=lambda r: r[metric])


def searched_draft(cfg: FastDraftConfig, best: dict) -> DraftConfig:
    """``cfg.draft`` with the shape of a search's best row (its other keys, e.g. head_vocab_from, kept)."""
    return Architecture.from_dict(best).draft_config(cfg.draft)


def winner_recipe(cfg: FastDraftConfig, best: dict) -> dict:
    """The run's config with the winning shape as its draft, as a recipe dict (no search stage)."""
    draft = searched_draft(cfg, best)
    stages = [s for s in cfg.pipeline.stages if s != "search"]
    recipe = to_dict(dataclasses.replace(cfg, run_name=f"{cfg.run_name}_searched", draft=draft))
    recipe["pipeline"]["stages"] = stages
    return recipe


def _pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both (lower x, higher y), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def latency_grid(cfg: FastDraftConfig, profile: DeviceProfile, target_config) -> dict[tuple[int, int], float]:
    """Draft step ms over ``search.layers`` x ``search.hidden_sizes`` (first gqa / MLP ratio / head vocab, random
    init), measured on this device and added to the profile (shapes measured before are reused)."""
    from fastdraft_ray.models.draft import head_dim_of

    s, head_dim = cfg.search, head_dim_of(target_config)
    groups, ratio = (s.gqa_groups or [1])[0], (s.intermediate_ratios or [3.0])[0]
    k = 8192 if 8192 in s.head_vocabs else (s.head_vocabs or [0])[0]
    cells = {}
    for layers in s.layers:
        for hidden in s.hidden_sizes:
            shape = shape_at(layers, hidden, groups, ratio, k, "random", head_dim)
            if shape is not None:
                cells[(layers, hidden)] = Architecture.of(shape)
    seconds = measure_drafts(list(cells.values()), target_config, profile, s.latency_repeats)
    return {cell: 1000 * seconds[arch.name] for cell, arch in cells.items()}


def plot_search(layout: SearchLayout, rows: list[dict], grid: dict, metric: str, budget: str) -> dict[str, str]:
    """The three PNGs; returns ``{name: path}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    pts = [
        r
        for r in rows
        if r.get("search/draft_step_ms") is not None and r.get("train/proxy_acceptance") is not None
    ]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xy = [(r["search/draft_step_ms"], r["train/proxy_acceptance"]) for r in pts]
    ax.scatter(
        [x for x, _ in xy], [y for _, y in xy], c=["C0" if r["status"] == "measured" else "C7" for r in pts]
    )
    front = _pareto(xy)
    ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "C3o--", mfc="none", ms=12, label="Pareto front")
    for r, (x, y) in zip(pts, xy, strict=True):
        ax.annotate(
            f"{r['num_layers']}x{r['hidden_size']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xlabel("draft decode step (ms)")
    ax.set_ylabel("proxy acceptance (T = 0.6)")
    ax.set_title("Trials: latency vs proxy acceptance (grey: stopped early)")
    ax.legend()
    fig.tight_layout()
    files["pareto"] = str(layout.plot("pareto"))
    fig.savefig(files["pareto"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in ((metric, metric, "o"), ("search/measured_speedup", "measured speedup", "s")):
        have = [r for r in rows if r.get(key) is not None]
        ax.scatter([r["num_layers"] for r in have], [r[key] for r in have], marker=style, label=label, alpha=0.7)
        depths = sorted({r["num_layers"] for r in have})
        ax.plot(depths, [max(r[key] for r in have if r["num_layers"] == d) for d in depths], alpha=0.5)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("draft layers")
    ax.set_ylabel("speedup over the target alone")
    ax.set_title(f"Speedup against depth ({budget})")
    ax.legend()
    fig.tight_layout()
    files["depth"] = str(layout.plot("depth"))
    fig.savefig(files["depth"], dpi=120)
    plt.close(fig)

    if grid:
        depths, widths = sorted({d for d, _ in grid}), sorted({w for _, w in grid})
        data = [[grid.get((d, w), math.nan) for w in widths] for d in depths]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        im = ax.imshow(data, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(widths)), [str(w) for w in widths])
        ax.set_yticks(range(len(depths)), [str(d) for d in depths])
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xlabel("hidden size")
        ax.set_ylabel("layers")
        ax.set_title("Measured draft decode step (ms) on this device")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        files["latency_heatmap"] = str(layout.plot("latency_heatmap"))
        fig.savefig(files["latency_heatmap"], dpi=120)
        plt.close(fig)
    return files


def write_outputs(
    cfg: FastDraftConfig, layout: SearchLayout, rows: list[dict], profile: DeviceProfile, target_config
) -> tuple[dict[str, str], dict]:
    """Table, plots and recipe of a finished search; returns ``(files, best row)``."""
    import pandas as pd

    s = cfg.search
    best = best_row(rows, s.metric)
    pd.DataFrame(rows).to_csv(layout.results, index=False)
    md = layout.results.with_suffix(".md")
    header = (
        f"# Architecture search: {cfg.model.target}\n\nProfile {profile.key} ({profile.machine}): target step "
        f"{1000 * profile.target_step_s:.1f} ms, v(2..4) = {', '.join(f'{v:.2f}' for v in profile.verify_cost[1:4])}. "
        f"{len(rows)} trials, {s.token_budget_per_trial:,} tokens each of {s.data}; ranked by {s.metric}. "
        f"Best: **{best['name']}**.\n\n"
    )
    md.write_text(header + markdown_table(rows, s.metric))
    grid = latency_grid(cfg, profile, target_config)
    if not s.device_profile:
        profile.save(layout.profile)
    files = {"results": str(layout.results), "table": str(md)}
    files.update(plot_search(layout, rows, grid, s.metric, f"{s.budget_kind} parameters <= {s.params_budget:.3g}"))
    layout.recipe.write_text(
        f"# The best shape of the search in {layout.root} ({best['name']}): python jobs/pipeline.py --config "
        f"{layout.recipe}\n" + yaml.safe_dump(winner_recipe(cfg, best), sort_keys=False)
    )
    files["recipe"] = str(layout.recipe)
    return files, best
