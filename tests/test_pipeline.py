"""The one-job pipeline end to end on a tiny target: every stage runs in order and the report is written; a second
run skips every stage; a changed FT setting re-runs FT and the evaluation only; a stage with checkpoints but no
DONE.json resumes from its checkpoint. Tests share one run directory and run in file order."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastdraft_ray.assets import sha256_file
from fastdraft_ray.config import ConfigError, load_config
from fastdraft_ray.evaluate.paper import FASTDRAFT_PHI3_50M_FT
from fastdraft_ray.layout import RunLayout
from fastdraft_ray.pipeline.run import plan, resolve_run, run_pipeline, selected_stages
from fastdraft_ray.pipeline.stages import build_stage, init_source
from fastdraft_ray.stage_graph import ORDER
from tests.tiny_pipeline import tiny_recipe
from tests.train.conftest import save_tiny_target

TRAINED = ("pt", "cp", "ft")


def stage(name: str, cfg):
    """The pipeline's stage ``name`` of ``cfg`` as a run of ``cfg``'s own selection builds it."""
    return build_stage(name, cfg, selected_stages(cfg))


def _run(recipe: Path):
    lines: list[str] = []
    result = run_pipeline(load_config(str(recipe)), echo=lines.append)
    return result, lines


@pytest.fixture(scope="module")
def ray_3cpu():
    """A private local Ray: 2 training workers + 1 CPU for Ray Data's reads."""
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ray_3cpu):
    root = tmp_path_factory.mktemp("pipeline")
    save_tiny_target(root / "target")
    recipe = tiny_recipe(root)
    result, lines = _run(recipe)
    return SimpleNamespace(root=root, recipe=recipe, run_dir=root / "runs" / "tiny", result=result, lines=lines)


def test_full_run_trains_every_stage_and_writes_the_report(first_run):
    result, run_dir = first_run.result, first_run.run_dir
    assert result.actions() == {name: "not_selected" if name == "search" else "started" for name in ORDER}
    for label in ("prepare PT data", "prepare CP data", "PT", "CP", "generate KD data", "FT", "evaluate"):
        assert f"{label}: started" in first_run.lines and any(
            x.startswith(f"{label}: done in") for x in first_run.lines
        )
    # each training stage started from the previous stage's export
    done = {s: json.loads((run_dir / s / "DONE.json").read_text()) for s in TRAINED}
    assert done["cp"]["inputs"]["init_sha256"] == sha256_file(run_dir / "pt" / "export" / "model.safetensors")
    assert done["ft"]["inputs"]["init_sha256"] == sha256_file(run_dir / "cp" / "export" / "model.safetensors")
    assert done["ft"]["inputs"]["data_dir"] == str(run_dir / "data" / "ft")
    assert result.outcome("ft").summary["resumed_from_step"] == 0
    assert all(done[s]["resumed_from"] is None for s in TRAINED)

    report = run_dir / "report"
    assert result.report == str(report / "report.md")
    assert {p.name for p in report.iterdir()} >= {"report.md", "results.csv", "acceptance.png", "loss_curve.png"}
    md = (report / "report.md").read_text()
    assert "| PT→CP→FT |" in md and "| PT→CP |" in md and "| PT |" in md
    assert "0.369" in md and "0.562" in md and "arXiv 2411.11055" in md
    assert "Protocol differs" not in md  # gamma 3, sampling at T 0.6: the paper's protocol
    rows = (report / "results.csv").read_text().strip().splitlines()[1:]
    ours = [r for r in rows if r.startswith("this run,")]
    assert len(ours) == 3 * (4 + 1)  # drafts x (four tasks + all), sampling only
    assert sum(r.startswith("paper,") for r in rows) == len(FASTDRAFT_PHI3_50M_FT.acceptance_rate)
    assert (report / "acceptance.png").read_bytes()[:4] == b"\x89PNG"
    evaluated = json.loads((run_dir / "eval" / "results.json").read_text())
    assert [d["name"] for d in evaluated["drafts"]] == list(TRAINED)  # one evaluation, one shared baseline
    records = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert all(records[s]["status"] == "done" for s in ORDER if s != "search")  # search: opt-in


def test_second_run_skips_every_stage(first_run):
    before = {s: sha256_file(first_run.run_dir / s / "DONE.json") for s in (*TRAINED, "kd", "eval")}
    assert [action for _, action, _ in plan(load_config(str(first_run.recipe)))] == ["skip"] * (len(ORDER) - 1)
    result, lines = _run(first_run.recipe)
    assert result.actions() == {name: "not_selected" if name == "search" else "skipped" for name in ORDER}
    assert "PT: skipped (done, settings and inputs unchanged)" in lines
    assert before == {s: sha256_file(first_run.run_dir / s / "DONE.json") for s in (*TRAINED, "kd", "eval")}
    assert result.report and Path(result.report).exists()  # the report is re-made from the stored results


def test_changed_ft_setting_reruns_ft_and_evaluation_only(first_run):
    result, lines = _run(tiny_recipe(first_run.root, ft_lr=0.005))
    actions = result.actions()
    assert {s: actions[s] for s in ("prepare/pt", "prepare/cp", "pt", "cp", "generate")} == dict.fromkeys(
        ("prepare/pt", "prepare/cp", "pt", "cp", "generate"), "skipped"
    )
    assert actions["ft"] == "rerun" and "train.lr" in result.outcome("ft").reason
    assert actions["evaluate"] == "rerun" and "input changed: ft" in result.outcome("evaluate").reason
    assert (first_run.run_dir / "ft.previous" / "DONE.json").exists()  # the old FT result is set aside
    ft = json.loads((first_run.run_dir / "ft" / "DONE.json").read_text())
    assert ft["config"]["train"]["lr"] == 0.005
    assert any(line.startswith("FT: re-running from scratch (settings changed: train.lr") for line in lines)


def test_stage_with_checkpoints_but_no_done_record_resumes(first_run):
    recipe = tiny_recipe(first_run.root, ft_lr=0.005)
    _run(recipe)  # at this recipe's state (a no-op when the previous test ran)
    (first_run.run_dir / "ft" / "DONE.json").unlink()
    result, lines = _run(recipe)
    ft = result.outcome("ft")
    assert ft.action == "resumed" and "checkpoint at step 2" in ft.reason
    assert ft.summary["resumed_from_step"] == ft.summary["total_steps"] == 2  # not restarted from step 0
    done = json.loads((first_run.run_dir / "ft" / "DONE.json").read_text())
    assert done["resumed_from"] == {"step": 2, "rows_consumed": 8, "tokens": 128}  # 2 x (2 workers x 2 rows x 16)
    assert result.actions()["cp"] == "skipped" and result.actions()["evaluate"] == "rerun"
    assert "FT: resumed (checkpoint at step 2, no completion record)" in lines


def test_stage_names_are_checked():
    assert selected_stages(load_config(None, ["pipeline.stages=[pt, search]"])) == ["search", "pt"]
    with pytest.raises(ConfigError, match="unknown pipeline stage 'bogus'; choose from prepare, search, pt"):
        load_config(None, ["pipeline.stages=[bogus]"])
    assert selected_stages(load_config(None, ["pipeline.stages=[evaluate, prepare]"])) == [
        "prepare/pt",
        "prepare/cp",
        "evaluate",
    ]


def test_pt_with_a_trimmed_head_counted_on_cp_data_depends_on_cp_data(tmp_path):
    base = [f"storage={tmp_path}", "draft.head_vocab=64"]
    assert stage("pt", load_config("cpu_default", base)).inputs == ("prepare/pt", "prepare/cp")
    plain = load_config("cpu_default", [*base, "draft.head_vocab_from="])
    assert stage("pt", plain).inputs == ("prepare/pt",)
    assert stage("cp", load_config("cpu_default", base)).inputs == ("prepare/cp", "pt")


def test_without_cp_ft_starts_from_pt(tmp_path):
    from fastdraft_ray.pipeline.report import stage_labels

    base = [f"storage={tmp_path}", "generate.onpolicy_fraction=0.5", "generate.topk_logprobs=8"]
    base += ["stages.ft.train.kd_loss=kl"]
    full = load_config("cpu_default", [*base, "pipeline.stages=[prepare, pt, cp, generate, ft, evaluate]"])
    assert stage("ft", full).inputs == ("generate", "cp") and init_source(
        full, "ft", selected_stages(full)
    ).endswith("cp/export")
    no_cp = load_config("cpu_default", [*base, "pipeline.stages=[prepare, pt, generate, ft, evaluate]"])
    assert stage("ft", no_cp).inputs == ("generate", "pt") and init_source(
        no_cp, "ft", selected_stages(no_cp)
    ).endswith("pt/export")
    assert stage("generate", no_cp).inputs == ("pt",)  # the on-policy rows' writer is FT's starting draft
    only_ft = load_config("cpu_default", [*base, "pipeline.stages=[ft]"])  # re-running FT alone: still from CP
    assert stage("ft", only_ft).inputs == ("generate", "cp")
    # the report names each draft by the stages it went through
    assert stage_labels(no_cp)["ft"] == "PT→FT" and stage_labels(full)["ft"] == "PT→CP→FT"


def test_on_policy_rows_need_target_scores_and_a_soft_ft_loss(tmp_path):
    base = [
        f"storage={tmp_path}",
        "generate.onpolicy_fraction=0.5",
        "pipeline.stages=[prepare, pt, cp, generate, ft]",
    ]
    with pytest.raises(ConfigError, match="generate.topk_logprobs > 0 .* stages.ft.train.kd_loss=kl"):
        load_config("cpu_default", base)
    with pytest.raises(ConfigError, match=r"now ce\)"):
        load_config("cpu_default", [*base, "generate.topk_logprobs=8"])
    ok = load_config("cpu_default", [*base, "generate.topk_logprobs=8", "stages.ft.train.kd_loss=ce_kl"])
    assert stage("generate", ok).inputs == ("cp",)  # the CP draft writes the on-policy rows


def test_a_finished_search_gives_pt_its_best_shape(tmp_path):
    from fastdraft_ray.pipeline.stages import with_searched_draft
    from fastdraft_ray.search.space import Architecture

    cfg = resolve_run(load_config("cpu_quick", [f"storage={tmp_path}", "pipeline.stages=[prepare, search, pt]"]))
    best = Architecture(3, 192, 3, 3, 384, 4096, "pca", params=1, non_embedding_params=1).to_dict()
    done = RunLayout.of(cfg).search.done
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"best": {**best, "init_layers": ""}}))
    searched = with_searched_draft(cfg)
    d = searched.draft
    assert (d.num_layers, d.hidden_size, d.num_heads, d.num_kv_heads, d.intermediate_size) == (3, 192, 3, 3, 384)
    assert d.head_vocab == 4096 and d.init == "pca" and d.head_vocab_from == cfg.draft.head_vocab_from
    pt = stage("pt", searched)
    assert pt.settings["draft"]["num_layers"] == 3 and stage("pt", cfg).settings["draft"]["num_layers"] == 2
    assert stage("search", cfg).inputs == ("prepare/cp",)  # search.data = data/cp
