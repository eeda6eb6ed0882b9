"""Speculative-decoding metrics, exactly as defined in docs/definitions.md.

- acceptance rate alpha = accepted draft tokens / proposed draft tokens
- block efficiency tau = tokens emitted per target verify forward (bonus token included);
  ideal tau(alpha, gamma) = (1 - alpha^(gamma+1)) / (1 - alpha)  (Leviathan et al. 2023, eq. 1)
- c = draft cost / target cost; MBSU = tau / (gamma * c + 1) with c = the bytes a decode step reads
  (``decode_step_bytes``: every weight once at its decoding precision, one row of the input embedding);
  hardware-aware speedup: the same formula with c = measured draft step / measured target step latency
- wall-clock speedup = target-only time / speculative time on the same prompts
- verify-cost curve v(k) = time to score k tokens in one target forward / one decode step (measured: on CPUs
  v(k) > 1); expected speedup tau / (gamma * c + v(gamma + 1)) generalises MBSU to it (``best_gamma``)
- catch-up cost = time of each token beyond the first in one draft forward / one target decode step: what
  the draft pays to catch up on tokens it skipped while speculation was off (``measure_catchup``)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from fastdraft_ray.specdec.runner import CachedRunner

# v[k - 1] = cost of scoring k tokens in one target forward / cost of one decode step (v[0] = 1)
VerifyCurve = tuple[float, ...] | list[float]


def _check_count(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def per_token_alpha(accepted: int, rejected_steps: int) -> float:
    """Per-token acceptance probability (maximum likelihood for i.i.d. acceptance): accepted draft tokens /
    (accepted + steps that stopped on a rejection); 0.0 when nothing was judged. Unlike ``acceptance_rate`` it
    does not count the proposals after a rejection, which are never judged."""
    _check_count("accepted", accepted)
    _check_count("rejected_steps", rejected_steps)
    judged = accepted + rejected_steps
    return accepted / judged if judged else 0.0


def acceptance_rate(accepted: int, proposed: int) -> float:
    """alpha = accepted / proposed; 0.0 when nothing was proposed."""
    _check_count("accepted", accepted)
    _check_count("proposed", proposed)
    if accepted > proposed:
        raise ValueError(f"accepted ({accepted}) cannot exceed proposed ({proposed})")
    return accepted / proposed if proposed else 0.0


def block_efficiency(new_tokens: int, verify_forwards: int) -> float:
    """tau = tokens emitted / target verify forwards; 0.0 when there was no verify forward."""
    _check_count("new_tokens", new_tokens)
    _check_count("verify_forwards", verify_forwards)
    return new_tokens / verify_forwards if verify_forwards else 0.0


def ideal_block_efficiency(alpha: float, gamma: int) -> float:
    """Expected tau for i.i.d. acceptance with rate ``alpha``: (1 - alpha^(gamma+1)) / (1 - alpha); gamma+1 at 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_count("gamma", gamma)
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 4}  # per element; int8 quantises nn.Linear weights only


def decode_step_bytes(model: PreTrainedModel, precision: str = "fp32") -> int:
    """Bytes of weights one decode step reads at ``precision`` (``specdec.precision``): every parameter once,
    except the input embedding, of which a step reads one row (the whole matrix when the output head is tied to
    it and scores every row); int8 counts one byte per ``nn.Linear`` weight element (``quantize_dynamic``; a
    tied head gets its own int8 copy). Works on a meta-device model (no weights needed)."""
    size = WEIGHT_BYTES[precision]
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embedding

    def bytes_of(p: torch.Tensor, as_linear: bool = False) -> int:
        return p.numel() * (1 if precision == "int8" and (as_linear or id(p) in linear) else size)

    total = sum(bytes_of(p) for p in model.parameters() if p is not embedding)  # parameters() skips tied copies
    total += embedding.shape[-1] * size  # the one row a token looks up
    if tied:  # the head reads the whole (shared) matrix
        total += bytes_of(embedding, as_linear=True)
    return total


def cost_ratio_from_bytes(
    draft: PreTrainedModel, target: PreTrainedModel, draft_precision: str = "fp32", target_precision: str = "fp32"
) -> float:
    """c for MBSU: the bytes a draft decode step reads / the bytes a target decode step reads (memory-bound)."""
    return decode_step_bytes(draft, draft_precision) / decode_step_bytes(target, target_precision)


def mbsu(tau: float, gamma: float, c: float) -> float:
    """Memory-bound speedup tau / (gamma * c + 1)."""
    _check_count("tau", tau)
    _check_count("gamma", gamma)
    _check_count("c", c)
    return tau / (gamma * c + 1.0)


def hardware_speedup(
    tau: float, gamma: float, draft_step_s: float, target_step_s: float, verify_step_s: float | None = None
) -> float:
    """tau / (gamma * c + 1) with c = measured draft step / target step latency.

    ``verify_step_s`` (optional): measured latency of the (gamma+1)-token verify forward, replacing the "+1"
    (one target step) in the denominator; on CPUs scoring several tokens is not free (measured: docs/results.md), so this is
    the closer estimate there: tau * target_step / (gamma * draft_step + verify_step).
    """
    if not target_step_s > 0:
        raise ValueError(f"target_step_s must be > 0, got {target_step_s}")
    _check_count("draft_step_s", draft_step_s)
    if verify_step_s is None:
        return mbsu(tau, gamma, draft_step_s / target_step_s)
    _check_count("tau", tau)
    return tau * target_step_s / (gamma * draft_step_s + verify_step_s)


def wallclock_speedup(target_only_s: float, speculative_s: float) -> float:
    """Target-only time / speculative time for the same prompts and token counts."""
    _check_count("target_only_s", target_only_s)
    if not speculative_s > 0:
        raise ValueError(f"speculative_s must be > 0, got {speculative_s}")
    return target_only_s / speculative_s


def expected_speedup(alpha: float, gamma: int, c: float, verify_cost: VerifyCurve | None = None) -> float:
    """Expected tokens per unit time relative to plain decoding, for i.i.d. per-token acceptance ``alpha``.

    ideal tau(alpha, gamma) / (gamma * c + v(gamma + 1)) where v(k) = cost of scoring k tokens in one target
    forward / one decode step (``verify_cost[k - 1]``; ``None`` = the memory-bound picture v(k) = 1, i.e. MBSU).
    gamma = 0 is plain decoding: exactly 1.
    """
    _check_count("gamma", gamma)
    _check_count("c", c)
    if gamma == 0:
        return 1.0
    return ideal_block_efficiency(alpha, gamma) / (gamma * c + verify_at(verify_cost, gamma + 1))


def verify_at(verify_cost: VerifyCurve | None, k: int) -> float:
    """v(k): relative cost of scoring ``k`` tokens at once (1.0 when no curve is given)."""
    if verify_cost is None:
        return 1.0
    if not 1 <= k <= len(verify_cost):
        raise ValueError(f"the verify-cost curve covers k = 1..{len(verify_cost)} tokens, {k} asked")
    return float(verify_cost[k - 1])


def best_gamma(
    alpha: float, c: float, max_gamma: int = 8, verify_cost: VerifyCurve | None = None, allow_plain: bool = True
) -> tuple[int, float]:
    """The gamma in 1..max_gamma maximising ``expected_speedup`` (memory-bound when ``verify_cost`` is None),
    with that speedup.

    Returns ``(0, 1.0)`` when no gamma beats plain decoding (speedup <= 1), unless ``allow_plain`` is False: then
    the best gamma >= 1 with its speedup, even below 1.
    """
    if max_gamma < 1:
        raise ValueError(f"max_gamma must be >= 1, got {max_gamma}")
    best = max(
        ((g, expected_speedup(alpha, g, c, verify_cost)) for g in range(1, max_gamma + 1)),
        key=lambda gs: gs[1],
    )
    return best if best[1] > 1.0 or not allow_plain else (0, 1.0)


@dataclass(frozen=True)
class SpeedupModel:
    """What a draft's speed on one device comes down to: c = draft step / target step and the target's
    verify-cost curve v(k) (k = 1..len); ``predict`` turns a per-token acceptance into the expected speedup."""

    c: float
    verify_cost: tuple[float, ...]
    max_gamma: int = 8

    def predict(self, alpha_per_token: float) -> tuple[int, float]:
        """``(gamma, speedup)`` at the gamma in 1..max_gamma (and the curve) that maximises ``expected_speedup``;
        unlike ``best_gamma`` the speedup may be below 1 (a ranking of drafts that do not pay yet keeps order)."""
        top = min(self.max_gamma, len(self.verify_cost) - 1)
        if top < 1:
            raise ValueError(
                f"the verify-cost curve must cover k = 2 at least, got {len(self.verify_cost)} points"
            )
        alpha = min(max(float(alpha_per_token), 0.0), 1.0)
        return best_gamma(alpha, self.c, top, self.verify_cost, allow_plain=False)


def measure_step_latency(
    model: PreTrainedModel, input_ids: torch.LongTensor, n_tokens: int = 1, repeats: int = 7, warmup: int = 2
) -> float:
    """Median seconds of one forward of ``n_tokens`` new tokens on top of a warm KV cache holding ``input_ids``.

    The cache is cropped back after every timed forward, so each repeat sees the same context length.
    ``n_tokens=1`` is a decode step (draft or target step); ``n_tokens=gamma+1`` is a verify forward.
    """
    return measure_forward_latencies(model, input_ids, [n_tokens], repeats, warmup)[n_tokens]


@torch.inference_mode()
def measure_forward_latencies(
    model: PreTrainedModel, input_ids: torch.LongTensor, sizes: list[int], repeats: int = 7, warmup: int = 2
) -> dict[int, float]:
    """Median seconds of a forward of k new tokens on a warm cache holding ``input_ids``, for each k in ``sizes``.

    The sizes are timed round-robin within each repeat, so load from other processes spreads over all of them
    (ratios between sizes stay meaningful on a shared machine); the cache is cropped back after every forward.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, n), got {tuple(input_ids.shape)}")
    if not sizes or min(sizes) < 1 or repeats < 1:
        raise ValueError(f"sizes and repeats must be >= 1, got {sizes}, {repeats}")
    run = CachedRunner(model)  # crops after every timed forward
    run(input_ids[0])
    times: dict[int, list[float]] = {k: [] for k in sizes}
    for i in range(warmup + repeats):
        for k in sizes:
            step = input_ids[0, -1:].repeat(k)
            t0 = time.perf_counter()
            run(step, keep=k)
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
            run.crop(k)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_verify_cost(
    model: PreTrainedModel, input_ids: torch.LongTensor, max_k: int = 8, repeats: int = 7, warmup: int = 2
) -> tuple[tuple[float, ...], float]:
    """The verify-cost curve of ``model`` on a warm cache holding ``input_ids``: ``(v, step_s)`` with
    ``v[k - 1]`` = median time to score k tokens in one forward / median time of one decode step
    (k = 1..max_k, so ``v[0] == 1``) and ``step_s`` that one-step median in seconds."""
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    lat = measure_forward_latencies(model, input_ids, list(range(1, max_k + 1)), repeats, warmup)
    return tuple(lat[k] / lat[1] for k in range(1, max_k + 1)), lat[1]


def measure_catchup(
    model: PreTrainedModel, input_ids: torch.LongTensor, n_tokens: int = 32, repeats: int = 7, warmup: int = 2
) -> tuple[float, float]:
    """``(step_s, extra_token_s)`` of ``model`` (a draft) on a warm cache holding ``input_ids``: the median
    seconds of a one-token forward, and of each further token when ``n_tokens`` are fed in one forward (the
    catch-up on tokens it skipped); ``extra_token_s / target step`` is ``CostModel.catchup``."""
    if n_tokens < 2:
        raise ValueError(f"n_tokens must be >= 2, got {n_tokens}")
    lat = measure_forward_latencies(model, input_ids, [1, n_tokens], repeats, warmup)
    return lat[1], max(lat[n_tokens] - lat[1], 0.0) / (n_tokens - 1)
