"""Do two runs of the pipeline give the same results? For restructurings that must not change any number:

    python benchmarks/compare_runs.py A/cpu_quick B/cpu_quick [--out FILE.md]

Compares, stage by stage, the training losses (train/val, every digit of each DONE.json), the KD rows (every
prompt and response token), the evaluation's per-prompt output tokens and counters, and α / τ per (draft, mode,
task). Prints a Markdown report (written to ``--out`` too) and exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import harness  # the repository on sys.path and the offline hub, before any model library loads

# isort: split

import pyarrow.parquet as pq

from fastdraft_ray.stage_graph import TRAINING

KEYS = ("train/loss", "val/loss", "train/proxy_acceptance", "train/proxy_top1")


def _done(run: Path, stage: str) -> dict | None:
    path = run / stage / "DONE.json"
    return json.loads(path.read_text()) if path.exists() else None


def _kd_rows(run: Path) -> list[tuple]:
    rows = []
    for path in sorted((run / "kd").glob("responses/*/part-*.parquet")):
        table = pq.read_table(path, columns=["prompt_id", "temperature", "prompt_ids", "response_ids"])
        rows += [tuple(json.dumps(v) for v in r.values()) for r in table.to_pylist()]
    return sorted(rows)


def _eval(run: Path) -> dict:
    results = json.loads((run / "eval" / "results.json").read_text())
    records = {
        (r["prompt_id"], r["draft"], r["mode"], r["gamma"]): (r["tokens"], r["proposed"], r["accepted"])
        for r in results["records"]
    }
    rows = {
        (r["draft"], r["mode"], r["task"], r["gamma"]): (
            round(r["acceptance_rate"], 12),
            round(r["block_efficiency"], 12),
        )
        for r in results["rows"]
    }
    return {"records": records, "rows": rows}


def compare(a: Path, b: Path) -> tuple[list[list], bool]:
    table, same_all = [], True

    def row(what: str, left, right, same: bool) -> None:
        nonlocal same_all
        same_all &= same
        table.append([what, left, right, "same" if same else "**DIFFERENT**"])

    for stage in TRAINING:
        da, db = _done(a, stage), _done(b, stage)
        if da is None and db is None:
            continue
        for key in KEYS:
            va, vb = ((d or {}).get("metrics", {}).get(key) for d in (da, db))
            row(f"{stage.upper()} {key}", va, vb, va == vb)
    kd_a, kd_b = _kd_rows(a), _kd_rows(b)
    row("KD rows (prompt + response tokens)", len(kd_a), len(kd_b), kd_a == kd_b)
    ea, eb = _eval(a), _eval(b)
    same_tokens = ea["records"] == eb["records"]
    row(
        "evaluation outputs and counters (per prompt, draft, mode, γ)",
        len(ea["records"]),
        len(eb["records"]),
        same_tokens,
    )
    same_rows = ea["rows"] == eb["rows"]
    row("α and τ per (draft, mode, task, γ)", len(ea["rows"]), len(eb["rows"]), same_rows)
    return table, same_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="run directory (e.g. before/cpu_quick)")
    ap.add_argument("b", type=Path, help="run directory to compare with")
    ap.add_argument("--out", type=Path, help="write the report here too")
    args = ap.parse_args()
    table, same = compare(args.a, args.b)
    text = "\n".join(
        [
            f"# Same results? `{args.a}` vs `{args.b}` ({harness.now()})",
            "",
            f"Command: `python benchmarks/compare_runs.py {' '.join(sys.argv[1:])}`",
            "",
            harness.table(["what", "A", "B", ""], table, "lrrl"),
            "",
            f"**{'Every value identical.' if same else 'Runs differ.'}**",
            "",
        ]
    )
    print(text)
    if args.out:
        args.out.write_text(text)
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
