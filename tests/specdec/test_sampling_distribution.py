"""Statistical losslessness of speculative sampling: emitted tokens follow exactly the target's distribution.

A tiny target and a different tiny draft with an 8-token vocabulary have distributions that are peaked and
disagree (acceptance ~0.4-0.6), so accepts, rejections (residual draws) and bonus tokens are all frequent. The
exact distribution of the first ``K`` emitted tokens is computed by enumerating every prefix; the empirical
distribution over many seeds must pass a chi-square test, and the same test must REJECT the engine run with
a deliberately broken verification rule injected (accept always; resample from p instead of the residual).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from fastdraft_ray.config import DecodeConfig
from fastdraft_ray.specdec import decode
from fastdraft_ray.specdec.decode import speculative_generate, speculative_stream
from fastdraft_ray.specdec.engine import SpecDecoder
from fastdraft_ray.specdec.sampling import probs_from_logits, sample, verify_sampled
from tests.conftest import tiny_config

VOCAB, K, GAMMA = 8, 5, 2
SETTINGS = [(1.0, 1.0), (0.7, 0.8)]  # (temperature, top_p)
PROMPT = torch.tensor([[1, 5, 3, 7]])
ALPHA = 1e-3  # per-test significance; seeds are fixed, so the outcome is deterministic


def tiny(seed: int):
    cfg = tiny_config(
        "llama",
        vocab_size=VOCAB,
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def pair():
    return tiny(0), tiny(1)


@torch.inference_mode()
def exact_joint(model, temperature: float, top_p: float) -> torch.Tensor:
    """P(x_1..x_K) of plain sampling, shape (V,)*K, by enumerating all prefixes (V**(K-1) rows at the end).

    The temperature/top-p processing is transformers' own (an independent reference for ``sampling.py``).
    """
    warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
    joint = torch.ones((), dtype=torch.float64)
    for depth in range(K):
        prefixes = torch.tensor(list(itertools.product(range(VOCAB), repeat=depth)), dtype=torch.long)
        ids = torch.cat([PROMPT.expand(len(prefixes), -1), prefixes.view(len(prefixes), depth)], dim=1)
        scores = model(input_ids=ids).logits[:, -1].double()
        for warp in warpers:
            scores = warp(ids, scores)
        probs = torch.softmax(scores, dim=-1)
        joint = joint.unsqueeze(-1) * probs.view(*([VOCAB] * depth), VOCAB)
    return joint


def samples(target, draft, n: int, temperature: float = 1.0, top_p: float = 1.0, verify=None, proposer="draft"):
    """``n`` sampled continuations through the engine's ``stream()`` (``draft`` None: plain sampling from the
    target alone, unless ``proposer`` is ``ngram``; ``verify``: a deliberately broken rule, swapped in at the
    decoding loop's test hook instead)."""
    decoder = SpecDecoder(target, draft, DecodeConfig(gamma=GAMMA, stop_at_eos=False, proposer=proposer))
    rows = []
    for seed in range(n):
        kw = {"max_new_tokens": K, "temperature": temperature, "top_p": top_p}
        gen = torch.Generator().manual_seed(seed)
        if verify is None:
            steps = decoder.stream(PROMPT, generator=gen, **kw)
        else:
            steps = speculative_stream(
                target, draft, PROMPT, gamma=GAMMA, generator=gen, _verify=verify, proposer=proposer, **kw
            )
        tokens = [t for step in steps for t in step.tokens]
        assert len(tokens) == K
        rows.append(tokens)
    return torch.tensor(rows)


def chi2_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells with expected count < 5 are pooled into one."""
    n = observed.sum().item()
    exp = expected_probs.flatten().double() * n
    obs = observed.flatten().double()
    small = exp < 5
    exp_cells = torch.cat([exp[~small], exp[small].sum().view(1)])
    obs_cells = torch.cat([obs[~small], obs[small].sum().view(1)])
    keep = exp_cells > 0
    return float(
        chisquare(
            obs_cells[keep].numpy(), exp_cells[keep].numpy() * obs_cells.sum().item() / exp_cells.sum().item()
        ).pvalue
    )


def pvalues(tokens: torch.Tensor, joint: torch.Tensor) -> dict[str, float]:
    """p-values for: the joint of (x1, x2), and the marginals of x3, x4, x5 (later steps, rolled-back caches)."""
    out = {}
    pair_counts = torch.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB**2)
    out["x1,x2"] = chi2_pvalue(pair_counts, joint.sum(dim=tuple(range(2, K))))
    for pos in range(2, K):
        marg = joint.sum(dim=tuple(d for d in range(K) if d != pos))
        out[f"x{pos + 1}"] = chi2_pvalue(torch.bincount(tokens[:, pos], minlength=VOCAB), marg)
    return out


def accept_always(p, q, drafted, generator):
    g = drafted.numel()
    return g, sample(p[g], generator)


def resample_from_p(p, q, drafted, generator):
    g = drafted.numel()
    rows = torch.arange(g, device=p.device)
    u = torch.rand(g, generator=generator, dtype=p.dtype, device=p.device)
    rejected = (u * q[rows, drafted] >= p[rows, drafted]).nonzero()
    n = int(rejected[0]) if rejected.numel() else g
    return n, sample(p[n], generator)  # WRONG: should draw from norm(max(0, p - q)) on rejection


@pytest.mark.parametrize(("temperature", "top_p"), SETTINGS)
def test_speculative_sampling_matches_target_distribution(pair, temperature, top_p):
    target, draft = pair
    joint = exact_joint(target, temperature, top_p)
    tokens = samples(target, draft, 800, temperature, top_p)
    pvals = pvalues(tokens, joint)
    print(f"p-values (correct rule, T={temperature}, top_p={top_p}):", pvals)
    assert min(pvals.values()) > ALPHA, pvals


@pytest.mark.parametrize("broken", [accept_always, resample_from_p], ids=["accept_always", "resample_from_p"])
def test_broken_rules_are_detected(pair, broken):
    target, draft = pair
    joint = exact_joint(target, 1.0, 1.0)
    tokens = samples(target, draft, 500, verify=broken)
    pvals = pvalues(tokens, joint)
    print(f"p-values ({broken.__name__}):", pvals)
    assert min(pvals.values()) < ALPHA, pvals


@pytest.mark.parametrize(("temperature", "top_p"), SETTINGS)
def test_plain_sampling_matches_target_distribution(pair, temperature, top_p, monkeypatch):
    """The target alone (the baseline every speedup is measured against) samples its own distribution; the same
    test rejects a sampler that squares the probabilities (a wrong temperature)."""
    target, _ = pair
    joint = exact_joint(target, temperature, top_p)
    correct = pvalues(samples(target, None, 800, temperature, top_p), joint)
    assert min(correct.values()) > ALPHA, correct
    monkeypatch.setattr(decode, "sample", lambda probs, gen: sample(probs**2 / (probs**2).sum(), gen))
    broken = pvalues(samples(target, None, 500, temperature, top_p), joint)
    assert min(broken.values()) < ALPHA, broken


@pytest.mark.parametrize("proposer", ["ngram", "draft+ngram"])
def test_ngram_proposals_sample_the_target_distribution(pair, proposer):
    """An n-gram proposal is a draft with a one-hot q: accepted with p(x), residual norm(max(0, p - q)). The
    8-token vocabulary repeats tokens often, so many steps propose n-grams; the same test rejects the engine with a
    rule that accepts every proposal."""
    target, draft = pair
    draft = draft if proposer == "draft+ngram" else None
    joint = exact_joint(target, 1.0, 1.0)
    correct = pvalues(samples(target, draft, 800, proposer=proposer), joint)
    assert min(correct.values()) > ALPHA, correct
    broken = pvalues(samples(target, draft, 500, verify=accept_always, proposer=proposer), joint)
    assert min(broken.values()) < ALPHA, broken
    ngram_steps = speculative_generate(
        target, draft, PROMPT, gamma=GAMMA, max_new_tokens=200, temperature=1.0, proposer=proposer,
        generator=torch.Generator().manual_seed(0),
    ).stats.ngram_steps  # fmt: skip
    assert ngram_steps >= 20, ngram_steps


def test_acceptance_paths_all_occur(pair):
    """The setting is only a real test if rejections, partial and full accepts are all common."""
    target, draft = pair
    out = speculative_generate(
        target,
        draft,
        PROMPT,
        gamma=GAMMA,
        max_new_tokens=300,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    counts = torch.bincount(torch.tensor(out.stats.accepted_per_step), minlength=GAMMA + 1)
    assert (counts[: GAMMA + 1] >= 10).all(), counts
    assert 0.2 < out.stats.acceptance_rate < 0.8


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.6, 1.0), (1.3, 0.9), (0.8, 0.5), (1.0, 1e-6)])
def test_probs_from_logits_matches_transformers_warpers(temperature, top_p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    scores = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    expected = torch.softmax(scores, dim=-1)
    torch.testing.assert_close(probs_from_logits(logits, temperature, top_p), expected, atol=1e-6, rtol=1e-5)


def test_verify_sampled_first_token_is_exactly_p():
    """Unit level, many draws: x_1 ~ p_0 for a p/q pair where the wrong residual visibly biases the output."""
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.9, 0.1, 0.0]])
    gen = torch.Generator().manual_seed(0)
    first = []
    for _ in range(4000):
        drafted = torch.multinomial(q[0], 1, generator=gen)
        n, nxt = verify_sampled(p, q, drafted, gen)
        first.append(int(drafted[0]) if n >= 1 else nxt)
    freq = torch.bincount(torch.tensor(first), minlength=3) / len(first)
    # std of a frequency near 0.5 over 4000 draws is ~0.008; the p-resampling bug would give 0.7 / 0.3.
    torch.testing.assert_close(freq, p[0], atol=0.03, rtol=0)
