"""A tiny pipeline recipe for tests: the 96-token tiny target (``tests.train.conftest.save_tiny_target``), JSON-lines
documents of its words, a 2x32 draft and budgets of a few optimizer steps per stage."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from tests.distill.conftest import write_alpaca


def write_documents(path: Path, n: int, seed: int, words: int = 24) -> Path:
    """JSON-lines documents of the tiny target's words (w3..w95)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            start = rng.randrange(3, 96)
            text = " ".join(f"w{3 + (start + j * (1 + seed)) % 93}" for j in range(words))
            fh.write(json.dumps({"text": f"w{3 + i % 93} {text}"}) + "\n")
    return path


def tiny_recipe(root: Path, ft_lr: float = 0.01) -> Path:
    """A recipe for the tiny target: 2x32 draft, 16-token rows, 4 PT/CP steps, 2 FT steps, 1 prompt per task."""
    text, code = write_documents(root / "text.jsonl", 80, 0), write_documents(root / "code.jsonl", 80, 1)
    prompts = write_alpaca(root / "alpaca.json", 12)
    recipe = {
        "run_name": "tiny",
        "storage": str(root / "runs"),
        "model": {"target": str(root / "target")},
        "draft": {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64},
        "data": {"seq_len": 16, "token_budget": 1200, "val_fraction": 0.1, "rows_per_shard": 32},
        "train": {
            "micro_batch_size": 2,
            "warmup_steps": 1,
            "lr": 0.01,
            "token_budget": 256,  # 2 workers x 2 rows x 16 tokens = 64 per step: 4 steps
            "checkpoint_every": 2,
            "log_every": 1,
            "val_rows": 4,
        },
        "generate": {
            "prompt_sources": {"a": f"alpaca:{prompts}"},
            "num_prompts": 8,
            "temperatures": [0.0],
            "max_new_tokens": 6,
            "batch_size": 8,
            "shard_prompts": 8,
            "min_prompt_chars": 2,
        },
        "evaluate": {
            "prompts_per_task": 1,
            "max_new_tokens": 6,
            "modes": ["sampling"],
            "cpus_per_worker": 1,
            "max_article_tokens": 48,
        },
        "stages": {
            "pt": {"data.name": "pt", "data.sources": {"text": str(text)}},
            "cp": {
                "data.name": "cp",
                "data.sources": {"code": str(code), "text": str(text)},
                "data.weights": {"code": 2, "text": 1},
            },
            "ft": {"data.name": "ft", "data.val_fraction": 0.25, "train.token_budget": 128, "train.lr": ft_lr},
        },
    }
    path = root / f"tiny_lr{ft_lr}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
