"""Which draft shape pays off best on this machine? A depth x width x head-vocabulary (K) sweep (issue #7, lever 5).

    python benchmarks/sweep_draft_arch.py --kd runs/cpu_default/kd --ft-data runs/cpu_default/data/ft \\
        --configs d4w256k8=4x256:8192:pca d4w256k8r=4x256:8192:random d2w256k8=2x256:8192:pca ... \\
        [--token-budget 512000] [--prompts-per-task 2 --max-new-tokens 64]

Every configuration is ``name=LAYERSxHIDDEN:K:INIT`` (K = 0 keeps the full head; INIT random|pca). Each one gets
the same training: a fresh draft of that shape (trimmed head counted on the KD data, embeddings initialised as
INIT says) fine-tuned by the real FT stage (``jobs/finetune.py``: Ray Train + DeepSpeed, CE on the target's
answers) for ``--token-budget`` row positions of the same FT rows. Then ``bench_draft_efficiency.py`` measures
them all side by side (held-out prompts, target alone vs speculative decoding, same precision) and this script
prints the configurations ranked by measured wall-clock speedup, with their training time. Finished trainings
are reused (the FT stage skips a DONE stage), so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastdraft_ray.config import load_config  # noqa: E402
from fastdraft_ray.layout import RunLayout  # noqa: E402
from fastdraft_ray.models.construct import prepare_init  # noqa: E402


def parse_config(spec: str) -> tuple[str, dict]:
    """``name=LxH:K:init`` -> (name, draft overrides)."""
    try:
        name, shape = spec.split("=", 1)
        dims, k, init = shape.split(":")
        layers, hidden = (int(x) for x in dims.lower().split("x"))
        k = int(k)
    except ValueError:
        raise SystemExit(
            f"--configs {spec!r}: expected name=LAYERSxHIDDEN:K:INIT, e.g. d4=4x256:8192:pca"
        ) from None
    heads = max(1, hidden // 64)
    draft = {
        "num_layers": layers,
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": max(1, heads // 2),
        "intermediate_size": 3 * hidden,
        "head_vocab": k,
        "init": init,
    }
    return name, draft


def train(name: str, draft: dict, args) -> tuple[Path, float]:
    """Build the initial draft and fine-tune it with the real FT stage; (export folder, training seconds)."""
    storage = Path(args.storage).resolve()
    overrides = [f"draft.{k}={v}" for k, v in draft.items()]
    overrides += [f"draft.head_vocab_from={Path(args.kd).resolve()}", f"storage={storage}"]
    overrides += [f"run_name=sweep_{name}", f"stages.ft.train.token_budget={args.token_budget}"]
    cfg = load_config("cpu_default", overrides)
    layout = RunLayout.of(cfg)
    export = layout.stage("ft").export
    init = prepare_init(cfg, layout.draft_init, None)
    start = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "jobs/finetune.py"), "--config", "cpu_default", *overrides]
    cmd += [
        "--kd",
        str(Path(args.kd).resolve()),
        "--data",
        str(Path(args.ft_data).resolve()),
        "--init-from",
        str(init),
    ]
    # A private local Ray per training (never another job's cluster), workers at nice 0 like the evaluation.
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_worker_niceness": "0"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    done = json.loads(layout.stage("ft").done.read_text())
    return export, float(done.get("wall_time_s", time.perf_counter() - start))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", required=True, help="name=LAYERSxHIDDEN:K:INIT")
    ap.add_argument("--extra-drafts", nargs="*", default=[], help="name=path drafts to measure alongside")
    ap.add_argument("--kd", default="runs/cpu_default/kd")
    ap.add_argument("--ft-data", default="runs/cpu_default/data/ft", help="FT row shards (jobs/finetune.py)")
    ap.add_argument("--storage", default="runs/sweep")
    ap.add_argument("--token-budget", type=int, default=512000, help="FT row positions per configuration")
    ap.add_argument("--prompts-per-task", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gamma-policy", nargs="+", default=["constant"])
    ap.add_argument("--out", default=None, help="markdown path (default benchmarks/results/sweep_<date>.md)")
    args = ap.parse_args()

    specs = dict(parse_config(s) for s in args.configs)
    trained = {}
    for name, draft in specs.items():
        trained[name] = train(name, draft, args)
        print(f"== {name}: trained in {trained[name][1]:.0f} s -> {trained[name][0]}", flush=True)

    out = Path(args.out or ROOT / "benchmarks/results" / f"sweep_{datetime.date.today():%Y-%m-%d}.md")
    drafts = [f"{n}={p}" for n, (p, _) in trained.items()] + args.extra_drafts
    bench = [sys.executable, str(ROOT / "benchmarks/bench_draft_efficiency.py"), "--drafts", *drafts]
    bench += ["--gamma-policy", *args.gamma_policy, "--modes", "greedy", "--out", str(out)]
    bench += ["--prompts-per-task", str(args.prompts_per_task), "--max-new-tokens", str(args.max_new_tokens)]
    subprocess.run(bench, check=True, cwd=ROOT)

    with open(out.with_suffix(".csv")) as fh:
        rows = [r for r in csv.DictReader(fh) if r["task"] == "all"]
    rows.sort(key=lambda r: -float(r["speedup"]))
    lines = [
        "",
        f"## Ranking (FT-only, {args.token_budget:,} row positions each; command: "
        f"`python benchmarks/sweep_draft_arch.py {' '.join(sys.argv[1:])}`)",
        "",
        "| config | shape | policy | alpha | c | wall-clock speedup | FT wall time |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        d = specs.get(r["draft"])
        shape = f"{d['num_layers']}x{d['hidden_size']}, K={d['head_vocab'] or 'full'}, {d['init']}" if d else "—"
        secs = f"{trained[r['draft']][1]:.0f} s" if r["draft"] in trained else "—"
        lines.append(
            f"| {r['draft']} | {shape} | {r['policy']} | {float(r['acceptance_rate']):.3f} | {float(r['c']):.3f} "
            f"| {float(r['speedup']):.2f}x | {secs} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    with open(out, "a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
