"""Prepare token shards (read -> tokenize with the target's tokenizer -> pack -> parquet + manifest) as a Ray job.

    python jobs/prepare_data.py --config cpu_default [--stage cp] [key.sub=value ...]
    ray job submit --working-dir . -- python jobs/prepare_data.py --config cpu_default --stage pt

``--stage`` applies the recipe's ``stages.<stage>`` overrides (e.g. CP's code:text mixture). Output:
data.output, else <run_dir>/data/<data.name>. Connects to the cluster in RAY_ADDRESS when set, else starts a
local Ray. Re-running the same command resumes an interrupted run (finished shards are kept) or returns at
once when the shards are complete.
"""

from __future__ import annotations

import json

from fastdraft_ray.cli import parse_job_args, setup_logging
from fastdraft_ray.config import stage_config
from fastdraft_ray.data.prepare import prepare
from fastdraft_ray.layout import RunLayout
from fastdraft_ray.ray_runtime import init_ray


def _arguments(parser) -> None:
    parser.add_argument("--stage", help="apply the recipe's stages.<stage> overrides first (pt, cp, ...)")


def main() -> dict:
    cfg, args = parse_job_args(__doc__, add_arguments=_arguments)
    setup_logging()
    if args.stage:
        cfg = stage_config(cfg, args.stage)
    init_ray()
    out = str(RunLayout.of(cfg).data(cfg.data))
    manifest = prepare(cfg.data, cfg.model.target, out, trust_remote_code=cfg.model.trust_remote_code)
    summary = {
        "output": out,
        "rows": manifest["rows"],
        "tokens": manifest["tokens"],
        "proportions": {s["name"]: round(s["proportion"]["train"], 4) for s in manifest["sources"]},
        "dropped": manifest["dropped"],
        "wall_time_s": manifest["wall_time_s"],
    }
    print(json.dumps(summary, indent=2))
    return manifest


if __name__ == "__main__":
    main()
