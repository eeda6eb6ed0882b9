"""KD generation on one GPU with the HF backend (``pytest -m gpu``; ``scripts/gpu_check.sh``): a real-size random
target (Llama-3.2-1B's shape, bf16) answers prompts at T 0.6 and greedily in one generator actor holding the GPU;
the check reports generated tokens/s. (The vLLM backend's logic is tested on CPU: tests/distill/test_vllm_backend.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.distill.conftest import gen_config, write_alpaca
from tests.gpu import LLAMA_32_1B, needs_cuda, report, save_target

pytestmark = needs_cuda
pytest.importorskip("ray")  # the project's dependencies: a bare CUDA image may lack them


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_hf_kd_generation_on_one_gpu(tmp_path, ray_gpu):
    from fastdraft_ray.distill.generate import run_generation

    target = save_target(tmp_path / "target", LLAMA_32_1B, torch.bfloat16)
    prompts = write_alpaca(tmp_path / "a.json", 64)
    cfg = gen_config(
        target, tmp_path, prompts, ("model.dtype=bfloat16",), num_prompts=64, shard_prompts=32, batch_size=32,
        max_new_tokens=64, use_gpu="true", cpus_per_actor=2, temperatures="[0.6, 0.0]",
    )  # fmt: skip
    record = run_generation(cfg)
    rate = record["tokens"] / record["wall_time_s"]
    ok = record["done"] and record["rows"] == 128
    report(
        "HF KD generation (1 GPU, Llama-3.2-1B shape, bf16)",
        ok,
        f"{record['rows']} answers, {record['tokens']:,} tokens in {record['wall_time_s']:.0f} s: {rate:,.0f} tok/s "
        "end to end (actor start-up included)",
    )
    assert ok
