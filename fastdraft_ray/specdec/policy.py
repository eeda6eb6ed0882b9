"""How many tokens the draft proposes per speculative step (gamma): constant or adaptive.

Every policy keeps speculative decoding lossless: the choice of gamma at a step depends only on what happened
in earlier steps (and, for the confidence stop, on the draft's own distribution), never on the target's
verdict for the tokens being proposed, so the verification rule stays exact step by step.

- ``constant``: gamma every step (the paper protocol, the default).
- ``confidence``: draft up to gamma tokens but stop as soon as the draft's top probability falls below a
  threshold (as transformers' ``assistant_confidence_threshold``).
- ``heuristic``: transformers' ``num_assistant_tokens_schedule="heuristic"``: +2 after a step where every
  proposal was accepted, -1 (not below 1) otherwise.
- ``cost``: a cost model. Given c = draft step / target step and the target's verify-cost curve v(k) (both
  measured: ``stats.measure_verify_cost``), and a running estimate of the per-token acceptance probability
  alpha, choose gamma in 0..max_gamma maximising ``stats.expected_speedup`` = tau(alpha, gamma) /
  (gamma * c + v(gamma + 1)). gamma = 0 means plain target decoding for that step (the engine then runs no
  draft forward at all). While speculation is off the policy still probes with gamma = 1 to notice a draft that
  starts agreeing, paid from a budget: every plain step earns ``margin`` (default 3%) of a target step, and a
  probe is made only when the budget covers its whole excess cost, c + (pending - 1) * catchup + v(2) - 1 (the
  draft catching up on the ``pending`` tokens it has not seen, the whole prompt included if it never ran, in ONE
  forward, and the 2-token verify instead of a 1-token step). So, in the cost model, probes never cost more than
  ``margin`` over plain decoding; when a catch-up token alone costs more than ``margin``, the policy never probes.
  The prior on alpha: unknown (``prior_alpha=None``), it is optimistic (alpha 0.8 worth 2 observations): a
  useless draft is switched off after a step or two, while a pessimistic prior would leave a good draft off
  until probes found it; those warm-up steps are NOT covered by ``margin``. Known (e.g. the per-token
  acceptance an earlier evaluation measured, ``DecodeStats.per_token_alpha``), it is worth
  ``KNOWN_PRIOR_WEIGHT`` observations, so a draft known to be useless starts off on step 1 and a lucky probe
  does not switch it on: then the whole generation stays within ``margin`` of the target alone.

alpha is estimated as decayed counts of the Bernoulli outcomes the verifier observed: every accepted token is a
success, a step that stopped on a rejection adds one failure (tokens after the first rejection are never
judged). That is the maximum-likelihood estimate of the i.i.d. acceptance probability that ideal tau assumes,
which differs from the acceptance rate α = accepted / proposed (a full-accept step contributes no failure).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from fastdraft_ray.specdec import stats as S

POLICIES = ("constant", "confidence", "heuristic", "cost")
OPTIMISTIC_PRIOR = (0.8, 2.0)  # (alpha, observations it is worth) when the draft's acceptance is unknown
KNOWN_PRIOR_WEIGHT = 20.0  # observations a known alpha (measured beforehand on many tokens) is worth


@dataclass(frozen=True)
class CostModel:
    """Measured costs, relative to one target decode step: ``c`` = draft step / target step, ``verify`` with
    ``verify[k - 1]`` = cost of scoring k tokens in one target forward (``verify[0] == 1``), and ``catchup`` =
    cost of each token beyond the first in one draft forward (the draft catching up on tokens it skipped while
    speculation was off: ``stats.measure_catchup``; 0 = free, only for tests and memory-bound pictures).

    The curve is made non-decreasing and >= 1 (a cumulative maximum): scoring more tokens never costs less,
    and timing noise on a shared machine that says otherwise would make the policy draft on a useless draft.
    """

    c: float
    verify: tuple[float, ...]
    catchup: float = 0.0

    def __post_init__(self):
        if not self.c >= 0 or not self.catchup >= 0:
            raise ValueError(f"c and catchup must be >= 0, got {self.c}, {self.catchup}")
        if len(self.verify) < 2 or any(not v > 0 for v in self.verify):
            raise ValueError(f"verify must give positive costs for k = 1..K >= 2 tokens, got {self.verify}")
        object.__setattr__(self, "verify", tuple(itertools.accumulate((max(v, 1.0) for v in self.verify), max)))

    @property
    def max_gamma(self) -> int:
        """The largest gamma the curve can price (gamma + 1 tokens are scored)."""
        return len(self.verify) - 1


class GammaPolicy:
    """Constant gamma; the base of the adaptive policies. The engine calls, per step: ``gamma()`` (tokens to
    draft at most, 0 = no drafting), ``stop(confidence)`` after each drafted token when ``needs_confidence``,
    and ``update(proposed, accepted)`` after verification."""

    name = "constant"
    needs_confidence = False  # the engine computes the draft's top probability only when asked

    def __init__(self, gamma: int = 3):
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1 draft token per step, got {gamma}")
        self.start = gamma

    def gamma(self, pending: int = 1) -> int:
        """Most tokens to draft in the next step; ``pending`` = tokens the draft has not seen yet (it feeds them
        in its first forward of the step)."""
        return self.start

    def stop(self, confidence: float) -> bool:
        """Stop drafting after a token whose draft probability of the top token is ``confidence``."""
        return False

    def update(self, proposed: int, accepted: int) -> None:
        """Record a verified step (``proposed`` draft tokens, the first ``accepted`` of them accepted)."""

    def reset(self) -> GammaPolicy:
        """A fresh copy for a new generation (policies carry state across steps, not across prompts)."""
        return type(self)(self.start)


class ConfidencePolicy(GammaPolicy):
    """Draft up to ``gamma`` tokens, stopping early when the draft's top probability < ``threshold``."""

    name = "confidence"
    needs_confidence = True

    def __init__(self, gamma: int = 3, threshold: float = 0.4):
        super().__init__(gamma)
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"confidence threshold must be in [0, 1), got {threshold}")
        self.threshold = threshold

    def stop(self, confidence: float) -> bool:
        return confidence < self.threshold

    def reset(self) -> ConfidencePolicy:
        return ConfidencePolicy(self.start, self.threshold)


class HeuristicPolicy(GammaPolicy):
    """transformers' heuristic schedule: +2 after a full accept, -1 (min 1) otherwise, capped at ``max_gamma``."""

    name = "heuristic"

    def __init__(self, gamma: int = 3, max_gamma: int = 8):
        super().__init__(gamma)
        if max_gamma < gamma:
            raise ValueError(f"max_gamma ({max_gamma}) must be >= the initial gamma ({gamma})")
        self.max_gamma, self.current = max_gamma, gamma

    def gamma(self, pending: int = 1) -> int:
        return self.current

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.current = min(self.current + 2, self.max_gamma) if accepted == proposed else max(1, self.current - 1)

    def reset(self) -> HeuristicPolicy:
        return HeuristicPolicy(self.start, self.max_gamma)


class CostPolicy(GammaPolicy):
    """Per step, the gamma in 0..max_gamma maximising expected speedup under the measured ``cost`` model and the
    running alpha estimate (see the module docstring); gamma 0 turns speculation off, with budgeted probes.

    ``prior_alpha``: the draft's known per-token acceptance, or ``None`` (unknown: ``OPTIMISTIC_PRIOR``);
    ``prior_weight``: observations the prior is worth (default 2 unknown, ``KNOWN_PRIOR_WEIGHT`` known)."""

    name = "cost"

    def __init__(
        self,
        cost: CostModel,
        max_gamma: int = 8,
        prior_alpha: float | None = None,
        prior_weight: float | None = None,
        decay: float = 0.95,
        margin: float = 0.03,
    ):
        super().__init__(1)
        alpha0 = OPTIMISTIC_PRIOR[0] if prior_alpha is None else prior_alpha
        weight0 = prior_weight
        if weight0 is None:
            weight0 = OPTIMISTIC_PRIOR[1] if prior_alpha is None else KNOWN_PRIOR_WEIGHT
        if not 0.0 <= alpha0 <= 1.0 or weight0 <= 0 or not 0.0 < decay <= 1.0 or not margin > 0:
            raise ValueError(
                f"need prior_alpha in [0, 1], prior_weight > 0, decay in (0, 1], margin > 0; got {prior_alpha}, "
                f"{prior_weight}, {decay}, {margin}"
            )
        self.cost, self.margin, self.decay = cost, margin, decay
        self.max_gamma = min(max_gamma, cost.max_gamma)
        if self.max_gamma < 1:
            raise ValueError(f"max_gamma must be >= 1, got {max_gamma}")
        self.prior = (prior_alpha, prior_weight)
        self.successes, self.failures = alpha0 * weight0, (1.0 - alpha0) * weight0
        self.budget = 0.0  # probe budget, in target steps: + margin per plain step, - the cost of each probe
        self.plain_steps, self.probe_cost_spent = 0, 0.0
        self.chosen: list[int] = []  # gamma per step, for inspection (tests, reports)

    @property
    def alpha(self) -> float:
        """Current estimate of the per-token acceptance probability."""
        return self.successes / (self.successes + self.failures)

    def probe_cost(self, pending: int) -> float:
        """Excess over one plain step, in target steps, of a gamma = 1 probe whose draft forward feeds ``pending``
        tokens: c + (pending - 1) * catchup + v(2) - 1."""
        cost = self.cost
        return max(cost.c + (pending - 1) * cost.catchup + S.verify_at(cost.verify, 2) - 1.0, 0.0)

    @property
    def probe_interval(self) -> float:
        """Plain steps between probes in the steady state (each probe rejected, so the draft then lags one more
        token per plain step); ``math.inf`` when a catch-up token alone costs more than ``margin``."""
        if self.cost.catchup >= self.margin:
            return math.inf
        return float(max(1, math.ceil((self.probe_cost(1) - 1e-12) / (self.margin - self.cost.catchup))))

    def gamma(self, pending: int = 1) -> int:
        g, _ = S.best_gamma(self.alpha, self.cost.c, self.max_gamma, self.cost.verify)
        if g == 0:
            probe = self.probe_cost(pending)
            if self.budget >= probe:
                self.budget -= probe
                self.probe_cost_spent += probe
                g = 1
            else:
                self.budget += self.margin
                self.plain_steps += 1
        self.chosen.append(g)
        return g

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.successes = self.decay * self.successes + accepted
        self.failures = self.decay * self.failures + (1.0 if accepted < proposed else 0.0)

    def reset(self) -> CostPolicy:
        prior_alpha, prior_weight = self.prior
        return CostPolicy(self.cost, self.max_gamma, prior_alpha, prior_weight, self.decay, self.margin)


def make_policy(
    name: str,
    gamma: int = 3,
    *,
    confidence_threshold: float = 0.4,
    max_gamma: int = 8,
    cost: CostModel | None = None,
    prior_alpha: float | None = None,
) -> GammaPolicy:
    """The policy ``name`` (one of ``POLICIES``); ``cost`` is required by ``cost``, ``prior_alpha`` is its known
    per-token acceptance (``None`` = unknown: the optimistic prior)."""
    if name == "constant":
        return GammaPolicy(gamma)
    if name == "confidence":
        return ConfidencePolicy(gamma, confidence_threshold)
    if name == "heuristic":
        return HeuristicPolicy(gamma, max(max_gamma, gamma))
    if name == "cost":
        if cost is None:
            raise ValueError("the cost policy needs a CostModel (measured c and verify-cost curve)")
        return CostPolicy(cost, max_gamma, prior_alpha=prior_alpha)
    raise ValueError(f"unknown gamma policy {name!r}: choose from {', '.join(POLICIES)}")
