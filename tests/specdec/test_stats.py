"""Speculative-decoding metrics: formulas from docs/definitions.md, edge cases, DecodeStats aggregation, latency probe."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastdraft_ray.models.draft import param_bytes
from fastdraft_ray.specdec import stats as S
from fastdraft_ray.specdec.decode import DecodeStats
from tests.conftest import tiny_config


def test_acceptance_rate_and_edges():
    assert S.acceptance_rate(3, 12) == 0.25
    assert S.acceptance_rate(0, 0) == 0.0  # nothing proposed
    assert S.acceptance_rate(5, 5) == 1.0
    with pytest.raises(ValueError, match="cannot exceed"):
        S.acceptance_rate(4, 3)
    with pytest.raises(ValueError):
        S.acceptance_rate(-1, 3)


def test_block_efficiency_and_edges():
    assert S.block_efficiency(64, 16) == 4.0
    assert S.block_efficiency(0, 0) == 0.0
    with pytest.raises(ValueError):
        S.block_efficiency(3, -1)


@pytest.mark.parametrize("gamma", [0, 1, 3, 8])
def test_ideal_block_efficiency(gamma):
    assert S.ideal_block_efficiency(1.0, gamma) == gamma + 1  # every draft token accepted
    assert S.ideal_block_efficiency(0.0, gamma) == 1.0  # only the target's own token
    # Closed form equals the expectation of 1 + (number of leading accepts) with i.i.d. acceptance.
    alpha = 0.6
    expected = sum(alpha**k for k in range(gamma + 1))
    assert math.isclose(S.ideal_block_efficiency(alpha, gamma), expected)
    assert S.ideal_block_efficiency(0.999999, gamma) == pytest.approx(gamma + 1, rel=1e-4)  # continuous at 1


def test_ideal_block_efficiency_rejects_bad_alpha():
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError):
            S.ideal_block_efficiency(bad, 3)


def test_mbsu_hardware_and_wallclock():
    assert S.mbsu(4.0, 3, 0.0) == 4.0  # free draft: speedup = tau
    assert S.mbsu(2.5, 3, 0.05) == pytest.approx(2.5 / 1.15)
    assert S.hardware_speedup(2.5, 3, draft_step_s=0.005, target_step_s=0.1) == pytest.approx(2.5 / 1.15)
    # With a measured verify cost: tau * t_target / (gamma * t_draft + t_verify).
    assert S.hardware_speedup(2.5, 3, 0.005, 0.1, verify_step_s=0.15) == pytest.approx(2.5 * 0.1 / 0.165)
    assert S.wallclock_speedup(10.0, 4.0) == 2.5
    with pytest.raises(ValueError):
        S.wallclock_speedup(10.0, 0.0)
    with pytest.raises(ValueError):
        S.hardware_speedup(2.0, 3, 0.01, 0.0)


def test_best_gamma():
    gamma, speedup = S.best_gamma(0.8, 0.05)
    brute = max(range(1, 9), key=lambda g: S.ideal_block_efficiency(0.8, g) / (g * 0.05 + 1))
    assert gamma == brute
    assert speedup == pytest.approx(S.ideal_block_efficiency(0.8, gamma) / (gamma * 0.05 + 1))
    assert S.best_gamma(1.0, 0.0, max_gamma=5) == (5, 6.0)  # perfect free draft: longest gamma
    assert S.best_gamma(0.0, 0.1) == (0, 1.0)  # useless draft: plain decoding
    assert S.best_gamma(0.3, 0.5) == (0, 1.0)  # costly draft: 1.3 / 1.5 < 1
    with pytest.raises(ValueError):
        S.best_gamma(0.5, 0.1, max_gamma=0)


def test_decode_step_bytes_read_one_embedding_row_at_the_decoding_precision():
    untied = AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=False))
    tied = AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=True))
    vocab, hidden = untied.config.vocab_size, untied.config.hidden_size
    n_untied = sum(p.numel() for p in untied.parameters())
    # untied: every weight but the input embedding, of which one row; tied: the head reads the shared matrix
    assert S.decode_step_bytes(untied) == 4 * (n_untied - vocab * hidden + hidden)
    assert S.decode_step_bytes(tied) == 4 * (sum(p.numel() for p in tied.parameters()) + hidden)
    assert S.decode_step_bytes(untied, "bf16") * 2 == S.decode_step_bytes(untied)  # the precision, not the dtype
    linear = sum(m.weight.numel() for m in untied.modules() if isinstance(m, torch.nn.Linear))
    assert S.decode_step_bytes(untied, "int8") == S.decode_step_bytes(untied) - 3 * linear  # int8 Linear weights
    big = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=128, num_attention_heads=4))
    assert S.cost_ratio_from_bytes(untied, big) == pytest.approx(
        S.decode_step_bytes(untied) / S.decode_step_bytes(big)
    )
    assert S.cost_ratio_from_bytes(untied, untied, "bf16", "fp32") == pytest.approx(0.5)
    assert S.cost_ratio_from_bytes(untied, big) != pytest.approx(param_bytes(untied) / param_bytes(big))


def test_measure_step_latency_is_positive_and_grows_with_tokens():
    model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=256, intermediate_size=1024)).eval()
    ids = torch.randint(3, 96, (1, 32))
    one = S.measure_step_latency(model, ids, n_tokens=1, repeats=5)
    many = S.measure_step_latency(model, ids, n_tokens=64, repeats=5)
    assert 0 < one < 1.0
    assert many > one  # 64 tokens per forward cost more than 1 (noisy machine: only the direction is asserted)
    with pytest.raises(ValueError):
        S.measure_step_latency(model, ids[0])


def test_decode_stats_properties_and_merge():
    a = DecodeStats(
        proposed=6,
        accepted=3,
        steps=2,
        target_forwards=3,
        draft_forwards=7,
        new_tokens=5,
        draft_time_s=0.1,
        target_time_s=0.4,
        wall_time_s=0.6,
        accepted_per_step=[1, 2],
        proposed_per_step=[3, 3],
    )
    b = DecodeStats(
        proposed=3,
        accepted=3,
        steps=1,
        target_forwards=2,
        draft_forwards=4,
        new_tokens=4,
        wall_time_s=0.3,
        accepted_per_step=[3],
        proposed_per_step=[3],
    )
    assert a.acceptance_rate == 0.5 and a.block_efficiency == 2.5
    m = a.merge(b)
    assert (m.proposed, m.accepted, m.steps, m.new_tokens) == (9, 6, 3, 9)
    assert (m.target_forwards, m.draft_forwards) == (5, 11)
    assert m.accepted_per_step == [1, 2, 3] and a.accepted_per_step == [1, 2]  # inputs untouched
    assert m.wall_time_s == pytest.approx(0.9) and m.tokens_per_s == pytest.approx(10.0)
    assert m.acceptance_rate == pytest.approx(6 / 9) and m.block_efficiency == 3.0
    # per-token alpha: accepted / (accepted + steps stopped by a rejection); a full accept adds no failure
    assert a.per_token_alpha == pytest.approx(3 / 5) and b.per_token_alpha == 1.0
    assert m.per_token_alpha == pytest.approx(6 / 8)
    plain = DecodeStats(steps=2, new_tokens=2, accepted_per_step=[0, 0], proposed_per_step=[0, 0])
    assert plain.per_token_alpha == 0.0  # gamma-0 steps judge nothing
    empty = DecodeStats()
    assert empty.acceptance_rate == 0.0 and empty.block_efficiency == 0.0 and empty.tokens_per_s == 0.0
    assert empty.per_token_alpha == 0.0


def test_measure_catchup():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    step_s, extra_s = S.measure_catchup(model, torch.randint(3, 96, (1, 10)), n_tokens=16, repeats=2, warmup=1)
    assert step_s > 0 and extra_s >= 0
    with pytest.raises(ValueError, match="n_tokens"):
        S.measure_catchup(model, torch.randint(3, 96, (1, 10)), n_tokens=1)
