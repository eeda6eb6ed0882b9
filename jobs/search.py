"""Search the draft's depth x width x heads x head vocabulary x init for the best predicted speedup (Ray Tune).

    python jobs/search.py --config cpu_default [search.num_samples=12 search.params_budget=30e6 ...]
    ray job submit --working-dir . -- python jobs/search.py --config cpu_default

The pipeline's own search stage. Needs the run's prepared shards (``search.data``, default ``data/cp``:
``python jobs/prepare_data.py --stage cp``). Each trial trains one shape for ``search.token_budget_per_trial``
tokens with Ray Train + DeepSpeed and reports the training proxy and the speedup it predicts with the shape's
measured latency; ASHA stops poor trials early; finished trials are measured with speculative decoding on
held-out prompts. Writes ``<run_dir>/search/``: results.csv/.md, pareto.png, depth.png, latency_heatmap.png,
profile.json and recipe.yaml (the winner: ``python jobs/pipeline.py --config <run_dir>/search/recipe.yaml``).
Re-running resumes an interrupted search (``Tuner.restore``). Watch it: ``tensorboard --logdir <run_dir>/search``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from the working dir, installed or not

from fastdraft_ray.cli import parse_job_args, run_stages  # noqa: E402
from fastdraft_ray.layout import RunLayout  # noqa: E402


def main() -> None:
    cfg, _ = parse_job_args(__doc__)
    run_stages(cfg, only=["search"])
    search = RunLayout.of(cfg).search
    print(search.results.with_suffix(".md").read_text())
    print(f"results: {search.results}; recipe of the winner: {search.recipe}; plots: {search.root}/*.png")


if __name__ == "__main__":
    main()
