"""FT stage: distil the target into the draft on KD data (jobs/generate.py) with Ray Train + DeepSpeed.

    python jobs/finetune.py --config cpu_default                       # from the export FT starts from
    python jobs/finetune.py --config cpu_default train.kd_loss=ce_kl   # needs generate.topk_logprobs > 0
    python jobs/finetune.py --config cpu_default run_name=base train.ft_responses=original \
        generate.output=runs/cpu_default/kd --init-from runs/cpu_default/pt/export   # baseline: original responses

The pipeline's own FT stage: it builds FT rows from the KD folder and trains with the shared training stack
(prompt tokens masked; loss = train.kd_loss), starting from CP's export when the run has CP (pipeline.stages),
else PT's. Re-running resumes from the last checkpoint; a finished stage with the same settings is skipped.
--kd, --data and --init-from are short for generate.output, stages.ft.data.output and stages.ft.draft.init_from.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from the working dir, installed or not

from fastdraft_ray.cli import parse_job_args, run_stages  # noqa: E402

FLAGS = {"kd": "generate.output", "data": "stages.ft.data.output", "init_from": "stages.ft.draft.init_from"}


def _arguments(parser) -> None:
    parser.add_argument("--kd", help="KD data folder (default: generate.output or <run_dir>/kd)")
    parser.add_argument("--data", help="FT row shard folder (default: <run_dir>/data/<FT's data.name>)")
    parser.add_argument("--init-from", help="HF draft folder to start from (default: CP's export, else PT's)")


def main() -> None:
    flags = lambda args: [f"{key}={getattr(args, flag)}" for flag, key in FLAGS.items() if getattr(args, flag)]  # noqa: E731
    cfg, _ = parse_job_args(__doc__, add_arguments=_arguments, flag_overrides=flags)
    run_stages(cfg, only=["ft"])


if __name__ == "__main__":
    main()
