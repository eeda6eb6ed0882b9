"""Search the draft's depth x width x heads x head vocabulary x init for the best predicted speedup (Ray Tune).

    python jobs/search.py --config cpu_default [search.num_samples=12 search.params_budget=30e6 ...]
    ray job submit --working-dir . -- python jobs/search.py --config cpu_default

Needs the run's prepared shards (``search.data``, default ``data/cp``: ``python jobs/prepare_data.py --stage cp``).
Each trial trains one shape for ``search.token_budget_per_trial`` tokens with Ray Train + DeepSpeed and reports
the training proxy and the speedup it predicts with the shape's measured latency; ASHA stops poor trials early;
finished trials are measured with speculative decoding on held-out prompts. Writes ``<run_dir>/search/``:
results.csv/.md, pareto.png, depth.png, latency_heatmap.png, profile.json and recipe.yaml (the winner:
``python jobs/pipeline.py --config <run_dir>/search/recipe.yaml``). Re-running resumes an interrupted search
(``Tuner.restore``). Watch it: ``tensorboard --logdir <run_dir>/search`` and the Ray dashboard's Jobs view.
"""

from __future__ import annotations

from fastdraft_ray.cli import parse_job_args, setup_logging


def main() -> None:
    cfg, _ = parse_job_args(__doc__)
    setup_logging()
    from fastdraft_ray.ray_runtime import init_ray, local_ray_cpus
    from fastdraft_ray.search.run import SearchError, run_search

    s = cfg.search
    init_ray(**local_ray_cpus(s.num_workers * s.cpus_per_worker + 1))
    try:
        result = run_search(cfg, echo=print)
    except SearchError as exc:
        raise SystemExit(f"search: {exc}") from None
    print(open(result.files["table"]).read())
    for name, path in result.files.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
