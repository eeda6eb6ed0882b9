"""Evaluate drafts against the target: α, τ, MBSU and wall-clock speedup per task family, sampling and greedy.

    python jobs/evaluate.py --config cpu_default [evaluate.drafts=[runs/x/ft/model] evaluate.num_workers=2 ...]
    ray job submit --working-dir . -- python jobs/evaluate.py --config cpu_default evaluate.prompts_per_task=2

With no draft given, a randomly initialised draft of shape ``draft.*`` is derived from the target, so even an
untrained draft has numbers (expect α ≈ 0 from it). Reports go to ``<run_dir>/eval/``.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from the working dir, installed or not

from fastdraft_ray.cli import parse_job_args, setup_logging  # noqa: E402
from fastdraft_ray.config import to_dict  # noqa: E402
from fastdraft_ray.evaluate.report import summary, write_report  # noqa: E402
from fastdraft_ray.evaluate.run import evaluate  # noqa: E402
from fastdraft_ray.layout import RunLayout  # noqa: E402
from fastdraft_ray.models.draft import new_draft, save_draft  # noqa: E402
from fastdraft_ray.models.target import load_target_config, load_tokenizer  # noqa: E402
from fastdraft_ray.ray_runtime import init_ray  # noqa: E402

log = logging.getLogger("evaluate")


def random_draft(cfg) -> str:
    """Derive a random draft of shape ``cfg.draft`` from the target and save it; return its folder."""
    target_cfg = load_target_config(cfg.model.target, cfg.model.trust_remote_code)
    draft = new_draft(target_cfg, cfg.draft, seed=cfg.train.seed)
    layout = RunLayout.of(cfg)
    root = Path(tempfile.mkdtemp()) if layout.remote else Path(layout.eval_dir)
    return str(
        save_draft(draft, load_tokenizer(cfg.model.target, cfg.model.trust_remote_code), root / "random_draft")
    )


def main() -> None:
    cfg, _ = parse_job_args(__doc__)
    setup_logging()
    drafts = list(cfg.evaluate.drafts)
    if not drafts:
        drafts = [random_draft(cfg)]
        print(
            f"no evaluate.drafts given: evaluating a RANDOMLY INITIALISED draft ({drafts[0]}); "
            "its numbers show the untrained floor (α ≈ 0), not a trained draft"
        )
    if cfg.evaluate.num_workers > 1 or cfg.evaluate.use_gpu:
        init_ray()  # RAY_ADDRESS (set by `ray job submit`) or a local Ray
    results = evaluate(cfg.model, drafts, cfg.evaluate)
    where = write_report(results, RunLayout.of(cfg).eval_dir, to_dict(cfg))
    print(summary(results))
    print(f"report: {where}/results.md (+ results.csv, results.json, results.png)")


if __name__ == "__main__":
    main()
