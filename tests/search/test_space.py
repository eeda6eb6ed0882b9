"""The search space (search/space.py), the speedup model and the search's input checks: every point is valid,
budgets bind, sampling never leaves the valid list, and bad input is refused with a message saying what to do."""

from __future__ import annotations

import dataclasses

import pytest

from fastdraft_ray.config import ConfigError, SearchConfig, load_config
from fastdraft_ray.models.draft import count_params, derive_draft_config
from fastdraft_ray.search.space import Architecture, enumerate_space, sample_points
from fastdraft_ray.specdec.stats import SpeedupModel, expected_speedup
from tests.conftest import tiny_config

WIDE = SearchConfig(
    layers=[1, 2, 3, 8],
    hidden_sizes=[16, 24, 32, 40, 48, 64, 100],  # head_dim 16: 24, 40 and 100 are not multiples
    gqa_groups=[1, 2, 3],
    intermediate_ratios=[2.0, 3.0],
    head_vocabs=[32, 0],
    inits=["random", "pca"],
    target_layers=[[0], [0, 1]],
    params_budget=60_000,
    budget_kind="total",
)


def test_every_point_is_valid_and_within_the_budget():
    target = tiny_config("llama")  # hidden 64, 4 heads: head_dim 16
    points = enumerate_space(target, WIDE)
    assert points and len({p.name for p in points}) == len(points)
    for p in points:
        config = derive_draft_config(target, p.draft_config())  # raises on an invalid shape
        assert count_params(config).total == p.params <= WIDE.params_budget
        assert p.hidden_size % 16 == 0 and p.num_heads * 16 == p.hidden_size
        assert p.num_heads % p.num_kv_heads == 0
        assert p.init in ("random", "pca", "layers")
        if p.init == "layers":
            assert p.hidden_size == 64 and p.num_layers == len(p.init_layers)
    assert {p.hidden_size for p in points} <= {16, 32, 48, 64}
    assert any(p.init == "layers" for p in points) and any(p.head_vocab == 32 for p in points)
    non_embedding = enumerate_space(
        target, dataclasses.replace(WIDE, budget_kind="non_embedding", params_budget=20_000)
    )
    assert all(p.non_embedding_params <= 20_000 for p in non_embedding)
    assert Architecture.from_dict(points[3].to_dict()) == points[3]


def test_sampling_only_returns_valid_points_spread_over_depth():
    points = enumerate_space(tiny_config("llama"), WIDE)
    chosen = sample_points(points, 6, seed=1)
    assert len({p.name for p in chosen}) == 6 and set(chosen) <= set(points)
    assert len({p.num_layers for p in chosen}) >= 3  # round-robin over depths
    assert sample_points(points, 6, seed=1) == chosen and sample_points(points, 10**6, 0) == points


def test_an_empty_space_and_bad_lists_are_refused():
    target = tiny_config("llama")
    with pytest.raises(ConfigError, match="search space is empty.*raise search.params_budget"):
        enumerate_space(target, dataclasses.replace(WIDE, params_budget=100))
    with pytest.raises(ConfigError, match="search space is empty"):
        enumerate_space(target, dataclasses.replace(WIDE, hidden_sizes=[24, 40], target_layers=[]))
    with pytest.raises(ConfigError, match="search.inits"):
        enumerate_space(target, dataclasses.replace(WIDE, inits=["layers"]))
    with pytest.raises(ConfigError, match="target layer indices 0..1"):
        enumerate_space(target, dataclasses.replace(WIDE, target_layers=[[0, 5]]))


def test_speedup_model_is_expected_speedup_at_its_best_gamma():
    v = (1.0, 1.1, 1.2, 1.6, 1.7)
    model = SpeedupModel(c=0.06, verify_cost=v, max_gamma=8)
    gamma, speedup = model.predict(0.5)
    assert 1 <= gamma <= 4 and speedup == pytest.approx(
        max(expected_speedup(0.5, g, 0.06, v) for g in range(1, 5))
    )
    assert model.predict(0.0)[1] < 1.0  # below break-even it still ranks (not clamped to 1)
    assert model.predict(0.9)[1] > model.predict(0.5)[1] > model.predict(0.1)[1]


def test_search_refuses_an_objective_no_trial_reports(tmp_path):
    from fastdraft_ray.search.run import SearchError, check_search

    with pytest.raises(ConfigError, match="not a key any trial reports; choose from .*train/predicted_speedup"):
        load_config("cpu_quick", [f"storage={tmp_path}", "search.metric=eval/instruction/speedup"])
    cfg = load_config("cpu_quick", [f"storage={tmp_path}"])
    with pytest.raises(SearchError, match="no prepared shards.*prepare_data.py --stage cp"):
        check_search(cfg, tiny_config("llama"))
    assert cfg.search.metric == "train/predicted_speedup"  # the default names a key the trials report


def test_the_default_budget_leaves_room_for_a_large_vocabulary():
    """A 152k-token vocabulary (Qwen2.5-7B's, untied) is ~39M parameters of embedding and head at width 128: under a
    total budget of 30M only the narrowest one-head drafts would fit. The default budget counts non-embedding
    parameters, so wider drafts stay in the space."""
    qwen = tiny_config(
        "qwen2", vocab_size=152_064, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, tie_word_embeddings=False,
    )  # fmt: skip
    small = dict(layers=[2], hidden_sizes=[128, 512], gqa_groups=[1], intermediate_ratios=[2.0], head_vocabs=[0])
    assert SearchConfig().budget_kind == "non_embedding"
    assert {p.hidden_size for p in enumerate_space(qwen, SearchConfig(**small))} == {128, 512}
    with pytest.raises(ConfigError, match="search space is empty"):
        enumerate_space(qwen, SearchConfig(**small, budget_kind="total"))
