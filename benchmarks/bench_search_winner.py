"""Does the search's winner beat the median trial and the run's default shape? (issue 14's done-when)

    python benchmarks/bench_search_winner.py --config cpu_default storage=$PWD/runs [key=value ...]

Reads a finished search (``<run_dir>/search``: results.csv, DONE.json, profile.json) and takes three of its trials:
the winner, the median of the other trials (by ``search.metric``) and the run's own draft shape
(``search.include_default``).
A trial ASHA stopped early is trained on to the same token budget first (it resumes its own checkpoint), so all
three have the same training. Then all three are evaluated side by side against one shared target-alone baseline on
the evaluation's held-out prompts, which the search never used (the proxy uses the prompts after them and the
trials' measurement the ones after those), at the winner's predicted gamma, sampling and greedy. Printed and written
to ``benchmarks/results/search_winner_<date>.md``: per draft, proxy acceptance, the speedup the search's latency
model predicts from it, and the measured wall-clock speedup with its 90% bootstrap interval over prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import harness  # the repository on sys.path and the offline hub, before any model library loads

# isort: split

from fastdraft_ray.config import load_config
from fastdraft_ray.evaluate.metrics import interval_text
from fastdraft_ray.layout import RunLayout
from fastdraft_ray.search.latency import DeviceProfile
from fastdraft_ray.search.objective import data_dir, trial_config
from fastdraft_ray.search.run import default_point
from fastdraft_ray.search.space import Architecture, enumerate_space


def pick(rows: list[dict], metric: str, best: str, default: str | None) -> dict[str, dict]:
    """winner, median (of the trials other than those two, by metric) and default rows by role."""
    by_name = {r["name"]: r for r in rows}
    others = sorted((r for r in rows if r["name"] not in (best, default)), key=lambda r: r[metric])
    chosen = {"winner": by_name[best]}
    if others:
        chosen["median"] = others[len(others) // 2]
    if default and default in by_name and default != best:
        chosen["default"] = by_name[default]
    return chosen


def export_of(cfg, row: dict, profile: DeviceProfile, proxy) -> Path:
    """The trial's trained draft; a trial stopped early is trained on to the full budget first."""
    import ray

    from fastdraft_ray.data.stream import read_manifest
    from fastdraft_ray.train.run import train_stage

    arch = Architecture.from_dict(row)
    tcfg = trial_config(cfg, arch, f"{arch.name}_{row['trial_id']}", int(read_manifest(data_dir(cfg))["seq_len"]))
    layout = RunLayout.of(tcfg).stage("pt")
    if not layout.done.exists():
        if not ray.is_initialized():
            ray.init(num_cpus=(os.cpu_count() or 1) + 1)
        print(f"training {arch.name} on to the full budget (it was stopped at step {row['step']})", flush=True)
        model = profile.speedup_model(arch, cfg.evaluate.max_gamma)
        train_stage(tcfg, data_dir(cfg), proxy=proxy, speedup_model=model)
    return layout.export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu_default")
    ap.add_argument("--prompts-per-task", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import pandas as pd
    import torch

    from fastdraft_ray.config import stage_config
    from fastdraft_ray.evaluate.run import evaluate
    from fastdraft_ray.models.draft import load_draft
    from fastdraft_ray.models.target import load_target_config
    from fastdraft_ray.specdec.stats import SpeedupModel, expected_speedup
    from fastdraft_ray.train.proxy import load_or_build, score_draft

    cfg = load_config(args.config, args.overrides)
    search = RunLayout.of(cfg).search
    rows = pd.read_csv(search.results).to_dict("records")
    best = json.loads(search.done.read_text())["best"]["name"]
    profile = DeviceProfile.load(search.profile)
    target_config = load_target_config(cfg.model.target, cfg.model.trust_remote_code)
    default = default_point(cfg, enumerate_space(target_config, cfg.search))
    proxy = load_or_build(stage_config(cfg, "pt"))
    chosen = pick(rows, cfg.search.metric, best, default.name if default else None)
    exports = {role: export_of(cfg, row, profile, proxy) for role, row in chosen.items()}
    proxies = {role: score_draft(load_draft(path), proxy) for role, path in exports.items()}
    gamma = int(chosen["winner"].get("train/predicted_gamma") or 1)

    settings = dataclasses.replace(
        cfg.evaluate,
        prompts_per_task=args.prompts_per_task,
        max_new_tokens=args.max_new_tokens,
        modes=["sampling", "greedy"],
        gamma=gamma,
        gamma_select=[],
        baselines=[],
        gamma_policy="constant",
    )
    load_before = os.getloadavg()
    started = time.time()
    results = evaluate(cfg.model, [str(p) for p in exports.values()], settings)
    roles = {Path(p).parent.parent.name: role for role, p in exports.items()}
    lines = [
        f"# Search winner vs median trial vs default shape, {harness.now()}",
        "",
        f"Search {search.root} ({len(rows)} trials, {cfg.search.token_budget_per_trial:,} tokens each of "
        f"{cfg.search.data}); profile {profile.key}: target step {1000 * profile.target_step_s:.1f} ms, "
        f"v(2..4) = {', '.join(f'{v:.2f}' for v in profile.verify_cost[1:4])}. Evaluation: {args.prompts_per_task} "
        f"held-out prompts per family (the evaluated ones: never used by the search) x {args.max_new_tokens} tokens, "
        f"gamma {gamma} (the winner's predicted), {settings.num_workers} worker(s) x {settings.cpus_per_worker} "
        f"thread(s), one shared target-alone baseline; {time.time() - started:.0f} s. torch {torch.__version__}; "
        f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}.",
        "",
    ]
    table = []
    for info in results.drafts:
        role = roles.get(Path(info.path).parent.parent.name, info.name)
        row = chosen[role]
        arch = Architecture.from_dict(row)
        model: SpeedupModel = profile.speedup_model(arch, cfg.evaluate.max_gamma)
        for mode, key in (("sampling", "proxy_acceptance"), ("greedy", "proxy_top1")):
            r = results.row(info.name, mode, "all", gamma)
            alpha = proxies[role][key]
            predicted = expected_speedup(alpha, gamma, model.c, model.verify_cost)
            table.append(
                [role, arch.name, mode, f"{alpha:.3f}", f"{predicted:.2f}", f"{r['alpha_per_token']:.3f}"]
                + [f"{r['speedup']:.2f} {interval_text(r['speedup_lo'], r['speedup_hi'], r['prompts'])}"]
                + [f"{predicted / r['speedup']:.2f}", r["matches_target"] if mode == "greedy" else "—"]
            )
    head = ["role", "shape", "mode", "proxy (this set)", "predicted", "measured α/token", "measured speedup [90%]"]
    lines.append(harness.table([*head, "predicted / measured", "greedy = target"], table, "lll" + "r" * 6))
    cmd = f"python benchmarks/bench_search_winner.py {' '.join(sys.argv[1:])}"
    lines += ["", f"Command: `{cmd}`", ""]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out or harness.result_path("search_winner"))
    out.write_text(text)


if __name__ == "__main__":
    main()
