"""The preflight fails in seconds what a run would fail hours in, and says what to do (pipeline/preflight.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fastdraft_ray.config import load_config
from fastdraft_ray.pipeline.preflight import preflight
from tests.entry_points import run_as_main
from tests.train.conftest import save_tiny_target

ROOT = Path(__file__).resolve().parents[1]


def _by_name(checks) -> dict:
    return {c.name.split(":")[0] if c.name.startswith("target") else c.name: c for c in checks}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    save_tiny_target(root / "target")
    with open(root / "docs.jsonl", "w") as fh:
        for i in range(5):
            fh.write(json.dumps({"content": f"w{3 + i} w4 w5", "repo": "r"}) + "\n")
    return root


def _cfg(tiny: Path, *overrides: str):
    return load_config(
        None,
        [
            f"model.target={tiny / 'target'}",
            f"storage={tiny / 'runs'}",
            f"stages.pt.data.sources={{text: '{tiny / 'docs.jsonl'}?field=content'}}",
            f"stages.cp.data.sources={{code: '{tiny / 'docs.jsonl'}?field=content'}}",
            "train.num_workers=1",
            "data.num_tokenizer_actors=1",
            *overrides,
        ],
    )


def test_a_misspelled_field_fails_naming_the_fields_that_exist(tiny):
    cfg = _cfg(tiny, f"stages.cp.data.sources={{code: '{tiny / 'docs.jsonl'}?field=contents'}}")
    checks = {c.name: c for c in preflight(cfg, ["prepare/pt", "prepare/cp"])}
    good = checks[f"prepare/pt source text: {tiny / 'docs.jsonl'}?field=content"]
    bad = checks[f"prepare/cp source code: {tiny / 'docs.jsonl'}?field=contents"]
    assert good.status == "pass" and bad.status == "fail"
    assert "'contents'" in bad.detail and "content" in bad.detail and "repo" in bad.detail


def test_what_needs_the_hub_is_skipped_offline_and_a_corpus_without_text_fails(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _cfg(
        tiny,
        "model.target=meta-llama/Llama-3.1-8B-Instruct",
        "stages.cp.data.sources={code: 'hub:bigcode/the-stack-v2-dedup', text: 'hub:HuggingFaceFW/fineweb'}",
    )
    checks = preflight(cfg, ["prepare/cp"])
    status = {c.name: c.status for c in checks}
    assert status["target: tokenizer and config"] == "skip"
    assert status["prepare/cp source text: hub:HuggingFaceFW/fineweb"] == "skip"
    stack = next(c for c in checks if "the-stack-v2" in c.name)
    assert stack.status == "fail" and "blob ids, not file contents" in stack.detail


def test_too_few_gpus_a_missing_vllm_and_an_unwritable_run_directory_fail(tiny):
    cfg = _cfg(
        tiny,
        "train.num_workers=8",
        "train.use_gpu=true",
        "train.precision=bf16",
        "generate.backend=vllm",
        "storage=/etc/hostname/runs",  # under a file: no run directory can be made there
    )
    checks = {c.name: c for c in preflight(cfg, ["pt", "generate"])}
    resources = checks["cluster resources"]
    assert resources.status == "fail" and "pt 8 CPU + 8 GPU" in resources.detail and "0 GPUs" in resources.detail
    assert checks["generate.backend=vllm: vLLM installed"].status == "fail"
    assert "fastdraft-ray[gpu]" in checks["generate.backend=vllm: vLLM installed"].detail
    assert checks["run directory: writable, seen by every node"].status == "fail"


def test_a_run_with_a_failing_check_stops_before_any_stage(tiny):
    from fastdraft_ray.pipeline.run import run_pipeline
    from fastdraft_ray.pipeline.stages import PipelineError

    cfg = _cfg(tiny, f"stages.pt.data.sources={{text: '{tiny / 'docs.jsonl'}?field=txt'}}", "run_name=stopped")
    with pytest.raises(PipelineError, match=r"(?s)preflight: 1 check\(s\) failed before any stage started.*'txt'"):
        run_pipeline(cfg, only=["prepare/pt"], echo=lambda line: None)
    assert not (tiny / "runs" / "stopped" / "data").exists()  # nothing started


def test_the_check_job_on_the_8_gpu_recipe_runs_here_within_a_minute(capsys):
    started = time.time()
    status = run_as_main(ROOT / "jobs" / "pipeline.py", ["--config", "llama31_8b_150m_8gpu", "--check"])
    assert time.time() - started < 60
    out = capsys.readouterr().out
    assert status == 1  # this CPU machine has no GPUs and no vLLM: the run would fail, so the check does
    assert "| skip | target: tokenizer and config |" in out and "HF_HUB_OFFLINE is set" in out
    assert "| FAIL | cluster resources |" in out and "pt 64 CPU + 8 GPU" in out
    assert "| pass | run directory" in out and "checks failed" in out
