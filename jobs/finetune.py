"""FT stage: distil the target into the draft on KD data (jobs/generate.py) with Ray Train + DeepSpeed.

    python jobs/finetune.py --config cpu_default                       # from <run_dir>/cp/export, train.kd_loss=ce
    python jobs/finetune.py --config cpu_default train.kd_loss=ce_kl   # needs generate.topk_logprobs > 0
    python jobs/finetune.py --config cpu_default run_name=base train.ft_responses=original \
        generate.output=runs/cpu_default/kd --init-from runs/cpu_default/cp/export   # baseline: original responses

Builds FT row shards from the KD folder into data.output or <run_dir>/data/<data.name> (``stages.ft`` in the
recipe), then trains with the shared training stack (prompt tokens masked; loss = train.kd_loss). Re-running
resumes from the last checkpoint; a finished stage (DONE.json with the same config) is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastdraft_ray.cli import parse_job_args, setup_logging
from fastdraft_ray.config import stage_config
from fastdraft_ray.distill.ftdata import build_ft_data, kd_topk
from fastdraft_ray.layout import KDLayout, RunLayout
from fastdraft_ray.train.run import completed_record, init_source, run_stage_job


def _arguments(parser) -> None:
    parser.add_argument("--kd", help="KD data folder (default: generate.output or <run_dir>/kd)")
    parser.add_argument("--data", help="FT row shard folder (default: data.output or <run_dir>/data/<data.name>)")
    parser.add_argument("--init-from", help="HF draft folder to start from (default: <run_dir>/cp/export)")


def main() -> None:
    cfg, args = parse_job_args(__doc__, add_arguments=_arguments)
    setup_logging()
    cfg = stage_config(cfg, "ft")
    layout = RunLayout.of(cfg)
    kd = KDLayout(Path(args.kd).resolve()) if args.kd else layout.kd
    kd_dir = kd.root
    data_dir = args.data or str(layout.data(cfg.data))
    init_from = args.init_from or init_source(cfg, "ft")
    if not Path(init_from, "config.json").exists():
        raise SystemExit(
            f"FT starts from the CP export, but {init_from} does not exist: run CP first or pass --init-from"
        )
    done = completed_record(cfg)
    if done is not None:
        print(f"stage ft already done: {layout.stage('ft').done}; metrics {json.dumps(done['metrics'])}")
        return
    if not kd.done.exists():
        raise SystemExit(f"no finished KD data in {kd_dir}: run jobs/generate.py first")
    topk = kd_topk(kd_dir) if cfg.train.kd_loss != "ce" else 0
    manifest = build_ft_data(cfg, kd_dir, data_dir)
    print(f"FT rows: {manifest['rows']} ({cfg.train.ft_responses} responses, top-k {topk}) in {data_dir}")
    run_stage_job(cfg, data_dir, init_from)


if __name__ == "__main__":
    main()
