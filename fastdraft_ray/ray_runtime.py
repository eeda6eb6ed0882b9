"""Connecting to Ray: the cluster a job was submitted to, ``RAY_ADDRESS``, or a local instance."""

from __future__ import annotations

import logging
import os

# Logical CPUs a training stage needs beside its workers on a CPU cluster: Ray Data's shard reads and the task that
# cuts the row stream into one-worker blocks (a Ray Data repartition task reserves a whole CPU).
DATA_CPUS = 1


def starts_local_ray() -> bool:
    """Whether ``init_ray`` starts a Ray of its own here: no ``RAY_ADDRESS``, or ``RAY_ADDRESS=local``
    (``ray job submit`` sets the cluster's address)."""
    return os.environ.get("RAY_ADDRESS", "local") == "local"


def local_ray_cpus(need: int) -> dict:
    """``ray.init`` arguments for a local Ray: at least ``need`` logical CPUs and one more than the cores, so
    Ray Data's shard reads run beside workers that take every core; {} when joining a cluster."""
    if not starts_local_ray():
        return {}
    return {"num_cpus": max(need, (os.cpu_count() or 1) + 1)}


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
