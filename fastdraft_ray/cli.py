"""What every ``jobs/*.py`` entry point shares: argument parsing into a RunConfig, logging, Ray start-up."""

from __future__ import annotations

import argparse
import logging
import os
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


def init_ray(**kwargs):
    """Connect to the cluster this job was submitted to (or RAY_ADDRESS), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    try:
        try:
            ray.init(address=address or None, **kwargs)
        except ValueError as exc:  # ray.init found a cluster started with `ray start`: join it as it is
            if address or not kwargs or "existing cluster" not in str(exc):
                raise
            logging.getLogger(__name__).warning("joining the running Ray cluster (its own resources): %s", exc)
            ray.init(address="auto")
    except ConnectionError as exc:
        raise SystemExit(
            f"could not reach the Ray cluster at {address!r} ({exc}). Start one with `ray start --head` "
            "(and export RAY_AUTH_MODE=token), or unset RAY_ADDRESS to run locally."
        ) from exc
    return ray
