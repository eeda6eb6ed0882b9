"""A tiny search (random tiny target, 2 trials one after the other, 1 training worker each) as a Ray job on a private Ray head
is stopped mid-way, submitted again, and resumes (``Tuner.restore``): the trial
that had finished is kept, not re-trained, and every trial ends with its result, its TensorBoard events (Tune's and
the training stage's, with the proxy scalar) and a row in the table; the recipe loads as a config."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from fastdraft_ray.config import load_config
from fastdraft_ray.data.synthetic import write_shards
from tests.conftest import TINY_VOCAB
from tests.ray_jobs import job_cluster, submit, wait_for, wait_status
from tests.train.conftest import save_tiny_target


@pytest.fixture
def job_client():
    with job_cluster(3) as client:  # a trial's worker + its driver's sliver + Ray Data
        yield client


def _overrides(tmp_path: Path, data: Path) -> list[str]:
    return [
        f"model.target={tmp_path / 'target'}",
        f"storage={tmp_path / 'runs'}",
        "run_name=s",
        "train.micro_batch_size=2",
        "train.val_rows=4",
        "train.lr=0.01",
        "evaluate.prompts_per_task=1",
        "evaluate.max_article_tokens=48",
        "train.proxy_prompts_per_task=1",
        "train.proxy_tokens=6",
        "train.proxy_topk=8",
        "search.layers=[1, 2]",
        "search.hidden_sizes=[32, 48]",
        "search.gqa_groups=[1]",
        "search.intermediate_ratios=[2.0]",
        "search.head_vocabs=[0]",
        "search.inits=[random]",
        "search.num_samples=2",
        "search.include_default=false",
        f"search.data={data}",
        "search.token_budget_per_trial=256",  # 2 rows x 16 tokens: 8 steps
        "search.report_every=2",
        "search.grace_steps=2",
        "search.num_workers=1",
        "search.max_concurrent_trials=1",
        "search.cpus_per_worker=1",
        "search.eval_max_new_tokens=4",
        "search.latency_repeats=2",
        "search.latency_context=8",
    ]


def _measured_trials(tune_dir: Path) -> list[str]:
    """Trial folders of the Tune experiment with a result that holds the measured speedup."""
    return [
        t.name for t in tune_dir.glob("run_trial_*") if any("search/measured_speedup" in r for r in _results(t))
    ]


def _trial_folders(tune_dir: Path) -> dict[str, list[Path]]:
    """Tune's trial folders by trial id, oldest first. Tune snapshots its experiment at most every 10 s, so a trial
    that started in the last seconds before the stop is started again after the restore in a new folder (a new
    timestamp): the same trial id, and the same training run directory, which resumes from its checkpoint."""
    folders: dict[str, list[Path]] = {}
    for folder in sorted(tune_dir.glob("run_trial_*"), key=lambda f: f.name[-19:]):  # …_<YYYY-MM-DD_HH-MM-SS>
        folders.setdefault("_".join(folder.name.split("_")[2:4]), []).append(folder)  # run_trial_<exp>_<index>_…
    return folders


def _results(trial_folder: Path) -> list[dict]:
    result = trial_folder / "result.json"
    return (
        [json.loads(line) for line in result.read_text().splitlines() if line.strip()] if result.exists() else []
    )


def _scalar_tags(tb_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return set(acc.Tags().get("scalars", []))


@pytest.mark.slow  # over a minute (`-m slow`); its recorded run: benchmarks/results/slow_tests_2026-12-03.md
def test_stopped_search_job_resumes_and_keeps_every_trial(tmp_path, job_client):
    from ray.job_submission import JobStatus

    from fastdraft_ray.models.target import load_tokenizer, tokenizer_fingerprint

    target = save_tiny_target(tmp_path / "target")
    data = tmp_path / "data"
    data.mkdir()
    write_shards(data, tokenizer_hash=tokenizer_fingerprint(load_tokenizer(str(target))), vocab_size=TINY_VOCAB)
    recipe = tmp_path / "search.yaml"
    recipe.write_text("run_name: s\n")  # every other key: its default, or the overrides below
    entrypoint = shlex.join(
        [sys.executable, "jobs/search.py", "--config", str(recipe), *_overrides(tmp_path, data)]
    )
    search = tmp_path / "runs" / "s" / "search"

    first = submit(job_client, entrypoint)
    kept = wait_for(job_client, first, "a measured trial", lambda: _measured_trials(search / "tune"))
    job_client.stop_job(first)
    wait_status(job_client, first, JobStatus.STOPPED)
    assert not (search / "DONE.json").exists(), "the search finished before it was stopped"
    finished = {p.parent.parent.name: p.stat().st_mtime_ns for p in search.glob("trials/*/pt/DONE.json")}

    second = submit(job_client, entrypoint)
    wait_status(job_client, second, JobStatus.SUCCEEDED)
    logs = job_client.get_job_logs(second)
    assert "search: resuming" in logs, logs[-3000:]
    for name, mtime in finished.items():  # trained before the stop: not trained again
        assert (search / "trials" / name / "pt" / "DONE.json").stat().st_mtime_ns == mtime
    assert set(kept) <= set(_measured_trials(search / "tune"))

    import pandas as pd

    table = pd.read_csv(search / "results.csv", dtype={"trial_id": str})
    assert len(table) == 2 and set(table["status"]) <= {"measured", "stopped"}, table
    assert table["train/proxy_acceptance"].notna().all() and table["search/draft_step_ms"].notna().all()
    trial_folders = _trial_folders(search / "tune")
    assert set(trial_folders) == set(table["trial_id"]), table
    for folders in trial_folders.values():  # the newest folder is the one that finished
        assert list(folders[-1].glob("events.out.tfevents.*")) and _results(folders[-1]), folders
    stages = sorted(search.glob("trials/*/pt/tb"))
    assert len(stages) == 2 and all("train/proxy_acceptance" in _scalar_tags(tb) for tb in stages)
    assert all("train/predicted_speedup" in _scalar_tags(tb) for tb in stages)
    for name in ("results.md", "pareto.png", "depth.png", "latency_heatmap.png", "profile.json"):
        assert (search / name).exists(), name
    recipe = load_config(str(search / "recipe.yaml"))
    best = json.loads((search / "DONE.json").read_text())["best"]
    assert (recipe.draft.num_layers, recipe.draft.hidden_size) == (best["num_layers"], best["hidden_size"])
    assert "search" not in recipe.pipeline.stages
