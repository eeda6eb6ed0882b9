"""Fixtures for the distillation tests: the tiny target (96-token word-level tokenizer), an alpaca-shaped prompt
file whose items are never evaluation-reserved, a private Ray, and a generation FastDraftConfig."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastdraft_ray.config import load_config
from fastdraft_ray.data.holdout import is_reserved_for_eval
from tests.train.conftest import save_tiny_target


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> Path:
    return save_tiny_target(tmp_path_factory.mktemp("tiny_target"))


def write_alpaca(path: Path, n: int) -> Path:
    """``n`` alpaca records of tiny-vocabulary words (w3..w95), none of them evaluation-reserved."""
    records, i = [], 0
    while len(records) < n:
        words = [f"w{3 + (i * 7 + j * 13) % 90}" for j in range(2 + i % 5)]
        text = " ".join(words)
        i += 1
        if is_reserved_for_eval(text) or any(r["instruction"] == text for r in records):
            continue
        records.append({"instruction": text, "input": "", "output": " ".join(reversed(words))})
    path.write_text(json.dumps(records))
    return path


def gen_config(target: Path, storage: Path, prompts: Path, extra: tuple[str, ...] = (), **generate):
    overrides = [
        f"model.target={target}",
        f"storage={storage}",
        "run_name=g",
        f"generate.prompt_sources={{a: 'alpaca:{prompts}'}}",
        "generate.num_prompts=10",
        "generate.temperatures=[0.0, 1.0]",
        "generate.max_new_tokens=6",
        "generate.batch_size=4",
        "generate.shard_prompts=4",
        "generate.min_prompt_chars=2",
    ]
    overrides += [f"generate.{k}={v}" for k, v in generate.items()]
    return load_config(None, [*overrides, *extra])
