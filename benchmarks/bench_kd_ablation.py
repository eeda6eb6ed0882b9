"""The FastDraft paper's KD-loss ablation on this target: FT from the same CP draft, on the same KD data (the
target's answers with its top-k log-probs stored), for the same FT budget, with each loss — CE on the answers,
½CE+½KL, ½CE+½TVD, KL, TVD to the stored distribution — then all FT drafts evaluated together against ONE target
baseline at the paper's protocol (γ = 3, T = 0.6) and greedy:

    python benchmarks/bench_kd_ablation.py --base runs/cpu_default --out /tmp/kd_ablation

``--base``: a finished run of ``--config`` (its data/, pt/, cp/ and pipeline record are copied, so PT and CP are
adopted, not re-run). KD data is generated once into ``<out>/kd`` (``generate.topk_logprobs=--topk``) and shared by
every variant; each variant is the pipeline up to FT in ``<out>/<loss>/``. Writes
``benchmarks/results/kd_ablation_<date>.{md,csv}``: α per family and mode, the training proxy at the end of FT,
the FT val loss and minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import harness  # the repository on sys.path and the offline hub, before any model library loads

# isort: split

from fastdraft_ray.config import load_config
from fastdraft_ray.evaluate.metrics import ALL
from fastdraft_ray.evaluate.run import evaluate
from fastdraft_ray.ray_runtime import init_ray
from fastdraft_ray.stage_graph import PRETRAINING

LOSSES = ("ce", "ce_kl", "ce_tvd", "kl", "tvd")
COPIED = ("data", "proxy", "pipeline.json", *PRETRAINING)  # the run folders of the finished PT/CP part


def copy_base(base: Path, run: Path) -> None:
    """The finished PT/CP part of ``base`` into ``run`` (training checkpoints left out: only exports are read)."""
    run.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src, dst = base / name, run / name
        if dst.exists() or not src.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("step_*"))
        else:
            shutil.copy2(src, dst)


def fine_tune(args, loss: str) -> dict:
    """The pipeline up to FT for ``loss`` in ``<out>/<loss>``; FT's DONE.json."""
    run = args.out / loss
    copy_base(args.base, run)
    cmd = [
        sys.executable,
        str(harness.ROOT / "jobs/pipeline.py"),
        "--config",
        args.config,
        f"storage={args.out}",
        f"run_name={loss}",
        f"generate.output={args.out / 'kd'}",
        f"generate.topk_logprobs={args.topk}",
        f"stages.ft.train.kd_loss={loss}",
        "pipeline.stages=[prepare,pt,cp,generate,ft]",
    ]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "RAY_ADDRESS": "local"})
    return json.loads((run / "ft" / "DONE.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu_default")
    parser.add_argument("--base", type=Path, required=True, help="a finished run directory of --config")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--topk", type=int, default=32, help="target log-probs stored per answer token")
    parser.add_argument("--prompts-per-task", type=int, default=4)
    args = parser.parse_args()
    args.base, args.out = args.base.resolve(), args.out.resolve()
    print(harness.machine(), flush=True)
    done = {}
    for loss in args.losses:
        start = time.perf_counter()
        done[loss] = fine_tune(args, loss)
        print(f"[kd-ablation] {loss}: FT done, {time.perf_counter() - start:.0f} s with KD data", flush=True)

    cfg = load_config(
        args.config,
        [
            "evaluate.gamma_select=[]",
            "evaluate.gamma=3",
            f"evaluate.prompts_per_task={args.prompts_per_task}",
        ],
    )
    init_ray(num_cpus=(os.cpu_count() or 1) + 1)
    drafts = [str(args.out / loss / "ft" / "export") for loss in args.losses]
    results = evaluate(cfg.model, drafts, cfg.evaluate)
    names = dict(zip([info.name for info in results.drafts], args.losses, strict=True))
    rows = []
    for row in results.rows:
        loss = names[row["draft"]]
        metrics = done[loss]["metrics"]
        rows.append(
            {
                "loss": loss,
                "mode": row["mode"],
                "task": row["task"],
                "gamma": row["gamma"],
                "acceptance_rate": round(row["acceptance_rate"], 4),
                "alpha_per_token": round(row["alpha_per_token"], 4),
                "speedup": round(row["speedup"], 3),
                "proxy_acceptance": round(metrics.get("train/proxy_acceptance", float("nan")), 4),
                "proxy_top1": round(metrics.get("train/proxy_top1", float("nan")), 4),
                "ft_val_loss": round(metrics.get("val/loss", float("nan")), 4),
                "ft_minutes": round(done[loss]["wall_time_s"] / 60, 2),
            }
        )
    with open(harness.result_path("kd_ablation", ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tasks = [t for t in results.tasks] + [ALL]
    lines = [
        f"# KD-loss ablation ({args.config}, FT from the same CP draft on the same KD data, top-{args.topk} stored)",
        "",
        f"`python benchmarks/bench_kd_ablation.py --config {args.config} --base {args.base} --out {args.out}`",
        "",
        harness.machine(),
        "",
        f"Acceptance rate α at γ = 3 ({args.prompts_per_task} held-out prompts per family × "
        f"{cfg.evaluate.max_new_tokens} tokens), one shared target baseline; proxy = train/proxy_acceptance "
        "(Σ min(p, q), T = 0.6) at the end of FT.",
        "",
    ]
    for mode in cfg.evaluate.modes:
        lines += [
            f"## {mode}" + (f" (T = {cfg.evaluate.temperature})" if mode == "sampling" else ""),
            "",
        ]
        table = []
        for loss in args.losses:
            by_task = {r["task"]: r for r in rows if r["loss"] == loss and r["mode"] == mode}
            a = by_task[ALL]
            table.append(
                [loss, *(f"{by_task[t]['acceptance_rate']:.3f}" for t in tasks), f"{a['alpha_per_token']:.3f}"]
                + [f"{a['speedup']:.2f}×", f"{a['proxy_acceptance']:.3f}", f"{a['ft_val_loss']:.3f}"]
                + [f"{a['ft_minutes']:.1f}"]
            )
        head = ["loss", *tasks, "α/token", "speedup", "proxy", "FT val loss", "FT min"]
        lines += [harness.table(head, table, "l" + "r" * (len(head) - 1)), ""]
    harness.result_path("kd_ablation").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
