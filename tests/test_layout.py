"""RunLayout: every run-directory path from one place, one remote-storage policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastdraft_ray.config import ConfigError, load_config
from fastdraft_ray.layout import KDLayout, LayoutError, RunLayout


def test_every_path_of_a_local_run(tmp_path):
    cfg = load_config("cpu_quick", [f"storage={tmp_path}/runs"])
    layout = RunLayout.of(cfg)
    root = tmp_path / "runs" / "cpu_quick"
    assert layout.root == root and not layout.remote
    assert layout.data(cfg.data) == root / "data" / cfg.data.name and layout.data("pt") == root / "data" / "pt"
    assert (
        layout.stage("cp").export == root / "cp" / "export"
        and layout.stage("ft").done == root / "ft" / "DONE.json"
    )
    assert layout.stage("pt").tensorboard == root / "pt" / "tb" and layout.stage("pt").init == root / "pt" / "init"
    assert layout.kd.root == root / "kd" and layout.kd.response_part("target", 0.6, 3) == (
        root / "kd" / "responses" / "target-t0.60" / "part-00003.parquet"
    )
    assert layout.eval_dir == root / "eval" and layout.report_dir == root / "report"
    assert layout.pipeline_record == root / "pipeline.json"
    assert layout.inside("data/cp") == root / "data" / "cp" and layout.inside("/abs/kd") == Path("/abs/kd")
    trial = layout.search.trial("trial_0001")
    assert trial.stage("pt").root == root / "search" / "trials" / "trial_0001" / "pt"  # an isolated run directory
    assert (
        layout.search.tune == root / "search" / "tune" and layout.search.recipe == root / "search" / "recipe.yaml"
    )
    with pytest.raises(LayoutError, match="not a training stage"):
        layout.stage("eval")


def test_outputs_set_in_the_config_win(tmp_path):
    cfg = load_config(
        "cpu_quick", [f"storage={tmp_path}", f"data.output={tmp_path}/shards", f"generate.output={tmp_path}/k"]
    )
    layout = RunLayout.of(cfg)
    assert layout.data(cfg.data) == tmp_path / "shards" and layout.kd.root == tmp_path / "k"


def test_relative_storage_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RunLayout.of(load_config("cpu_quick", ["storage=runs"])).root == tmp_path / "runs" / "cpu_quick"


@pytest.mark.parametrize("key", ["storage", "data.output", "generate.output"])
def test_a_url_for_the_run_directory_is_refused_at_load_saying_how_to_mount_it(key):
    with pytest.raises(ConfigError, match=rf"{key}.*not a URL.*mount the bucket"):
        load_config("cpu_quick", [f"{key}=s3://bucket/runs/"])


def test_url_run_directory_one_policy():
    layout = RunLayout.at("s3://bucket/runs/cpu_quick")
    assert layout.remote and layout.root == "s3://bucket/runs/cpu_quick"
    assert (
        layout.data("pt") == "s3://bucket/runs/cpu_quick/data/pt"
        and layout.eval_dir == "s3://bucket/runs/cpu_quick/eval"
    )
    with pytest.raises(LayoutError, match="training needs a filesystem path"):
        layout.require_local("training")
    with pytest.raises(LayoutError, match="filesystem path"):
        layout.stage("pt")


def test_kd_layout_lists_finished_units(tmp_path):
    kd = KDLayout(tmp_path)
    for writer, t, shard in (("target", 0.0, 0), ("draft", 1.0, 2)):
        kd.response_part(writer, t, shard).parent.mkdir(parents=True, exist_ok=True)
        kd.response_part(writer, t, shard).write_text("")
    assert [p.parent.name for p in kd.response_files()] == ["draft-t1.00", "target-t0.00"]
    assert kd.magpie_files() == []


def test_no_run_directory_path_joins_outside_layout():
    """Paths under a run directory are built only in layout.py: no module spells the stage sub-folders."""
    root = Path(__file__).resolve().parents[1] / "fastdraft_ray"
    pattern = ('/ "export"', '/ "DONE.json"', '/ "tb"', '/ "eval"', '/ "kd"', '"responses/', ".run_dir")
    hits = [
        f"{path.relative_to(root)}: {needle}"
        for path in root.rglob("*.py")
        if path.name != "layout.py"
        for needle in pattern
        if needle in path.read_text()
    ]
    assert hits == []
