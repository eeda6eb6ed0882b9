"""SpecDecoder: stream() yields each verified step as it happens, generate() is stream() run to the end, one
typed DecodeConfig drives precision, policy and stopping; on the real target its greedy stream is the target's
own greedy output."""

from __future__ import annotations

import pytest
import torch

from fastdraft_ray.config import DecodeConfig, ModelConfig
from fastdraft_ray.models.draft import build_draft, derive_draft_config
from fastdraft_ray.specdec.decode import autoregressive_generate
from fastdraft_ray.specdec.engine import SpecDecoder
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    draft = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=1)).eval()
    return target, draft


def test_stream_chunks_concatenate_to_generate(pair):
    target, draft = pair
    decoder = SpecDecoder(target, draft, DecodeConfig(gamma=3, temperature=0.0), stop_ids=None)
    steps = list(decoder.stream([1, 5, 7, 9], max_new_tokens=20))
    streamed = [t for s in steps for t in s.tokens]
    assert streamed == decoder.generate([1, 5, 7, 9], max_new_tokens=20).tokens
    assert streamed == autoregressive_generate(target, torch.tensor([[1, 5, 7, 9]]), max_new_tokens=20).tokens
    assert [s.finished for s in steps] == [False] * (len(steps) - 1) + [True]
    assert sum(s.accepted for s in steps) == steps[-1].stats.accepted  # running counters
    assert all(1 <= len(s.tokens) <= s.proposed + 1 for s in steps)


def test_target_only_stream_and_stop_tokens(pair):
    target, draft = pair
    reference = SpecDecoder(target, None, DecodeConfig(temperature=0.0)).generate([3, 4], max_new_tokens=12).tokens
    stop = reference[5]
    first = reference.index(stop)
    decoder = SpecDecoder(target, draft, DecodeConfig(temperature=0.0), stop_ids=[stop])
    assert decoder.generate([3, 4], max_new_tokens=12).tokens == reference[: first + 1]
    assert decoder.generate([3, 4], max_new_tokens=12, speculative=False).tokens == reference[: first + 1]
    unstopped = SpecDecoder(target, draft, DecodeConfig(temperature=0.0, stop_at_eos=False), stop_ids=[stop])
    assert unstopped.generate([3, 4], max_new_tokens=12).tokens == reference


def test_closing_the_stream_stops_the_generation(pair):
    target, draft = pair
    decoder = SpecDecoder(target, draft, DecodeConfig(gamma=2, temperature=0.0))
    stream = decoder.stream([1, 2, 3], max_new_tokens=40)
    first = next(stream)
    forwards = first.stats.target_forwards
    stream.close()  # a client that went away
    assert first.stats.target_forwards == forwards and first.stats.new_tokens < 40


def test_cost_policy_needs_measured_costs_and_uses_them(pair):
    target, draft = pair
    decoder = SpecDecoder(target, draft, DecodeConfig(gamma_policy="cost", max_gamma=3))
    with pytest.raises(RuntimeError, match="measure_costs"):
        decoder.policy()
    costs = decoder.measure_costs([1, 2, 3, 4])
    assert len(costs.verify_cost) == decoder.verify_curve_length() == 4 and costs.target_step_s > 0
    assert decoder.policy().name == "cost"
    assert len(decoder.generate([1, 2, 3, 4], max_new_tokens=8, temperature=0.0).tokens) == 8


def test_with_draft_shares_the_target_and_applies_the_draft_precision(pair):
    target, _ = pair
    draft = build_draft(derive_draft_config(target.config, DecodeTiny()), seed=1)
    decoder = SpecDecoder(target, None, DecodeConfig(draft_precision="bf16")).with_draft(draft)
    assert decoder.target is target and next(decoder.draft.parameters()).dtype == torch.bfloat16
    # no precision asked: the draft follows the target's (e.g. a bf16 model.dtype that load() resolved)
    follows = SpecDecoder(target, None, DecodeConfig(), precision="bf16").with_draft(
        build_draft(derive_draft_config(target.config, DecodeTiny()), seed=1)
    )
    assert follows.precision == "bf16" and next(follows.draft.parameters()).dtype == torch.bfloat16


def DecodeTiny():
    from fastdraft_ray.config import DraftConfig

    return DraftConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.mark.real_target
def test_real_target_load_and_greedy_stream_equal_targets_own(smollm2_dir):
    """SpecDecoder.load on the embedded target with a random derived draft: greedy stream() == the target alone,
    and stop tokens come from models.prompting (chat end <|im_end|> and end-of-text <|endoftext|>)."""
    model = ModelConfig()
    decoder = SpecDecoder.load(model, None, DecodeConfig(gamma=3, temperature=0.0))
    tok = decoder.tokenizer
    assert set(decoder.stop_ids) >= {
        tok.convert_tokens_to_ids("<|im_end|>"),
        tok.convert_tokens_to_ids("<|endoftext|>"),
    }
    draft = build_draft(derive_draft_config(decoder.target.config, DecodeTiny()), seed=0)
    spec = decoder.with_draft(draft)
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    own = decoder.generate(ids, max_new_tokens=24).tokens
    streamed = [t for step in spec.stream(ids, max_new_tokens=24) for t in step.tokens]
    assert streamed == own
