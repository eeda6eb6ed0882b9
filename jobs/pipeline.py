"""The whole run in one Ray job: prepare shards -> PT -> CP -> generate KD data -> FT -> evaluate -> report.

    python jobs/pipeline.py --config cpu_quick [key.sub=value ...]
    ray job submit --working-dir . -- python jobs/pipeline.py --config cpu_default storage=$PWD/runs
    python jobs/pipeline.py --config cpu_default --dry-run            # what each stage would do, nothing run
    python jobs/pipeline.py --config llama31_8b_150m_8gpu --check     # the preflight checks alone, in minutes

Every stage writes into <storage>/<run_name>/ and is skipped when it finished with the same settings and inputs,
resumed when it has unfinished work (checkpoints, shards, KD units), re-run when its settings or inputs changed.
``pipeline.stages`` chooses stages, ``pipeline.force`` re-runs some. Report: <run_dir>/report/report.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from the working dir, installed or not

from fastdraft_ray.cli import parse_job_args, run_stages  # noqa: E402
from fastdraft_ray.pipeline.preflight import preflight, render  # noqa: E402
from fastdraft_ray.pipeline.run import plan, selected_stages  # noqa: E402
from fastdraft_ray.pipeline.stages import PipelineError  # noqa: E402


def _arguments(parser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print what each stage would do, run nothing")
    parser.add_argument("--check", action="store_true", help="run the preflight checks only (exit 1 if one fails)")


def main() -> None:
    cfg, args = parse_job_args(__doc__, add_arguments=_arguments)
    if args.check:
        checks = preflight(cfg, selected_stages(cfg))
        print(render(checks))
        raise SystemExit(1 if any(c.status == "fail" for c in checks) else 0)
    if not args.dry_run:
        result = run_stages(cfg)
        if result.report:
            print(f"report: {result.report} (+ results.csv, acceptance.png, loss_curve.png)")
        return
    try:
        for stage, action, reason in plan(cfg):
            print(f"{stage:<12} {action:<7} {reason}")
    except PipelineError as exc:
        raise SystemExit(f"pipeline error: {exc}") from None


if __name__ == "__main__":
    main()
