"""Does a draft pay off on this machine? One row per (draft, precision, gamma policy, mode) (issue #7's table):

    python benchmarks/bench_draft_efficiency.py --drafts cp=runs/cpu_default/cp/export \\
        [--precision fp32 int8] [--linear-kernel torch auto] [--gamma-policy constant cost] [--modes greedy sampling] \\
        [--prompts-per-task 2 --max-new-tokens 48 --gamma 3 --threads 1] [--prior-alpha calibrate|0.1]

Each row runs the evaluation harness (``fastdraft_ray.evaluate.run.evaluate``: held-out prompts of the four
task families, target alone then speculative decoding back to back per prompt) with target AND draft at the
row's precision and linear kernel (``decode.linear_kernel``: torch's linear, or ``auto``, the small-batch kernel), so
every speedup is against the target alone AT THE SAME PRECISION AND KERNEL. Columns: alpha per task
family, c = measured draft step / target step, v(gamma+1) = measured cost of scoring gamma+1 tokens in one
target forward / one decode step, the mean gamma the policy used and the share of plain (gamma 0) steps, the
wall-clock speedup per task family and overall, the cost-model prediction tau / (gamma*c + v(gamma+1)), and for
greedy whether every output equals the target's own greedy output. ``--prior-alpha`` gives the cost policy a
known per-token acceptance (``evaluate.prior_alpha``): a number for every draft, or ``calibrate``: a constant-gamma
pass first measures each draft's ``alpha_per_token`` at that precision, then the cost pass uses it. Writes
``benchmarks/results/draft_efficiency_<date>.md`` and ``.csv`` with the machine in the header. Timings on a shared
machine are noisy: each row's baseline is re-run next to it, which keeps ratios fair, not absolute numbers.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import harness  # the repository on sys.path and the offline hub, before any model library loads

# isort: split

import torch

from fastdraft_ray.config import EvaluateConfig, ModelConfig
from fastdraft_ray.data.tasks import TASKS, load_tasks
from fastdraft_ray.evaluate.run import ALL, evaluate
from fastdraft_ray.models.target import load_tokenizer
from fastdraft_ray.specdec.policy import POLICIES
from fastdraft_ray.specdec.precision import PRECISIONS

FIELDS = (
    "draft",
    "precision",
    "linear_kernel",
    "policy",
    "mode",
    "task",
    "prompts",
    "new_tokens",
    "acceptance_rate",
    "alpha_per_token",
    "prior_alpha",
    "block_efficiency",
    "mean_gamma",
    "plain_step_share",
    "c",
    "verify_cost",
    "target_step_ms",
    "draft_step_ms",
    "predicted_speedup",
    "speedup",
    "matches_target",
)


def parse_drafts(items: list[str]) -> dict[str, str]:
    """``name=path`` pairs (a bare path is named after its folder)."""
    out = {}
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
        if not (Path(path) / "config.json").exists():
            raise SystemExit(f"--drafts {item}: {path} is not an HF model folder (no config.json)")
        out[name] = path
    return out


def _prior_alpha(value: str) -> str:
    """``--prior-alpha``: ``calibrate`` or a per-token acceptance in [0, 1]."""
    if value != "calibrate" and not 0.0 <= float(value) <= 1.0:
        raise argparse.ArgumentTypeError(f"--prior-alpha must be 'calibrate' or in [0, 1], got {value}")
    return value


def _calibrated(res, by_path: dict[str, str]) -> dict[str, float]:
    """Per draft path, the pooled per-token acceptance of a (constant-gamma) evaluation: greedy if it ran."""
    out, paths = {}, {d.name: d.path for d in res.drafts}
    for mode in ("sampling", "greedy"):  # greedy last: it wins when both ran
        out.update(
            {paths[r["draft"]]: r["alpha_per_token"] for r in res.rows if r["task"] == ALL and r["mode"] == mode}
        )
    return {path: alpha for path, alpha in out.items() if path in by_path}


def run_rows(args, drafts: dict[str, str], prompts) -> list[dict]:
    """Evaluate every (precision, policy); one output row per (draft, precision, policy, mode, task).

    With ``--prior-alpha calibrate`` the constant policy runs first at each precision (added if not asked) and
    the cost policy then runs once per draft with that draft's measured per-token acceptance as its prior."""
    rows = []
    by_path = {path: name for name, path in drafts.items()}
    calibrate = args.prior_alpha == "calibrate"
    policies = list(args.gamma_policy)
    if calibrate and "cost" in policies:
        policies = ["constant", *[p for p in policies if p != "constant"]]
    for kernel, precision in [(k, p) for k in args.linear_kernel for p in args.precision]:
        alphas: dict[str, float] = {}
        for policy in policies:
            if policy == "cost" and calibrate:
                groups = [([path], alphas[path]) for path in drafts.values()]
            else:
                fixed = float(args.prior_alpha) if args.prior_alpha not in (None, "calibrate") else -1.0
                groups = [(list(drafts.values()), fixed if policy == "cost" else -1.0)]
            for paths, prior in groups:
                cfg = EvaluateConfig(
                    tasks=list(prompts),
                    prompts_per_task=args.prompts_per_task,
                    max_new_tokens=args.max_new_tokens,
                    gamma=args.gamma,
                    temperature=args.temperature,
                    modes=args.modes,
                    seed=args.seed,
                    cpus_per_worker=args.threads,
                    precision=precision,
                    linear_kernel=kernel,
                    gamma_policy=policy,
                    confidence_threshold=args.confidence_threshold,
                    max_gamma=args.max_gamma,
                    prior_alpha=prior,
                )
                print(f"== precision {precision}, {kernel} linear, policy {policy}, prior {prior:g}", flush=True)
                res = evaluate(ModelConfig(target=args.target), paths, cfg, prompts=prompts)
                if policy == "constant":
                    alphas.update(_calibrated(res, by_path))
                rows += [
                    {**r, "linear_kernel": kernel} for r in _rows(args, res, by_path, precision, policy, prior)
                ]
    return rows


def _rows(args, res, by_path: dict[str, str], precision: str, policy: str, prior: float) -> list[dict]:
    """The output rows of one evaluation."""
    rows = []
    infos = {d.name: d for d in res.drafts}
    for r in res.rows:
        info = infos[r["draft"]]
        c = info.draft_step_s / info.target_step_s
        g = r["mean_gamma"] if policy != "constant" else args.gamma
        rows.append(
            {
                "draft": by_path.get(info.path, info.name),
                "precision": precision,
                "policy": policy,
                "mode": r["mode"],
                "task": r["task"],
                "prompts": r["prompts"],
                "new_tokens": r["new_tokens"],
                "acceptance_rate": r["acceptance_rate"],
                "alpha_per_token": r["alpha_per_token"],
                "prior_alpha": prior if prior >= 0 else None,
                "block_efficiency": r["block_efficiency"],
                "mean_gamma": r["mean_gamma"],
                "plain_step_share": r["plain_steps"] / max(r["steps"], 1),
                "c": c,
                "verify_cost": info.verify_cost[args.gamma],
                "target_step_ms": 1e3 * info.target_step_s,
                "draft_step_ms": 1e3 * info.draft_step_s,
                "predicted_speedup": r["hw_speedup_verify"] if g else 1.0,
                "speedup": r["speedup"],
                "matches_target": r["matches_target"],
            }
        )
    return rows


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(args, rows: list[dict], tasks: list[str], header: str) -> str:
    """One table: a row per (draft, precision, policy, mode); alpha and speedup per task family, then overall."""
    cols = [f"{t} α" for t in tasks] + [f"{t} speedup" for t in tasks]
    head = (
        ["draft", "precision", "linear", "policy", "mode", "target ms/step", "c", f"v({args.gamma + 1})", "mean γ"]
        + ["plain"]
        + cols
        + ["α all", "α/token", "prior α", "τ all", "predicted", "speedup all", "greedy = target"]
    )
    table = []
    groups = {}
    for r in rows:
        key = (r["draft"], r["precision"], r["linear_kernel"], r["policy"], r["mode"], r["prior_alpha"])
        groups.setdefault(key, {})[r["task"]] = r
    for (draft, precision, kernel, policy, mode, _), by_task in groups.items():
        a = by_task[ALL]
        cells = [draft, precision, kernel, policy, mode, _fmt(a["target_step_ms"], 1), _fmt(a["c"], 3)]
        cells += [_fmt(a["verify_cost"]), _fmt(a["mean_gamma"]), _fmt(a["plain_step_share"])]
        cells += [_fmt(by_task[t]["acceptance_rate"], 3) if t in by_task else "—" for t in tasks]
        cells += [_fmt(by_task[t]["speedup"]) if t in by_task else "—" for t in tasks]
        match = a["matches_target"]
        cells += [_fmt(a["acceptance_rate"], 3), _fmt(a["alpha_per_token"], 3), _fmt(a["prior_alpha"], 3)]
        cells += [_fmt(a["block_efficiency"]), _fmt(a["predicted_speedup"])]
        cells += [f"**{a['speedup']:.2f}**", "—" if match is None else f"{match:.0%} of prompts"]
        table.append(cells)
    notes = [
        "",
        "α = accepted / proposed draft tokens; α/token = per-token acceptance probability, accepted / (accepted + "
        "steps that stopped on a rejection); prior α = the known α/token the cost policy started from (— = "
        "unknown: optimistic prior 0.8); τ = tokens per target verify forward; c = draft step / target step "
        f"and v({args.gamma + 1}) = one forward scoring {args.gamma + 1} tokens / one decode step, both measured at "
        "the row's precision (medians, warm KV cache on the first prompt); mean γ = draft tokens per step actually "
        "proposed, plain = share of steps with γ = 0 (cost policy: speculation off; also the last step of a "
        "generation when the token budget leaves no room). predicted = τ / (mean γ · c + v(mean γ + 1)). "
        "speedup = wall-clock time per token of the target alone at the SAME precision / time per token of "
        "speculative decoding, same prompts, back to back. greedy = target: share of prompts whose greedy output "
        "is token-for-token the target's own (int8 dynamic quantisation scores a k-token chunk with one "
        "activation scale, so it need not be).",
    ]
    return "\n".join([header, "", harness.table(head, table, "l" * 5 + "r" * (len(head) - 5)), *notes, ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--drafts", nargs="+", required=True, help="name=path of HF draft folders")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS)
    ap.add_argument(
        "--linear-kernel",
        nargs="+",
        default=["auto"],
        choices=["torch", "auto"],
        help="decode.linear_kernel: torch's linear and/or the small-batch kernel (auto), each its own rows",
    )
    ap.add_argument("--gamma-policy", nargs="+", default=["constant"], choices=POLICIES)
    ap.add_argument("--modes", nargs="+", default=["greedy"], choices=["greedy", "sampling"])
    ap.add_argument("--temperature", type=float, default=0.6, help="sampling mode (paper protocol: 0.6)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--prompts-per-task", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--max-gamma", type=int, default=8)
    ap.add_argument("--confidence-threshold", type=float, default=0.4)
    ap.add_argument(
        "--prior-alpha",
        type=_prior_alpha,
        default=None,
        help="cost policy: known per-token acceptance of the drafts, or 'calibrate' (measured by a constant pass)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", default=None, help="markdown path (default benchmarks/results/draft_efficiency_<date>.md)"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    drafts = parse_drafts(args.drafts)
    tokenizer = load_tokenizer(args.target)
    prompts = load_tasks(tokenizer, args.tasks, args.prompts_per_task, args.seed)
    start = harness.machine()
    rows = run_rows(args, drafts, prompts)
    header = "\n".join(
        [
            f"# Draft efficiency on this machine ({harness.now()})",
            "",
            f"Command: `python benchmarks/bench_draft_efficiency.py {' '.join(sys.argv[1:])}`",
            f"Target: {args.target}; drafts: " + ", ".join(f"{n} = {p}" for n, p in drafts.items()),
            f"Prompts: {args.prompts_per_task} per task family ({', '.join(prompts)}), up to {args.max_new_tokens} "
            f"new tokens, EOS stops; gamma {args.gamma} (adaptive policies up to {args.max_gamma}); sampling at "
            f"T={args.temperature}.",
            f"Machine at start: {start}",
            f"Machine at end: {harness.machine()}",
        ]
    )
    report = render(args, rows, list(prompts), header)
    print(report)
    out = Path(args.out or harness.result_path("draft_efficiency"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"written to {out} and {out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
