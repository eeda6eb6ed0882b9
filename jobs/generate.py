"""Generate target-written distillation (KD) data with Ray Data batch inference: responses at every configured
temperature (0.0 = greedy), optional Magpie instructions, optional top-k log-probs and on-policy rows.

    python jobs/generate.py --config cpu_default [generate.num_prompts=500 generate.magpie_prompts=100 ...]
    ray job submit --working-dir . -- python jobs/generate.py --config cpu_default

The pipeline's own generate stage. Output: generate.output or <run_dir>/kd (see fastdraft_ray/distill/generate.py).
Re-running continues an interrupted job; each (prompt, temperature) is generated exactly once.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from the working dir, installed or not

from fastdraft_ray.cli import parse_job_args, run_stages  # noqa: E402


def main() -> None:
    cfg, _ = parse_job_args(__doc__)
    run_stages(cfg, only=["generate"])


if __name__ == "__main__":
    main()
