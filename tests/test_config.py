"""Typed configs: YAML recipes, dotted overrides, strict validation, per-stage overrides."""

import re

import pytest

from fastdraft_ray.config import (
    RECIPES_DIR,
    ConfigError,
    FastDraftConfig,
    config_from_dict,
    describe,
    load_config,
    parse_overrides,
    stage_config,
    to_dict,
)


def test_every_shipped_recipe_loads():
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert {"cpu_default", "phi3_mini_50m", "phi3_mini_120m", "llama31_8b_150m"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, FastDraftConfig)
        for stage in cfg.stages:
            stage_config(cfg, stage)


def test_paper_recipes_carry_the_paper_token_budgets():
    cfg = load_config("phi3_mini_50m")
    pt, cp = stage_config(cfg, "pt"), stage_config(cfg, "cp")
    assert pt.train.token_budget == 5_000_000_000 and list(pt.data.sources) == ["text"]
    assert cp.data.weights == {"code": 2, "text": 1} and cp.data.token_budget == 7_500_000_000
    assert cp.train.stage == "cp"
    assert load_config("llama31_8b_150m").draft.params_budget == 150e6


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        "cpu_default",
        [
            "train.lr=3e-4",
            "draft.num_layers=2",
            "evaluate.tasks=[code]",
            "train.warmup_steps=10.0",
            "draft.params_budget=null",
        ],
    )
    assert cfg.train.lr == 3e-4 and cfg.draft.num_layers == 2 and cfg.evaluate.tasks == ["code"]
    assert cfg.train.warmup_steps == 10 and cfg.draft.params_budget is None
    assert cfg.model.target == "embedded:smollm2-135m-instruct"  # untouched keys keep the recipe's value


def test_int_is_accepted_for_float_fields():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key(s) train.lrr; valid keys: train.stage"),
        ("nosuch.key=1", "unknown config key(s) nosuch"),
        ("draft.num_layers=four", "draft.num_layers: expected an integer"),
        ("train.use_gpu=maybe", "train.use_gpu: expected true/false"),
        ("evaluate.tasks=code", "evaluate.tasks: expected list"),
        ("train.lr", "must look like key.sub=value"),
    ],
)
def test_bad_keys_and_types_name_what_is_valid(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config("cpu_default", [override])


def test_bad_stage_override_is_rejected_at_load():
    with pytest.raises(ConfigError, match="train.nope"):
        load_config("cpu_default", ["stages={cp: {train.nope: 1}}"])


def test_unknown_recipe_lists_shipped_ones():
    with pytest.raises(ConfigError, match="cpu_default"):
        load_config("no_such_recipe")


def test_round_trip_through_dict_and_describe_documents_every_key():
    cfg = load_config("cpu_default")
    assert config_from_dict(to_dict(cfg)) == cfg
    lines = describe().splitlines()
    assert all("  # " in line and not line.endswith("# ") for line in lines), "every field needs a doc line"
    assert any(line.startswith("train.zero_stage = 2") for line in lines)


def test_parse_overrides_builds_a_tree():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}


def test_recipes_can_extend_another_and_cycles_are_refused(tmp_path):
    quick = load_config("cpu_quick")
    assert quick.run_name == "cpu_quick" and quick.model.target == load_config("cpu_default").model.target
    assert stage_config(quick, "cp").data.weights == {"code": 2, "text": 1}  # inherited stage keys survive
    assert (
        stage_config(quick, "pt").train.token_budget
        < stage_config(load_config("cpu_default"), "pt").train.token_budget
    )
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"extends: {loop}\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(loop))


def test_command_line_keys_win_over_stage_sections_and_stage_keys_stay_dotted():
    from fastdraft_ray.config import load_config, stage_config

    cfg = load_config("cpu_default", ["train.token_budget=5000", "stages.cp.train.lr=0.002"])
    assert {stage_config(cfg, s).train.token_budget for s in ("pt", "cp", "ft")} == {5000}
    assert stage_config(cfg, "cp").train.lr == 0.002
    assert stage_config(cfg, "pt").train.lr != 0.002
    plain = load_config("cpu_default")
    assert stage_config(plain, "pt").train.token_budget != stage_config(plain, "cp").train.token_budget


@pytest.mark.parametrize(
    "override, valid",
    [
        ("evaluate.gamma_policy=fastest", "'constant', 'confidence', 'heuristic', 'cost'"),
        ("train.kd_loss=mse", "'ce', 'kl', 'tvd', 'ce_kl', 'ce_tvd'"),
        ("draft.init=zeros", "'random', 'pca', 'layers'"),
        ("generate.backend=tgi", "'hf', 'vllm'"),
        ("serve.precision=int4", "'', 'fp32', 'bf16', 'fp16', 'int8'"),
        ("stages.ft.train.kd_loss=mse", "'ce', 'kl'"),
    ],
)
def test_a_bad_choice_fails_at_load_time_naming_the_valid_values(override, valid):
    with pytest.raises(ConfigError, match=re.escape(valid)):
        load_config("cpu_quick", [override])


def test_check_choices_catches_a_section_built_in_code():
    from fastdraft_ray.config import EvaluateConfig, check_choices

    check_choices(EvaluateConfig())
    with pytest.raises(ConfigError, match="evaluate.gamma_policy: 'fastest' is not one of"):
        check_choices(EvaluateConfig(gamma_policy="fastest"), "evaluate.")


def test_evaluate_and_serve_share_the_decode_section():
    from fastdraft_ray.config import DecodeConfig

    cfg = load_config("cpu_quick", ["evaluate.gamma=2", "serve.gamma_policy=cost"])
    assert isinstance(cfg.evaluate, DecodeConfig) and isinstance(cfg.serve, DecodeConfig)
    assert cfg.evaluate.gamma == 2 and cfg.serve.gamma_policy == "cost"


# Every range and combination error that evaluate(), the stages or the training code used to raise at run time,
# minutes into a run: `jobs/pipeline.py --dry-run` now refuses each at load time, naming the key.
RUN_TIME_ERRORS = [
    (["evaluate.modes=[beam]"], "evaluate.modes=['beam']: choose from sampling, greedy"),
    (["evaluate.temperature=0"], "sampling mode needs evaluate.temperature > 0"),
    (["evaluate.num_workers=0"], "evaluate.num_workers=0: must be >= 1"),
    (["evaluate.gamma=0"], "evaluate.gamma=0: must be >= 1"),
    (["evaluate.max_gamma=0"], "evaluate.max_gamma=0: must be >= 1"),
    (["evaluate.max_new_tokens=0"], "evaluate.max_new_tokens=0: must be >= 1"),
    (["evaluate.gamma_select=[0]"], "evaluate.gamma_select=[0]: must list gammas >= 1"),
    (["evaluate.baselines=[medusa]"], "unknown ['medusa']; choose from prompt_lookup, assisted"),
    (["evaluate.modes=[sampling]"], "needs 'greedy' in evaluate.modes"),  # cpu_quick evaluates baselines
    (["evaluate.endpoint=http://127.0.0.1:8000", "evaluate.baselines=[]"], "prices gammas with latencies"),
    (["evaluate.calibration_prompts_per_task=0"], "gamma_select needs at least 1 calibration prompt"),
    (["evaluate.prior_alpha=1.5"], "evaluate.prior_alpha=1.5: must be in [0, 1]"),
    (["evaluate.confidence_threshold=1.5"], "evaluate.confidence_threshold=1.5: must be in [0, 1)"),
    (["evaluate.precision=int8", "evaluate.use_gpu=true"], "int8 (dynamic quantisation) runs on CPU only"),
    (["evaluate.precision=int4"], "evaluate.precision: 'int4' is not one of"),
    (["evaluate.gamma_policy=fastest"], "evaluate.gamma_policy: 'fastest' is not one of"),
    (["generate.temperatures=[]"], "generate.temperatures=[]: must list temperatures >= 0"),
    (["generate.temperatures=[-1]"], "generate.temperatures=[-1]: must list temperatures >= 0"),
    (["generate.onpolicy_fraction=2"], "generate.onpolicy_fraction=2.0: must be in [0, 1]"),
    (["generate.onpolicy_fraction=0.5"], "set generate.topk_logprobs > 0 (now 0)"),
    (["generate.onpolicy_fraction=0.5", "generate.topk_logprobs=8"], "kd_loss=kl or ce_kl (now ce)"),
    (["search.metric=eval/all/speedup"], "is not a key any trial reports"),
    (["search.eval_modes=[beam]"], "search.eval_modes=['beam']: choose from sampling, greedy"),
    (["search.num_samples=0"], "search.num_samples=0: must be >= 1"),
    (["search.objectives=[train/loss]"], "several at once need algorithm=optuna"),
    (["search.inits=[svd]"], "search.inits=['svd']: choose from random, pca"),
    (["search.inits=[]"], "search.inits=[]: and search.target_layers are both empty"),
    (["train.zero_stage=4"], "train.zero_stage=4: must be 0, 1, 2 or 3"),
    (["train.precision=fp16"], "train.precision='fp16': fp16 needs loss scaling"),
    (["train.zero_stage=0", "train.offload_optimizer=true"], "offload_optimizer=True: needs zero_stage 1-3"),
    (["train.micro_batch_size=0"], "train.micro_batch_size=0: must be >= 1"),
    (["train.teacher=online"], "train.teacher=online needs kd_loss"),
    (["train.kd_alpha=2"], "train.kd_alpha=2.0: must be in [0, 1]"),
    (["stages.ft.train.lr=0"], "stages.ft: train.lr=0.0: must be > 0"),
    (["data.seq_len=0"], "data.seq_len=0: must be >= 1"),
    (["data.val_fraction=1"], "data.val_fraction=1.0: must be in [0, 1)"),
    (["data.weights={code: 1}"], "names ['code'], which are not sources"),
    (["draft.num_kv_heads=3"], "draft.num_kv_heads=3: must divide num_heads=4"),
    (["pipeline.stages=[prepare, bogus]"], "unknown pipeline stage 'bogus'"),
    (["pipeline.evaluate_drafts=[generate]"], "['generate'] are not training stages"),
    (["serve.api_keys=[12345]"], "quote a key that looks like a number"),
]


@pytest.mark.parametrize("overrides, message", RUN_TIME_ERRORS, ids=[" ".join(o) for o, _ in RUN_TIME_ERRORS])
def test_dry_run_refuses_what_a_run_would_refuse(overrides, message, capsys, tmp_path):
    from pathlib import Path

    from tests.entry_points import run_as_main

    job = Path(__file__).resolve().parents[1] / "jobs" / "pipeline.py"
    assert run_as_main(job, ["--config", "cpu_quick", f"storage={tmp_path}", *overrides, "--dry-run"]) == 2
    assert message in capsys.readouterr().err
