"""What every ``jobs/*.py`` entry point shares: argument parsing into a RunConfig and logging (Ray start-up:
``ray_runtime.init_ray``)."""

from __future__ import annotations

import argparse
import logging
import sys

from fastdraft_ray.config import ConfigError, RunConfig, describe, load_config


def parse_job_args(
    description: str, argv: list[str] | None = None, add_arguments=None
) -> tuple[RunConfig, argparse.Namespace]:
    """``--config RECIPE [--flags] key.sub=value ...`` -> (validated RunConfig, parsed extra flags).

    A bad key or value exits with status 2 and a message naming the valid keys. ``--show-config`` lists every
    key with its default and doc line.
    """
    parser = argparse.ArgumentParser(description=description)
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
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"config error: {exc}\n")
    return cfg, args


def setup_logging(level: int = logging.INFO) -> None:
    """One plain log format for jobs; quiet the chattiest libraries."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("urllib3", "filelock", "httpx", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
