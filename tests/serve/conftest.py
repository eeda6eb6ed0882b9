"""One Ray + Serve instance for the serving tests, with its Prometheus metrics port, and the apps they call:
``tiny`` (random tiny models behind the real SmolLM2 tokenizer, an API key, small limits) and ``tight``
(the same models, a one-request queue: what a full queue answers)."""

from __future__ import annotations

import socket
import time

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM

from fastdraft_ray.config import load_config
from fastdraft_ray.specdec.engine import SpecDecoder
from tests.conftest import tiny_config

API_KEY = "test-key"
SMOLLM2_VOCAB = 49152


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAIL_MIDWAY = [3, 1, 4, 1, 5, 9]  # a prompt of these token ids makes the tiny decoder fail after its first step


class FailsMidway(SpecDecoder):
    """A decoder whose generation of the ``FAIL_MIDWAY`` prompt raises after its first step (a replica error in
    mid-generation, which the server must answer as an error, not as a crash)."""

    def stream(self, input_ids, **kwargs):
        steps = super().stream(input_ids, **kwargs)
        return self._fail_after_first(steps) if list(input_ids)[: len(FAIL_MIDWAY)] == FAIL_MIDWAY else steps

    @staticmethod
    def _fail_after_first(steps):
        yield next(steps)
        raise RuntimeError("injected failure in mid-generation")


def tiny_loader(model, settings, device) -> SpecDecoder:
    """Random tiny target and draft over the real SmolLM2 tokenizer's vocabulary (fast on one thread); the prompt
    ``FAIL_MIDWAY`` fails in mid-generation."""
    from fastdraft_ray.assets import embedded_target_dir
    from fastdraft_ray.models.target import load_tokenizer

    tokenizer = load_tokenizer(str(embedded_target_dir()))
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=SMOLLM2_VOCAB, **special)).eval()
    draft = AutoModelForCausalLM.from_config(
        tiny_config("llama", vocab_size=SMOLLM2_VOCAB, num_hidden_layers=1, **special)
    ).eval()
    return FailsMidway(target, draft if settings.draft else None, settings, tokenizer=tokenizer)


@pytest.fixture(scope="package")
def serve_instance():
    """``(http base URL, metrics URL)`` of a private Ray (2 CPUs) running Serve; shut down after the package."""
    import ray
    from ray import serve

    metrics_port, http_port = free_port(), free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    yield f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics"
    serve.shutdown()
    ray.shutdown()


def deploy(serve_instance, name: str, overrides: list[str], loader=None) -> str:
    """Run the app for ``overrides`` under ``/<name>``; return its base URL."""
    from ray import serve

    from fastdraft_ray.serve.app import build_app

    cfg = load_config("cpu_quick", overrides)
    app = build_app(cfg, loader=loader) if loader else build_app(cfg)
    serve.run(app, name=name, route_prefix=f"/{name}")
    return f"{serve_instance[0]}/{name}"


TINY = ["serve.draft=tiny", "serve.model_name=tiny", "serve.cpus_per_replica=0.5", "serve.threads=1"]


@pytest.fixture(scope="package")
def tiny_app(serve_instance) -> str:
    return deploy(
        serve_instance,
        "tiny",
        [*TINY, f"serve.api_keys=[{API_KEY}]", "serve.max_prompt_tokens=64", "serve.max_tokens_limit=256"],
        tiny_loader,
    )


@pytest.fixture(scope="package")
def tight_app(serve_instance) -> str:
    return deploy(
        serve_instance,
        "tight",
        [*TINY, "serve.max_ongoing_requests=1", "serve.max_queued_requests=1"],
        tiny_loader,
    )


def scrape(metrics_url: str, name: str, until=None, timeout_s: float = 30.0) -> dict[str, float]:
    """``{label set: value}`` of the Prometheus series ``name`` (Ray exports every few seconds: poll until
    ``until(values)`` holds or ``timeout_s`` passes; return the last values)."""
    deadline, values = time.monotonic() + timeout_s, {}
    while True:
        text = requests.get(metrics_url, timeout=10).text
        values = {}
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                labels, _, value = line.rpartition(" ")
                values[labels[len(name) :]] = float(value)
        if until is None or until(values) or time.monotonic() > deadline:
            return values
        time.sleep(1.0)
