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

import pyarrow.parquet as pq

from fastdraft_ray.cli import parse_job_args, setup_logging
from fastdraft_ray.config import stage_config
from fastdraft_ray.data.prepare import default_output
from fastdraft_ray.distill.ftdata import build_ft_rows
from fastdraft_ray.distill.generate import output_dir
from fastdraft_ray.models.target import load_tokenizer
from fastdraft_ray.train.run import completed_record, run_stage_job, stage_dir


def _arguments(parser) -> None:
    parser.add_argument("--kd", help="KD data folder (default: generate.output or <run_dir>/kd)")
    parser.add_argument("--data", help="FT row shard folder (default: data.output or <run_dir>/data/<data.name>)")
    parser.add_argument("--init-from", help="HF draft folder to start from (default: <run_dir>/cp/export)")


def _kd_topk(kd_dir: Path) -> int:
    files = sorted(kd_dir.glob("responses/*/part-*.parquet"))
    if not files or "topk_ids" not in pq.read_schema(files[0]).names:
        return 0
    first = pq.read_table(files[0], columns=["topk_ids"]).column("topk_ids").to_pylist()
    return next((len(r[0]) for r in first if r), 0)


def main() -> None:
    cfg, args = parse_job_args(__doc__, add_arguments=_arguments)
    setup_logging()
    cfg = stage_config(cfg, "ft")
    kd_dir = Path(args.kd) if args.kd else output_dir(cfg)
    data_dir = args.data or default_output(cfg.run_dir, cfg.data)
    init_from = args.init_from or cfg.draft.init_from or str(stage_dir(cfg, "cp") / "export")
    if not Path(init_from, "config.json").exists():
        raise SystemExit(
            f"FT starts from the CP export, but {init_from} does not exist: run CP first or pass --init-from"
        )
    done = completed_record(cfg)
    if done is not None:
        print(f"stage ft already done: {stage_dir(cfg)}/DONE.json; metrics {json.dumps(done['metrics'])}")
        return
    if not (kd_dir / "DONE.json").exists():
        raise SystemExit(f"no finished KD data in {kd_dir}: run jobs/generate.py first")
    topk = _kd_topk(kd_dir) if cfg.train.kd_loss != "ce" else 0
    manifest = build_ft_rows(
        kd_dir,
        data_dir,
        load_tokenizer(cfg.model.target, cfg.model.trust_remote_code),
        seq_len=cfg.data.seq_len,
        topk=topk,
        responses=cfg.train.ft_responses,
        val_fraction=cfg.data.val_fraction,
        rows_per_shard=cfg.data.rows_per_shard,
        seed=cfg.data.seed,
    )
    print(f"FT rows: {manifest['rows']} ({cfg.train.ft_responses} responses, top-k {topk}) in {data_dir}")
    run_stage_job(cfg, data_dir, init_from)


if __name__ == "__main__":
    main()
