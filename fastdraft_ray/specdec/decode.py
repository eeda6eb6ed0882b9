"""Lossless speculative decoding (batch 1) of any HF causal LM target with a vocabulary-compatible draft.

Each step the draft proposes ``gamma`` tokens one at a time, the target scores them all in ONE forward, and
``sampling.verify_greedy`` / ``sampling.verify_sampled`` keeps the longest acceptable prefix plus one target
token (the correction, or the bonus token when everything was accepted). Greedy output is the target's own
greedy output; sampled output has exactly the target's (temperature/top-p processed) distribution.

Both models keep a ``transformers.DynamicCache`` for the whole generation; a rejection is undone with
``cache.crop(-n)`` (transformers 5.x: a NEGATIVE n drops the last n positions; a positive n raises), never by
recomputing. Invariant at the start of every step, with ``seq`` the prompt plus the tokens emitted so far:
the target cache holds ``seq[:-1]``, so the verify forward is ``[seq[-1], d_1..d_g]`` and its g+1 logits give
p(. | seq), p(. | seq, d_1), ..., p(. | seq, d_1..d_g); the draft cache holds ``seq`` minus its ``pending``
tail (one token, or two after a full accept because the draft never ran its own last proposal ``d_g``), which
the draft feeds in the first forward of its next drafting step. The draft is prefilled lazily: ``pending``
starts as the whole prompt, and a step with gamma = 0 (a policy turning speculation off) runs no draft forward
and just appends its token to ``pending``, so such a step costs what a plain target decode step costs.

Greedy exactness holds up to floating point: the target scores a token inside a (g+1)-token chunk while plain
decoding scores it alone, and fp32 matmuls of different shapes round differently (~1e-6 relative). The two
can therefore pick different tokens only where the target's top-2 logits are within that rounding error of
each other; ``first_divergence`` lets tests and benchmarks check that every divergence is such a near-tie.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from fastdraft_ray.models.draft import check_compatible
from fastdraft_ray.specdec import stats as S
from fastdraft_ray.specdec.policy import GammaPolicy
from fastdraft_ray.specdec.runner import CachedRunner
from fastdraft_ray.specdec.sampling import (
    VerifyFn,
    check_sampling_args,
    probs_from_logits,
    sample,
    verify_greedy,
    verify_sampled,
)

# Largest top-2 logit gap at which fp32 rounding differences between chunked and one-token scoring are allowed
# to flip a greedy choice (fp32 logits of magnitude ~10-30 carry ~1e-6 absolute error per op; 1e-4 is generous
# yet far below the gaps of ordinary tokens, typically > 0.1).
NEAR_TIE_LOGIT_GAP = 1e-4


@dataclass
class DecodeStats:
    """Counters of one (or, after ``merge``, several) generations. Definitions: docs/definitions.md."""

    proposed: int = 0  # draft tokens proposed (sum over steps)
    accepted: int = 0  # draft tokens accepted by the verification rule
    steps: int = 0  # speculative steps (= target verify forwards after prefill)
    target_forwards: int = 0  # all target forward calls incl. prefill
    draft_forwards: int = 0  # all draft forward calls incl. prefill
    new_tokens: int = 0  # tokens emitted
    draft_time_s: float = 0.0
    target_time_s: float = 0.0
    wall_time_s: float = 0.0
    accepted_per_step: list[int] = field(default_factory=list)
    proposed_per_step: list[int] = field(default_factory=list)  # gamma actually used per step (policies vary it)
    ngram_steps: int = 0  # steps whose proposal came from the context's n-grams (proposer ngram, draft+ngram)

    @property
    def acceptance_rate(self) -> float:
        """alpha = accepted / proposed (0.0 when nothing was proposed)."""
        return S.acceptance_rate(self.accepted, self.proposed)

    @property
    def rejected_steps(self) -> int:
        """Steps that stopped on a rejection (fewer accepted than proposed)."""
        return sum(n < g for n, g in zip(self.accepted_per_step, self.proposed_per_step, strict=True))

    @property
    def per_token_alpha(self) -> float:
        """Per-token acceptance probability (``stats.per_token_alpha``): what ``CostPolicy(prior_alpha=...)``
        expects."""
        return S.per_token_alpha(self.accepted, self.rejected_steps)

    @property
    def block_efficiency(self) -> float:
        """tau = tokens emitted per target verify forward, bonus/correction token included."""
        return S.block_efficiency(self.new_tokens, self.steps)

    @property
    def tokens_per_s(self) -> float:
        """Emitted tokens per second of wall time (0.0 before anything ran)."""
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def merge(self, other: DecodeStats) -> DecodeStats:
        """A new ``DecodeStats`` with every counter summed (aggregating prompts)."""
        return DecodeStats(
            proposed=self.proposed + other.proposed,
            accepted=self.accepted + other.accepted,
            steps=self.steps + other.steps,
            target_forwards=self.target_forwards + other.target_forwards,
            draft_forwards=self.draft_forwards + other.draft_forwards,
            new_tokens=self.new_tokens + other.new_tokens,
            draft_time_s=self.draft_time_s + other.draft_time_s,
            target_time_s=self.target_time_s + other.target_time_s,
            wall_time_s=self.wall_time_s + other.wall_time_s,
            accepted_per_step=self.accepted_per_step + other.accepted_per_step,
            proposed_per_step=self.proposed_per_step + other.proposed_per_step,
            ngram_steps=self.ngram_steps + other.ngram_steps,
        )


@dataclass
class DecodeResult:
    """New tokens only (prompt excluded) and the counters of the run."""

    tokens: list[int]
    stats: DecodeStats


@dataclass
class Step:
    """What one decoding step emitted, as ``*_stream`` yields it: the new tokens (accepted draft tokens + the
    target's correction or bonus token, cut after a stop token), this step's draft counts, and the generation's
    live counters (the same ``DecodeStats`` object at every step, updated in place; its timings exclude the time
    the consumer spent between steps)."""

    tokens: list[int]
    proposed: int
    accepted: int
    finished: bool  # a stop token was emitted or max_new_tokens reached: the stream ends after this step
    stats: DecodeStats


def collect(steps: Iterator[Step]) -> DecodeResult:
    """Run a stream to its end: every emitted token and the final counters."""
    out: list[int] = []
    stats = DecodeStats()
    for step in steps:
        out.extend(step.tokens)
        stats = step.stats
    return DecodeResult(out, stats)


def _eos_set(eos_token_id: int | list[int] | None) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    return frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)


def _check_inputs(input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float) -> list[int]:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape (1, n >= 1) (batch 1 only), got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_sampling_args(temperature, top_p)
    return input_ids[0].tolist()


def _truncate_at_eos(tokens: list[int], eos: frozenset[int]) -> tuple[list[int], bool]:
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[: i + 1], True
    return tokens, False


class _Clock:
    """Wall time of a stream, paused while the consumer holds a yielded step."""

    def __init__(self):
        self.total, self.since = 0.0, time.perf_counter()

    def pause(self) -> float:
        self.total += time.perf_counter() - self.since
        return self.total

    def resume(self) -> None:
        self.since = time.perf_counter()


def _prefill(run: CachedRunner, ids: list[int], chunk: int, stats: DecodeStats, clock: _Clock) -> Iterator[Step]:
    """Feed ``ids`` into ``run``'s cache, ``chunk`` tokens per forward (0: one forward), yielding an empty ``Step``
    between two chunks so a consumer (a server's step loop) can run other work in between."""
    size = chunk if chunk > 0 else max(len(ids), 1)
    for start in range(0, len(ids), size):
        run(ids[start : start + size])
        if start + size < len(ids):
            stats.wall_time_s = clock.pause()
            yield Step([], 0, 0, False, stats)
            clock.resume()


PROPOSERS = ("draft", "ngram", "draft+ngram")


def ngram_proposal(history: list[int], max_match: int, max_tokens: int) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the longest suffix of ``history``
    (at most ``max_match`` tokens long), at most ``max_tokens`` of them; [] when no suffix occurred before."""
    if max_tokens <= 0:
        return []
    for k in range(min(max_match, len(history) - 1), 0, -1):
        suffix = history[-k:]
        for start in range(len(history) - k - 1, -1, -1):
            if history[start : start + k] == suffix:
                return history[start + k : start + k + max_tokens]
    return []


@torch.inference_mode()
def speculative_stream(
    target: PreTrainedModel,
    draft: PreTrainedModel | None,
    input_ids: torch.LongTensor,
    *,
    gamma: int | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    policy: GammaPolicy | None = None,
    prefill_chunk: int = 0,
    proposer: str = "draft",
    ngram_max: int = 3,
    ngram_tokens: int = 3,
    _verify: VerifyFn = verify_sampled,
) -> Iterator[Step]:
    """Generate up to ``max_new_tokens`` tokens of ``target`` after ``input_ids`` (shape (1, n)), drafting with
    ``draft``, losslessly, yielding each step's tokens as soon as the target has verified them.

    ``temperature`` 0 = greedy; otherwise sampling from softmax(logits / T) within the top-p nucleus, with all
    randomness from ``generator``. Generation stops after the first token in ``eos_token_id`` (included;
    ``None`` = never stop early) or at ``max_new_tokens``; the last step proposes fewer than ``gamma`` tokens
    when fewer are needed, so nothing is computed past the budget. ``_verify`` swaps the sampling rule (tests).
    Closing the stream early (a client that went away) stops the generation: no further forward runs.

    The draft length per step: a constant ``gamma`` (default 3), or a ``policy`` (``specdec.policy``: a
    confidence stop, transformers' heuristic schedule, or a cost model that may choose 0, a plain target step)
    whose state carries over when the same object is passed again; give one of the two, not both.

    ``prefill_chunk`` > 0: a prompt longer than that is prefilled (target, then draft) that many tokens per
    forward, with an empty ``Step`` yielded after each chunk but the last (a server interleaves other streams).

    ``proposer``: ``draft`` (the draft's chain), ``ngram`` (no draft model: when a suffix of the context, up to
    ``ngram_max`` tokens, occurred before in it, the ``ngram_tokens`` that followed are proposed, else a plain target
    step) or ``draft+ngram`` (the n-gram proposal when there is one, else the draft's chain). An n-gram proposal is a
    draft whose q is one-hot: sampling accepts it with probability p(x) and resamples from norm(max(0, p − q)), so
    both modes stay lossless.
    """
    prompt = _check_inputs(input_ids, max_new_tokens, temperature, top_p)
    if proposer not in PROPOSERS:
        raise ValueError(f"proposer must be one of {', '.join(PROPOSERS)}, got {proposer!r}")
    if policy is not None and gamma is not None:
        raise TypeError("give gamma or policy, not both: a policy chooses the draft length of every step")
    policy = policy if policy is not None else GammaPolicy(3 if gamma is None else gamma)
    use_draft = proposer != "ngram"
    if use_draft:
        check_compatible(target, draft)
    eos, greedy = _eos_set(eos_token_id), temperature == 0.0
    t_run, d_run = CachedRunner(target), CachedRunner(draft) if use_draft else None
    stats = DecodeStats()
    clock = _Clock()

    # prefill everything but the last prompt token: it opens the first verify forward
    yield from _prefill(t_run, prompt[:-1], prefill_chunk, stats, clock)
    # pending: tokens the draft cache has not seen yet; the draft prefills when (if ever) it first drafts, unless
    # the prompt is long enough to be prefilled in chunks
    last, pending = prompt[-1], list(prompt)
    if use_draft and 0 < prefill_chunk < len(prompt) - 1:
        yield from _prefill(d_run, prompt[:-1], prefill_chunk, stats, clock)
        pending = [last]

    confident = policy.needs_confidence
    history = list(prompt)  # the context n-grams are looked up in: prompt + emitted tokens
    while stats.new_tokens < max_new_tokens:
        budget = max_new_tokens - stats.new_tokens - 1
        drafted = ngram_proposal(history, ngram_max, min(ngram_tokens, budget)) if proposer != "draft" else []
        from_ngram = bool(drafted)
        g_max = 0 if from_ngram or not use_draft else min(policy.gamma(len(pending)), budget)
        q_rows: list[torch.Tensor] = []
        feed = pending
        for i in range(g_max):
            logits = d_run(feed)[-1]
            if greedy:
                tok = int(logits.argmax())
                conf = float(torch.softmax(logits.float(), dim=-1)[tok]) if confident else 1.0
            else:
                q = probs_from_logits(logits, temperature, top_p)
                tok = sample(q, generator)
                q_rows.append(q)
                conf = float(q[tok])
            drafted.append(tok)
            feed = [tok]
            if confident and i < g_max - 1 and policy.stop(conf):  # the draft's own belief in its token
                break
        g = len(drafted)
        # Draft cache now holds seq + d_1..d_{g-1} (when g > 0).

        target_logits = t_run([last, *drafted], keep=g + 1)
        drafted_t = torch.tensor(drafted, dtype=torch.long, device=target_logits.device)
        if greedy:
            n, nxt = verify_greedy(target_logits, drafted_t)
        else:
            p = probs_from_logits(target_logits, temperature, top_p)
            if from_ngram:  # a proposal certain of its tokens: q one-hot
                q = torch.nn.functional.one_hot(drafted_t, p.shape[-1]).to(p.dtype)
            else:
                q = torch.stack(q_rows) if q_rows else p[:0]
            n, nxt = _verify(p, q, drafted_t, generator)

        # Roll back: the target cache must hold seq + d_1..d_n, the draft's the same minus its pending tail.
        t_run.crop(g - n)
        if not use_draft:
            pending = []
        elif g == 0 or from_ngram:  # the draft saw none of these tokens: it catches up when it next drafts
            pending = [*pending, *drafted[:n], nxt]
        elif n < g:
            d_run.crop(g - 1 - n)
            pending = [nxt]
        else:
            d_run.crop(0)
            pending = [drafted[-1], nxt]
        last = nxt

        if not from_ngram:  # the policy learns the draft's acceptance, not the context's
            policy.update(g, n)
        emitted, hit_eos = _truncate_at_eos([*drafted[:n], nxt], eos)
        n = min(n, len(emitted))  # draft tokens accepted after a stop token are cut, so they do not count
        history += emitted
        stats.ngram_steps += from_ngram
        stats.steps += 1
        stats.proposed += g
        stats.accepted += n
        stats.accepted_per_step.append(n)
        stats.proposed_per_step.append(g)
        stats.new_tokens += len(emitted)
        stats.target_forwards, stats.target_time_s = t_run.forwards, t_run.seconds
        if use_draft:
            stats.draft_forwards, stats.draft_time_s = d_run.forwards, d_run.seconds
        stats.wall_time_s = clock.pause()
        finished = hit_eos or stats.new_tokens >= max_new_tokens
        yield Step(emitted, g, n, finished, stats)
        if finished:
            return
        clock.resume()


def speculative_generate(
    target: PreTrainedModel, draft: PreTrainedModel, input_ids: torch.LongTensor, **kwargs
) -> DecodeResult:
    """``speculative_stream`` run to its end: a ``DecodeResult`` (new tokens only, and the counters)."""
    return collect(speculative_stream(target, draft, input_ids, **kwargs))


@torch.inference_mode()
def autoregressive_stream(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    prefill_chunk: int = 0,
) -> Iterator[Step]:
    """Target-only baseline: one token per forward with a KV cache, the same sampling code and stopping rules
    as ``speculative_stream``, one ``Step`` per token. ``stats.steps`` counts token-emitting forwards (the prefill
    emits the first). ``prefill_chunk``: as in ``speculative_stream``."""
    prompt = _check_inputs(input_ids, max_new_tokens, temperature, top_p)
    eos, greedy = _eos_set(eos_token_id), temperature == 0.0
    run = CachedRunner(model, rollback=False)
    stats = DecodeStats()
    clock = _Clock()
    feed = prompt
    if 0 < prefill_chunk < len(prompt) - 1:
        yield from _prefill(run, prompt[:-1], prefill_chunk, stats, clock)
        feed = prompt[-1:]
    while stats.new_tokens < max_new_tokens:
        logits = run(feed)[-1]
        tok = int(logits.argmax()) if greedy else sample(probs_from_logits(logits, temperature, top_p), generator)
        feed = [tok]
        stats.steps = stats.new_tokens = stats.new_tokens + 1
        stats.target_forwards, stats.target_time_s = run.forwards, run.seconds
        stats.wall_time_s = clock.pause()
        finished = tok in eos or stats.new_tokens >= max_new_tokens
        yield Step([tok], 0, 0, finished, stats)
        if finished:
            return
        clock.resume()


def autoregressive_generate(model: PreTrainedModel, input_ids: torch.LongTensor, **kwargs) -> DecodeResult:
    """``autoregressive_stream`` run to its end."""
    return collect(autoregressive_stream(model, input_ids, **kwargs))


@torch.inference_mode()
def first_divergence(
    model: PreTrainedModel, input_ids: torch.LongTensor, reference: list[int], candidate: list[int]
) -> tuple[int, float] | None:
    """Where two greedy continuations of ``input_ids`` first differ, and the target's top-2 logit gap there.

    Returns ``None`` when one is a prefix of the other, else ``(position, gap)`` where ``gap`` is
    top1 - top2 of ``model``'s logits after the common prefix (one full forward, no cache). A divergence is
    a floating-point near-tie, not a bug, only when ``gap`` is tiny (tests use ``NEAR_TIE_LOGIT_GAP``).
    """
    pos = next((i for i, (a, b) in enumerate(zip(reference, candidate, strict=False)) if a != b), None)
    if pos is None:
        return None
    device = next(model.parameters()).device
    prefix = torch.tensor(reference[:pos], dtype=torch.long, device=device)
    ids = torch.cat([input_ids[0].to(device), prefix]).view(1, -1)
    top2 = model(input_ids=ids).logits[0, -1].float().topk(2).values
    return pos, float(top2[0] - top2[1])
