"""``jobs/pretrain.py`` end to end as a subprocess: PT from scratch, then CP from the PT export, then a re-run
that finds the stage done. Slow (three Ray start-ups, two trainings): ``pytest -m slow tests/train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _job(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pretrain.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_pt_then_cp_job(tmp_path, tiny_target, tiny_data):
    from transformers import AutoModelForCausalLM

    from fastdraft_ray.assets import sha256_file

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "run_name": "job",
                "storage": str(tmp_path / "runs"),
                "model": {"target": str(tiny_target)},
                "draft": {
                    "num_layers": 2,
                    "hidden_size": 32,
                    "num_heads": 2,
                    "num_kv_heads": 1,
                    "intermediate_size": 64,
                },
                "train": {
                    "micro_batch_size": 2,
                    "warmup_steps": 2,
                    "lr": 0.01,
                    "token_budget": 512,
                    "eval_every": 4,
                    "checkpoint_every": 4,
                    "val_rows": 8,
                },
            }
        )
    )
    for stage in ("pt", "cp"):
        out = _job("--config", str(recipe), "--stage", stage, "--data", str(tiny_data))
        assert out.returncode == 0, out.stderr[-3000:]
        assert "draft exported to" in out.stdout
    runs = tmp_path / "runs" / "job"
    cp_done = json.loads((runs / "cp" / "DONE.json").read_text())
    assert cp_done["inputs"]["init_from"] == str(runs / "pt" / "export")
    pt_done = json.loads((runs / "pt" / "DONE.json").read_text())
    # CP started from exactly the PT export, and keeps (or improves) its validation loss
    assert cp_done["inputs"]["init_sha256"] == sha256_file(runs / "pt" / "export" / "model.safetensors")
    assert cp_done["metrics"]["val/loss"] < pt_done["metrics"]["val/loss"] + 0.1
    AutoModelForCausalLM.from_pretrained(runs / "cp" / "export")
    again = _job("--config", str(recipe), "--stage", "cp", "--data", str(tiny_data))
    assert again.returncode == 0 and "already done" in again.stdout
