"""Pre-train (PT) or continue pre-training (CP) the draft with Ray Train + DeepSpeed; export a plain HF draft.

    python jobs/pretrain.py --config cpu_default --stage pt [key.sub=value ...]
    python jobs/pretrain.py --config cpu_default --stage cp      # starts from <run_dir>/pt/export
    ray job submit --working-dir . -- python jobs/pretrain.py --config cpu_default --stage pt

Data: the stage's prepared shards (jobs/prepare_data.py): --data DIR, else data.output, else
<run_dir>/data/<data.name> after the stage's overrides (``stages.<stage>`` in the recipe). Re-running resumes from
the stage's last checkpoint; a finished stage (DONE.json with the same config) is skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fastdraft_ray.cli import parse_job_args, setup_logging
from fastdraft_ray.config import stage_config
from fastdraft_ray.layout import RunLayout
from fastdraft_ray.train.run import completed_record, init_source, run_stage_job

log = logging.getLogger("pretrain")


def _arguments(parser) -> None:
    parser.add_argument(
        "--stage", choices=["pt", "cp"], required=True, help="pt: from scratch; cp: from PT export"
    )
    parser.add_argument("--data", help="prepared shard folder (default: from data.output / data.name)")
    parser.add_argument("--init-from", help="HF draft folder to start from (cp default: <run_dir>/pt/export)")


def main() -> None:
    cfg, args = parse_job_args(__doc__, add_arguments=_arguments)
    setup_logging()
    cfg = stage_config(cfg, args.stage)
    layout = RunLayout.of(cfg)
    data_dir = args.data or str(layout.data(cfg.data))
    init_from = args.init_from or init_source(cfg, args.stage)
    if args.stage == "cp" and not Path(init_from, "config.json").exists():
        raise SystemExit(
            f"CP starts from {init_from} (the PT export by default), which is not an HF draft folder: "
            "run --stage pt first (or pass --init-from DIR)"
        )
    done = completed_record(cfg)
    if done is not None:
        print(
            f"stage {args.stage} already done: {layout.stage(args.stage).done}; metrics {json.dumps(done['metrics'])}"
        )
        return
    run_stage_job(cfg, data_dir, init_from)


if __name__ == "__main__":
    main()
