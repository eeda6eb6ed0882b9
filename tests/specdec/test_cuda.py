"""Speculative decoding on a CUDA device (``pytest -m gpu``; ``scripts/gpu_check.sh``): greedy identity with a
real-size random target (Llama-3.2-1B's shape) and a draft of three of its layers, the chi-square smoke test of
the sampled rule on the GPU, and the target's tokens/s and verify curve v(k) there."""

from __future__ import annotations

import time

import pytest
import torch

from fastdraft_ray.config import DecodeConfig, DraftConfig
from fastdraft_ray.models.draft import new_draft
from fastdraft_ray.specdec.decode import NEAR_TIE_LOGIT_GAP, first_divergence
from fastdraft_ray.specdec.engine import SpecDecoder
from tests.gpu import LLAMA_32_1B, needs_cuda, random_model, report

pytestmark = needs_cuda
PROMPTS, NEW = 4, 64


@pytest.fixture(scope="module")
def pair():
    """The target (fp32, TF32 off: greedy identity is checked to the near-tie tolerance) and a target-layer draft."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    target = random_model(LLAMA_32_1B, torch.float32)
    draft = new_draft(target.config, DraftConfig(init="layers", init_layers=[0, 8, 15]), target_model=target)
    return target, draft.to("cuda").eval()


def test_greedy_output_is_the_targets_own_on_cuda(pair):
    target, draft = pair
    decoder = SpecDecoder(target, draft, DecodeConfig(gamma=3, stop_at_eos=False, linear_kernel="torch"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    identical, ties, spec_s, base_s, accepted, proposed = 0, 0, 0.0, 0.0, 0, 0
    for i in range(PROMPTS):
        ids = torch.randint(3, LLAMA_32_1B["vocab_size"], (1, 24), generator=gen, device="cuda")
        decoder.generate(ids, max_new_tokens=4, temperature=0.0)  # warm-up (kernels, cache allocator)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        base = decoder.generate(ids, max_new_tokens=NEW, temperature=0.0, speculative=False)
        t1 = time.perf_counter()
        spec = decoder.generate(ids, max_new_tokens=NEW, temperature=0.0)
        torch.cuda.synchronize()
        spec_s, base_s = spec_s + time.perf_counter() - t1, base_s + t1 - t0
        accepted, proposed = accepted + spec.stats.accepted, proposed + spec.stats.proposed
        hf = target.generate(ids, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW, pad_token_id=0)
        hf = hf[0, ids.shape[1] :].tolist()
        for candidate in (spec.tokens, hf):
            where = first_divergence(target, ids, base.tokens, candidate)
            assert where is None or where[1] < NEAR_TIE_LOGIT_GAP, (i, where)
            ties += where is not None
        identical += spec.tokens == base.tokens
    ok = identical + ties >= PROMPTS
    report(
        "specdec greedy identity (cuda, Llama-3.2-1B shape, 3-layer draft)",
        ok,
        f"{identical}/{PROMPTS} identical, {ties} near-tie divergences; target alone {PROMPTS * NEW / base_s:.1f} "
        f"tok/s, speculative {PROMPTS * NEW / spec_s:.1f} tok/s (α {accepted / max(proposed, 1):.2f})",
    )
    assert ok


def test_verify_curve_on_cuda(pair):
    target, draft = pair
    decoder = SpecDecoder(target, draft, DecodeConfig(gamma=7, stop_at_eos=False, linear_kernel="torch"))
    ids = torch.randint(3, 1000, (1, 128), device="cuda")
    curve, step_s = decoder.measure_target(ids)
    ok = step_s > 0 and all(v > 0 for v in curve)
    report(
        "verify curve (cuda, Llama-3.2-1B shape, fp32)",
        ok,
        f"decode step {1000 * step_s:.2f} ms; v(2..8) = {', '.join(f'{v:.2f}' for v in curve[1:])}",
    )
    assert ok


def test_sampled_output_follows_the_target_on_cuda():
    """The CPU chi-square test (tests/specdec/test_sampling_distribution.py) with both models and every draw on the
    GPU; the broken rule must still fail it."""
    from fastdraft_ray.specdec.decode import speculative_stream
    from tests.specdec.test_sampling_distribution import (
        ALPHA,
        GAMMA,
        PROMPT,
        K,
        exact_joint,
        pvalues,
        resample_from_p,
        tiny,
    )

    target, draft = tiny(0), tiny(1)
    joint = exact_joint(target, 1.0, 1.0)  # on the CPU: the reference
    target, draft = target.to("cuda"), draft.to("cuda")
    decoder = SpecDecoder(target, draft, DecodeConfig(gamma=GAMMA, stop_at_eos=False, linear_kernel="torch"))

    def samples(n: int, verify=None) -> torch.Tensor:
        rows = []
        for seed in range(n):
            gen = torch.Generator(device="cuda").manual_seed(seed)
            kw = {"max_new_tokens": K, "temperature": 1.0, "generator": gen}
            prompt = PROMPT.to("cuda")
            steps = (
                decoder.stream(prompt, **kw)
                if verify is None
                else speculative_stream(target, draft, prompt, gamma=GAMMA, _verify=verify, **kw)
            )
            rows.append([t for step in steps for t in step.tokens])
        return torch.tensor(rows)

    good, bad = pvalues(samples(800), joint), pvalues(samples(500, resample_from_p), joint)
    ok = min(good.values()) > ALPHA and min(bad.values()) < ALPHA
    report(
        "speculative sampling chi-square (cuda)",
        ok,
        f"min p-value {min(good.values()):.3g} (correct rule), {min(bad.values()):.2g} (broken rule)",
    )
    assert ok
