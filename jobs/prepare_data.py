"""Prepare token shards (read -> tokenize with the target's tokenizer -> pack -> parquet + manifest) as a Ray job.

    python jobs/prepare_data.py --config cpu_default [--stage cp] [key.sub=value ...]
    ray job submit --working-dir . -- python jobs/prepare_data.py --config cpu_default --stage pt

The pipeline's own prepare stage: ``--stage pt`` or ``cp`` prepares that stage's data (its ``stages.<stage>``
overrides, e.g. CP's code:text mixture), no --stage prepares both. Output: the stage's data.output, else
<run_dir>/data/<data.name>. Re-running resumes an interrupted prepare (finished shards are kept) or returns at
once when the shards are complete.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from the working dir, installed or not

from fastdraft_ray.cli import parse_job_args, run_stages  # noqa: E402
from fastdraft_ray.stage_graph import PREPARE  # noqa: E402


def _arguments(parser) -> None:
    stages = [name.split("/")[1] for name in PREPARE]
    parser.add_argument("--stage", choices=stages, help="prepare only this stage's data (default: all)")


def main() -> None:
    cfg, args = parse_job_args(__doc__, add_arguments=_arguments)
    run_stages(cfg, only=[f"prepare/{args.stage}"] if args.stage else list(PREPARE))


if __name__ == "__main__":
    main()
