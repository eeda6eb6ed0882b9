"""Fixtures for the speculative-decoding tests."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every speculative-decoding test runs its tiny models on one torch thread (see ``one_torch_thread``)."""
