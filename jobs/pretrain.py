"""Pre-train (PT) or continue pre-training (CP) the draft with Ray Train + DeepSpeed; export a plain HF draft.

    python jobs/pretrain.py --config cpu_default --stage pt [key.sub=value ...]
    python jobs/pretrain.py --config cpu_default --stage cp      # starts from <run_dir>/pt/export
    ray job submit --working-dir . -- python jobs/pretrain.py --config cpu_default --stage pt

The pipeline's own PT / CP stage (jobs/pipeline.py with one stage): it trains on the stage's prepared shards
(jobs/prepare_data.py), resumes from the stage's last checkpoint, and is skipped when it finished with the same
settings and inputs. --data and --init-from are short for stages.<stage>.data.output / draft.init_from.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from the working dir, installed or not

from fastdraft_ray.cli import parse_job_args, run_stages  # noqa: E402
from fastdraft_ray.stage_graph import PRETRAINING  # noqa: E402


def _arguments(parser) -> None:
    parser.add_argument("--stage", choices=PRETRAINING, required=True, help="pt: from scratch; cp: from PT")
    parser.add_argument("--data", help="prepared shard folder (default: <run_dir>/data/<stage's data.name>)")
    parser.add_argument("--init-from", help="HF draft folder to start from (cp default: <run_dir>/pt/export)")


def _flags(args) -> list[str]:
    flags = [f"stages.{args.stage}.data.output={args.data}"] if args.data else []
    return flags + ([f"stages.{args.stage}.draft.init_from={args.init_from}"] if args.init_from else [])


def main() -> None:
    cfg, args = parse_job_args(__doc__, add_arguments=_arguments, flag_overrides=_flags)
    run_stages(cfg, only=[args.stage])


if __name__ == "__main__":
    main()
