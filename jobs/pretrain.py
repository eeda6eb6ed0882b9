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
import os
from pathlib import Path

from fastdraft_ray.cli import init_ray, parse_job_args, setup_logging
from fastdraft_ray.config import stage_config
from fastdraft_ray.data.prepare import default_output
from fastdraft_ray.train.curves import plot_loss_curves
from fastdraft_ray.train.run import completed_record, stage_dir, train_stage

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
    data_dir = args.data or default_output(cfg.run_dir, cfg.data)
    init_from = args.init_from or cfg.draft.init_from
    if args.stage == "cp" and not init_from:
        init_from = str(stage_dir(cfg, "pt") / "export")
        if not Path(init_from, "config.json").exists():
            raise SystemExit(
                f"CP starts from the PT export, but {init_from} does not exist: run --stage pt first "
                "(or pass --init-from DIR)"
            )
    done = completed_record(cfg)
    if done is not None:
        print(
            f"stage {args.stage} already done: {stage_dir(cfg)}/DONE.json; metrics {json.dumps(done['metrics'])}"
        )
        return
    local = not os.environ.get("RAY_ADDRESS")
    # Locally, count one logical CPU more than the cores so Ray Data can read shards beside the workers.
    need = cfg.train.num_workers * cfg.train.cpus_per_worker
    init_ray(**({"num_cpus": max(os.cpu_count() or 1, need) + 1} if local else {}))
    record = train_stage(cfg, data_dir, init_from=init_from)
    metrics = record["metrics"]
    print(
        f"stage {args.stage}: {record['geometry']['tokens']:,} tokens in {record['wall_time_s']:.0f} s; "
        f"train/loss {metrics.get('train/loss')}, val/loss {metrics.get('val/loss')}"
    )
    print(f"draft exported to {record['outputs']['export']}")
    if "://" not in cfg.run_dir:  # a picture of the run so far: train/val loss of every finished stage
        print(f"loss curve: {plot_loss_curves(cfg.run_dir, Path(cfg.run_dir) / 'loss_curve.png')}")


if __name__ == "__main__":
    main()
