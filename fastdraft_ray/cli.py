"""What every ``jobs/*.py`` entry point shares: argument parsing into a ``FastDraftConfig``, logging, and running
stages through the pipeline (``run_stages``: one rule for done / adopted / resumed / re-run, one set of messages)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from fastdraft_ray.config import ConfigError, FastDraftConfig, describe, load_config
from fastdraft_ray.layout import RunLayout


def parse_job_args(
    description: str,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    flag_overrides: Callable[[argparse.Namespace], list[str]] | None = None,
) -> tuple[FastDraftConfig, argparse.Namespace]:
    """``--config RECIPE [--flags] key.sub=value ...`` -> (validated config, parsed extra flags).

    ``flag_overrides`` turns a job's own flags into config overrides (``--data DIR`` -> ``stages.pt.data.output=DIR``)
    applied after the command line's. A bad key or value exits with status 2 and a message naming the valid keys or
    the rule it broke. ``--show-config`` lists every key with its default and doc line.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu_default", help="shipped recipe name or YAML path")
    parser.add_argument("--show-config", action="store_true", help="list every config key with its doc and exit")
    if add_arguments:
        add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=3e-4")
    args = parser.parse_args(argv)
    if args.show_config:
        print(describe())
        sys.exit(0)
    try:
        cfg = load_config(args.config, [*args.overrides, *(flag_overrides(args) if flag_overrides else [])])
    except ConfigError as exc:
        parser.exit(2, f"config error: {exc}\n")
    return cfg, args


def setup_logging(level: int = logging.INFO) -> None:
    """One plain log format for jobs; quiet the chattiest libraries."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("urllib3", "filelock", "httpx", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stages(cfg: FastDraftConfig, only: list[str] | None = None):
    """Start Ray (the cluster of ``ray job submit``/``RAY_ADDRESS``, else a local one sized for the stages) and run
    the pipeline's ``only`` stages (all selected ones when None); one line per stage says what it did. A stage
    that cannot run exits with status 2 and the pipeline's message."""
    from fastdraft_ray.pipeline.run import format_summary, local_ray_resources, run_pipeline
    from fastdraft_ray.pipeline.stages import PipelineError
    from fastdraft_ray.ray_runtime import init_ray

    setup_logging()
    try:
        init_ray(**local_ray_resources(cfg, only))
        result = run_pipeline(cfg, only=only)
    except PipelineError as exc:
        raise SystemExit(f"pipeline error: {exc}") from None
    for outcome in result.outcomes:
        if outcome.action == "skipped":
            print(f"stage {outcome.stage} already done ({outcome.reason})")
        elif outcome.action != "not_selected":
            print(
                f"stage {outcome.stage} {outcome.action} in {outcome.wall_time_s:.0f} s: {format_summary(outcome.summary)}"
            )
            if outcome.output:
                print(f"draft exported to {outcome.output}")
    layout = RunLayout.of(cfg)
    if any(o.output and o.action != "not_selected" for o in result.outcomes):
        from fastdraft_ray.train.curves import plot_loss_curves

        print(f"loss curve: {plot_loss_curves(layout, layout.loss_curve)}")
    print(f"run directory: {layout.root}")
    return result
