"""Typed configs: YAML recipes, dotted overrides, strict validation, per-stage overrides."""

import re

import pytest

from fastdraft_ray.config import (
    RECIPES_DIR,
    ConfigError,
    RunConfig,
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
        assert isinstance(cfg, RunConfig)
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
