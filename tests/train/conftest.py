"""Fixtures for the training tests: a tiny target with its own 96-token tokenizer, shard dirs, run configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastdraft_ray.config import load_config
from fastdraft_ray.data.synthetic import write_shards
from tests.conftest import TINY_VOCAB, tiny_config


def save_tiny_target(out: Path) -> Path:
    """A random 2-layer Llama (vocab 96) plus a matching word-level tokenizer, as a plain HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, TINY_VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
    )
    LlamaForCausalLM(tiny_config("llama")).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> Path:
    return save_tiny_target(tmp_path_factory.mktemp("tiny_target"))


@pytest.fixture(scope="session")
def tiny_hash(tiny_target) -> str:
    from fastdraft_ray.models.target import load_tokenizer, tokenizer_fingerprint

    return tokenizer_fingerprint(load_tokenizer(str(tiny_target)))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_hash) -> Path:
    """64 train rows and 16 val rows of 17 ids in 16-row shards."""
    return write_shards(tmp_path_factory.mktemp("tiny_data"), tokenizer_hash=tiny_hash, vocab_size=TINY_VOCAB)


def tiny_run_config(tiny_target: Path, storage: Path, run_name: str = "t", **train):
    """A FastDraftConfig for the tiny target: 2-layer 32-wide draft, 2 workers x 1 CPU, ZeRO-2, fp32."""
    overrides = [
        f"model.target={tiny_target}",
        f"storage={storage}",
        f"run_name={run_name}",
        "draft.num_layers=2",
        "draft.hidden_size=32",
        "draft.num_heads=2",
        "draft.num_kv_heads=1",
        "draft.intermediate_size=64",
        "train.micro_batch_size=2",
        "train.warmup_steps=2",
        "train.lr=0.01",
        "train.token_budget=1024",
        "train.eval_every=4",
        "train.checkpoint_every=4",
        "train.log_every=1",
        "train.val_rows=8",
    ]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def ray_3cpu():
    """A private local Ray with 3 logical CPUs: 2 training workers + 1 for Ray Data's shard reads."""
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
