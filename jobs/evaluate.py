"""Evaluate drafts against the target: α, τ, MBSU and wall-clock speedup per task family, sampling and greedy.

    python jobs/evaluate.py --config cpu_default                       # the run's finished stage drafts
    python jobs/evaluate.py --config cpu_default "evaluate.drafts=[runs/x/ft/export]" evaluate.num_workers=2
    ray job submit --working-dir . -- python jobs/evaluate.py --config cpu_default evaluate.prompts_per_task=2

The pipeline's own evaluate stage: the folders evaluate.drafts names, else the finished exports of the stages
pipeline.evaluate_drafts names, against one shared target baseline. An untrained draft for the floor (α ≈ 0):
python jobs/derive_draft.py, then evaluate.drafts=[<run_dir>/draft_init]. Reports go to <run_dir>/eval/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from the working dir, installed or not

from fastdraft_ray.cli import parse_job_args, run_stages  # noqa: E402
from fastdraft_ray.layout import RunLayout  # noqa: E402


def main() -> None:
    cfg, _ = parse_job_args(__doc__)
    run_stages(cfg, only=["evaluate"])
    print(f"report: {RunLayout.of(cfg).eval_dir}/results.md (+ results.csv, results.json, results.png)")


if __name__ == "__main__":
    main()
