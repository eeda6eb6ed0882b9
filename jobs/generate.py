"""Generate target-written distillation (KD) data with Ray Data batch inference: responses at every configured
temperature (0.0 = greedy), optional Magpie instructions, optional top-k log-probs and on-policy rows.

    python jobs/generate.py --config cpu_default [generate.num_prompts=500 generate.magpie_prompts=100 ...]
    ray job submit --working-dir . -- python jobs/generate.py --config cpu_default

Output: generate.output or <run_dir>/kd (see fastdraft_ray/distill/generate.py). Re-running continues an
interrupted job; each (prompt, temperature) is generated exactly once.
"""

from __future__ import annotations

import json
import logging

from fastdraft_ray.cli import parse_job_args, setup_logging
from fastdraft_ray.distill.generate import check_config, run_generation
from fastdraft_ray.layout import RunLayout
from fastdraft_ray.ray_runtime import init_ray, local_ray_cpus

log = logging.getLogger("generate")


def _arguments(parser) -> None:
    parser.add_argument("--max-units", type=int, help="stop after this many work units (then re-run to continue)")


def main() -> None:
    cfg, args = parse_job_args(__doc__, add_arguments=_arguments)
    setup_logging()
    g = cfg.generate
    kd = RunLayout.of(cfg).kd
    done = kd.done
    if done.exists() and args.max_units is None:
        check_config(kd, cfg)  # same settings, else a clear error
        print(f"KD data already generated: {done}")
        return
    init_ray(**local_ray_cpus(g.num_actors * g.cpus_per_actor))
    record = run_generation(cfg, max_units=args.max_units)
    if not record.get("done"):
        print(f"stopped early (--max-units {args.max_units}); re-run to continue into {kd.root}")
        return
    print(f"KD data: {record['rows']} responses, {record['tokens']:,} tokens in {record['wall_time_s']:.0f} s")
    print(json.dumps(record["by_writer_temperature"], indent=1))
    print(f"written to {record['output']}")


if __name__ == "__main__":
    main()
