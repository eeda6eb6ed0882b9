"""Does the training proxy predict measured acceptance? Proxy vs measured alpha/token for drafts that span a range:

    python benchmarks/bench_proxy.py --config cpu_quick storage=/tmp/runs [--layers 2 16 24] \\
        [--prompts-per-task 4 --max-new-tokens 64] [--drafts name=folder ...]

Drafts: the run's untrained PT draft (``pt/init``: random layers), its PT, CP and FT exports (those that exist),
drafts made of each ``--layers`` count of layers copied from the target (``draft.init=layers``, same kept head),
and any ``--drafts``. Each is scored by the training proxy (train/proxy.py: teacher-forced on held-out target-written
continuations, well under a second per draft) and evaluated by the harness (held-out prompts of the four families,
``evaluate.modes``, the config's gamma and temperature), in one process. Prints, per draft: proxy_acceptance (the
expected per-token acceptance at ``train.proxy_temperature``) next to the measured sampling alpha/token, and
proxy_top1 next to the measured greedy alpha/token, overall and per family; Spearman's rank correlation over
drafts; and writes ``benchmarks/results/proxy_vs_measured_<date>.{md,csv,png}``.

The proxy prompts are the ones right after the evaluated ones in the same seeded order, so the two sets never
share a prompt.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import harness  # the repository on sys.path and the offline hub, before any model library loads

# isort: split

import numpy as np
import torch

from fastdraft_ray.config import load_config
from fastdraft_ray.data.tasks import TASKS
from fastdraft_ray.evaluate.metrics import ALL
from fastdraft_ray.evaluate.run import evaluate
from fastdraft_ray.layout import RunLayout
from fastdraft_ray.models.construct import prepare_init
from fastdraft_ray.models.draft import load_draft
from fastdraft_ray.stage_graph import TRAINING
from fastdraft_ray.train.proxy import load_or_build, score_draft

MEASURED = {"sampling": "proxy_acceptance", "greedy": "proxy_top1"}  # measured mode -> the proxy that predicts it


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(values):
        order = np.argsort(values, kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values), dtype=float)
        for v in set(values):  # ties share their mean rank
            idx = [i for i, w in enumerate(values) if w == v]
            r[idx] = r[idx].mean()
        return r

    if len(x) < 3:
        return float("nan")
    return float(np.corrcoef(ranks(list(x)), ranks(list(y)))[0, 1])


def run_drafts(cfg, work: Path, layers: list[int], extra: list[str]) -> dict[str, str]:
    """Name -> HF folder of every draft to compare (see the module docstring)."""
    layout = RunLayout.of(cfg)
    drafts = {}
    if (layout.stage("pt").init / "config.json").exists():
        drafts["init"] = str(layout.stage("pt").init)
    for stage in TRAINING:
        if (layout.stage(stage).export / "config.json").exists():
            drafts[stage] = str(layout.stage(stage).export)
    for n in layers:
        shape = dataclasses.replace(cfg.draft, init="layers", num_layers=n, init_layers=[])
        folder = work / f"layers{n}"
        drafts[f"layers{n}"] = str(prepare_init(dataclasses.replace(cfg, draft=shape), folder, None))
    for spec in extra:
        name, _, path = spec.partition("=")
        drafts[name] = path
    if not drafts:
        raise SystemExit(f"no drafts under {layout.root}: run the pipeline there first, or pass --drafts")
    return drafts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu_default")
    parser.add_argument(
        "--layers", type=int, nargs="*", default=[2], help="also drafts of these many target layers (none: none)"
    )
    parser.add_argument("--drafts", nargs="*", default=[], help="extra name=folder drafts")
    parser.add_argument("--prompts-per-task", type=int, default=None, help="default: the config's evaluate value")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--out", default=str(harness.result_path("proxy_vs_measured", "")))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. storage=/tmp/runs")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    ev = dataclasses.replace(
        cfg.evaluate,
        prompts_per_task=args.prompts_per_task or cfg.evaluate.prompts_per_task,
        max_new_tokens=args.max_new_tokens or cfg.evaluate.max_new_tokens,
    )
    cfg = dataclasses.replace(cfg, evaluate=ev)
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench_proxy_"))
    drafts = run_drafts(cfg, work, args.layers, args.drafts)

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    proxy = load_or_build(cfg, path=work / "proxy.npz")  # skip = this evaluation's prompt count: disjoint
    build_s = time.perf_counter() - started
    proxies, score_s = {}, {}
    for name, path in drafts.items():
        t0 = time.perf_counter()
        proxies[name] = score_draft(load_draft(path), proxy, cfg.train.proxy_temperature)
        score_s[name] = time.perf_counter() - t0
    if ev.num_workers > 1 or ev.use_gpu:  # the harness spreads prompts over Ray actors
        from fastdraft_ray.ray_runtime import init_ray, local_ray_cpus

        init_ray(**local_ray_cpus(ev.num_workers * max(1, ev.cpus_per_worker)))
    results = evaluate(cfg.model, list(drafts.values()), ev)
    names = dict(zip([d.name for d in results.drafts], drafts, strict=False))  # evaluation's draft name -> ours

    rows = []
    for row in results.rows:
        if row["mode"] not in MEASURED or row["task"] not in (*TASKS, ALL):
            continue
        name = names[row["draft"]]
        key = MEASURED[row["mode"]]
        predicted = (
            proxies[name][key] if row["task"] == ALL else proxies[name].get(f"{row['task']}/{key.split('_')[1]}")
        )
        rows.append(
            {
                "draft": name,
                "mode": row["mode"],
                "task": row["task"],
                "proxy": predicted,
                "measured_alpha_per_token": row["alpha_per_token"],
                "acceptance_rate": row["acceptance_rate"],
                "speedup": row["speedup"],
                "proxy_seconds": score_s[name],
            }
        )
    overall = {m: [r for r in rows if r["mode"] == m and r["task"] == ALL] for m in MEASURED}
    rho = {
        m: spearman([r["proxy"] for r in rs], [r["measured_alpha_per_token"] for r in rs])
        for m, rs in overall.items()
    }
    pooled = [r for r in rows if r["task"] != ALL and r["proxy"] is not None]
    rho_family = spearman([r["proxy"] for r in pooled], [r["measured_alpha_per_token"] for r in pooled])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Training proxy vs measured acceptance, {harness.now()}",
        "",
        f"Target {cfg.model.target}; run {RunLayout.of(cfg).root}. Evaluation: {ev.prompts_per_task} held-out "
        f"prompts per family x {ev.max_new_tokens} tokens, gamma {ev.gamma}, T = {ev.temperature}, "
        f"{', '.join(ev.modes)}. Proxy: {len(proxy)} other held-out prompts x <= {cfg.train.proxy_tokens} "
        f"target-written tokens ({proxy.positions} positions, top-{cfg.train.proxy_topk}), built in {build_s:.0f} s; "
        f"T = {cfg.train.proxy_temperature}. {harness.machine()}; load average before {load_before:.2f}.",
        "",
    ]
    table = []
    for name in drafts:
        got = {r["mode"]: r for r in rows if r["draft"] == name and r["task"] == ALL}
        s, g = got.get("sampling", {}), got.get("greedy", {})
        table.append(
            [
                name,
                f"{proxies[name]['proxy_acceptance']:.3f}",
                f"{s.get('measured_alpha_per_token', float('nan')):.3f}",
            ]
            + [f"{proxies[name]['proxy_top1']:.3f}", f"{g.get('measured_alpha_per_token', float('nan')):.3f}"]
            + [f"{score_s[name]:.2f}"]
        )
    head = [
        "draft",
        "proxy_acceptance",
        "measured sampling alpha/token",
        "proxy_top1",
        "measured greedy alpha/token",
    ]
    lines += [
        harness.table([*head, "proxy s"], table, "lrrrrr"),
        "",
        f"Spearman over drafts: sampling {rho.get('sampling', float('nan')):.2f}, greedy "
        f"{rho.get('greedy', float('nan')):.2f}; over (draft, family, mode) points: {rho_family:.2f}.",
        "",
        f"Command: `python benchmarks/bench_proxy.py --config {args.config} {' '.join(args.overrides)} "
        f"--layers {' '.join(map(str, args.layers))} --prompts-per-task {ev.prompts_per_task} --max-new-tokens {ev.max_new_tokens}"
        + (f" --drafts {' '.join(args.drafts)}" if args.drafts else "")
        + "`",
    ]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    _plot(rows, out.with_suffix(".png"))
    print(text)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, mode in zip(axes, MEASURED, strict=False):
        pts = [r for r in rows if r["mode"] == mode and r["proxy"] is not None]
        fam = [r for r in pts if r["task"] != ALL]
        ax.scatter(
            [r["proxy"] for r in fam],
            [r["measured_alpha_per_token"] for r in fam],
            s=12,
            alpha=0.4,
            label="per family",
        )
        top = [r for r in pts if r["task"] == ALL]
        ax.scatter(
            [r["proxy"] for r in top], [r["measured_alpha_per_token"] for r in top], s=40, label="all families"
        )
        for r in top:
            ax.annotate(r["draft"], (r["proxy"], r["measured_alpha_per_token"]), fontsize=8)
        hi = max([0.05] + [max(r["proxy"], r["measured_alpha_per_token"]) for r in pts]) * 1.1
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_xlabel(MEASURED[mode])
        ax.set_ylabel(f"measured {mode} alpha/token")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
