"""When a job starts its own Ray and how many logical CPUs it asks for (one rule for every job)."""

from __future__ import annotations

import os

import pytest

from fastdraft_ray.ray_runtime import local_ray_cpus, starts_local_ray


@pytest.mark.parametrize(
    "address, local", [(None, True), ("local", True), ("127.0.0.1:6379", False), ("auto", False)]
)
def test_ray_address_local_means_a_local_ray(monkeypatch, address, local):
    """RAY_ADDRESS=local starts a local Ray like no RAY_ADDRESS (it once sized Ray for a cluster: 2 CPUs, and
    Ray Data's shard readers starved beside the two training workers)."""
    if address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    assert starts_local_ray() is local
    cores = os.cpu_count() or 1
    assert local_ray_cpus(2) == ({"num_cpus": max(2, cores + 1)} if local else {})
    assert local_ray_cpus(cores + 5) == ({"num_cpus": cores + 5} if local else {})
