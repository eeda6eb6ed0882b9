"""Token selection for speculative decoding: logits processing and the lossless verification rules.

Both the target (p) and the draft (q) distributions go through the same ``probs_from_logits`` (temperature,
then top-p), so speculative sampling reproduces exactly the distribution plain sampling from the processed p
would give. Temperature 0 means greedy everywhere: the draft proposes its argmax and a draft token is accepted
iff it equals the target's argmax.

All randomness comes from the ``torch.Generator`` passed in, so a seed reproduces a run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (p: (g+1, V) target probs, q: (g, V) draft probs, drafted: (g,) ids, generator) -> (n_accepted, next_token)
VerifyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Generator | None"], tuple[int, int]]


MIN_TEMPERATURE = 1e-5  # a smaller positive temperature overflows logits / T (inf - inf = NaN in the softmax)


def check_sampling_args(temperature: float, top_p: float) -> None:
    """Raise ``ValueError`` for a temperature neither 0 nor at least ``MIN_TEMPERATURE``, or a top-p outside
    (0, 1]."""
    if not (temperature == 0.0 or temperature >= MIN_TEMPERATURE):
        raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def probs_from_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Softmax of ``logits / temperature`` (fp32) restricted to the top-p nucleus and renormalised.

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p`` (at least one token).
    ``logits``: (..., V). Temperature must be > 0 here (greedy never builds distributions).
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always has mass_before 0
    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token id drawn from a 1-D distribution."""
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_greedy(target_logits: torch.Tensor, drafted: torch.Tensor) -> tuple[int, int]:
    """Greedy verification: accept the longest prefix of ``drafted`` that matches the target's argmax.

    ``target_logits``: (g+1, V) logits after the last committed token and after each drafted token.
    Returns ``(n_accepted, next_token)`` where ``next_token`` is the target's argmax after the accepted
    prefix: the correction on a mismatch, the bonus token when all ``g`` were accepted.
    """
    choice = target_logits.argmax(dim=-1)
    g = drafted.numel()
    mismatch = (choice[:g] != drafted).nonzero()
    n = int(mismatch[0]) if mismatch.numel() else g
    return n, int(choice[n])


def verify_sampled(
    p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, generator: torch.Generator | None
) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023), lossless for any p and q.

    Accept drafted token x_i with probability min(1, p_i(x_i) / q_i(x_i)), left to right; at the first
    rejection draw the next token from norm(max(0, p_i - q_i)); if all ``g`` are accepted draw one bonus
    token from p_g. ``p``: (g+1, V), ``q``: (g, V), ``drafted``: (g,). Always consumes ``g`` uniforms and one
    categorical draw from ``generator``. Returns ``(n_accepted, next_token)``.
    """
    g = drafted.numel()
    if g:
        rows = torch.arange(g, device=p.device)
        p_x, q_x = p[rows, drafted], q[rows, drafted]
        u = torch.rand(g, generator=generator, dtype=p_x.dtype, device=p.device)
        rejected = (u * q_x >= p_x).nonzero()  # u < p/q, written without dividing
        n = int(rejected[0]) if rejected.numel() else g
    else:
        n = 0
    if n == g:
        return n, sample(p[g], generator)
    residual = (p[n] - q[n]).clamp_(min=0.0)
    if not float(residual.sum()) > 0.0:  # only reachable through rounding: p_n == q_n up to fp error
        residual = p[n]
    return n, sample(residual, generator)
