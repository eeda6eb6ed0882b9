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
  (gamma * c + v(gamma + 1)). gamma = 0 means plain target decoding for that step. While speculation is off the
  policy still probes with gamma = 1 every ``probe_every`` steps to notice a draft that starts agreeing; the
  interval is derived so the probes cost at most ``margin`` (default 3%) over plain decoding. The prior is
optimistic (alpha 0.8 worth 2 observations): a useless draft is switched off after a step or two, while a
pessimistic prior would leave a good draft off until probes found it.

alpha is estimated as decayed counts of the Bernoulli outcomes the verifier observed: every accepted token is a
success, a step that stopped on a rejection adds one failure (tokens after the first rejection are never
judged). That is the maximum-likelihood estimate of the i.i.d. acceptance probability that ideal tau assumes,
which differs from DESIGN.md's acceptance rate accepted / proposed (a full-accept step contributes no failure).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from fastdraft_ray.specdec import stats as S

POLICIES = ("constant", "confidence", "heuristic", "cost")


@dataclass(frozen=True)
class CostModel:
    """Measured costs, relative to one target decode step: ``c`` = draft step / target step and ``verify``
    with ``verify[k - 1]`` = cost of scoring k tokens in one target forward (``verify[0] == 1``).

    The curve is made non-decreasing and >= 1 (a cumulative maximum): scoring more tokens never costs less,
    and timing noise on a shared machine that says otherwise would make the policy draft on a useless draft.
    """

    c: float
    verify: tuple[float, ...]

    def __post_init__(self):
        if not self.c >= 0:
            raise ValueError(f"c must be >= 0, got {self.c}")
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

    def gamma(self) -> int:
        """Most tokens to draft in the next step."""
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

    def gamma(self) -> int:
        return self.current

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.current = min(self.current + 2, self.max_gamma) if accepted == proposed else max(1, self.current - 1)

    def reset(self) -> HeuristicPolicy:
        return HeuristicPolicy(self.start, self.max_gamma)


class CostPolicy(GammaPolicy):
    """Per step, the gamma in 0..max_gamma maximising expected speedup under the measured ``cost`` model and the
    running alpha estimate (see the module docstring); gamma 0 turns speculation off, with cheap probes."""

    name = "cost"

    def __init__(
        self,
        cost: CostModel,
        max_gamma: int = 8,
        prior_alpha: float = 0.8,
        prior_weight: float = 2.0,
        decay: float = 0.95,
        margin: float = 0.03,
    ):
        super().__init__(1)
        if not 0.0 <= prior_alpha <= 1.0 or prior_weight <= 0 or not 0.0 < decay <= 1.0 or not margin > 0:
            raise ValueError(
                f"need prior_alpha in [0, 1], prior_weight > 0, decay in (0, 1], margin > 0; got {prior_alpha}, "
                f"{prior_weight}, {decay}, {margin}"
            )
        self.cost, self.margin = cost, margin
        self.max_gamma = min(max_gamma, cost.max_gamma)
        if self.max_gamma < 1:
            raise ValueError(f"max_gamma must be >= 1, got {max_gamma}")
        self.prior = (prior_alpha, prior_weight, decay)
        self.successes, self.failures = prior_alpha * prior_weight, (1.0 - prior_alpha) * prior_weight
        self.decay = decay
        # A gamma=1 probe emits >= 1 token like a plain step but costs c + v(2), plus the draft catching up on
        # the tokens it skipped (one prefill forward, allowed one more draft step): charge the excess to `margin`.
        probe_excess = max(2 * cost.c + S.verify_at(cost.verify, 2) - 1.0, 0.0)
        self.probe_every = max(1, math.ceil(probe_excess / margin))
        self.off_steps = 0
        self.chosen: list[int] = []  # gamma per step, for inspection (tests, reports)

    @property
    def alpha(self) -> float:
        """Current estimate of the per-token acceptance probability."""
        return self.successes / (self.successes + self.failures)

    def gamma(self) -> int:
        g, _ = S.best_gamma(self.alpha, self.cost.c, self.max_gamma, self.cost.verify)
        if g == 0:
            self.off_steps += 1
            if self.off_steps >= self.probe_every:
                self.off_steps, g = 0, 1
        else:
            self.off_steps = 0
        self.chosen.append(g)
        return g

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.successes = self.decay * self.successes + accepted
        self.failures = self.decay * self.failures + (1.0 if accepted < proposed else 0.0)

    def reset(self) -> CostPolicy:
        prior_alpha, prior_weight, decay = self.prior
        return CostPolicy(self.cost, self.max_gamma, prior_alpha, prior_weight, decay, self.margin)


def make_policy(
    name: str,
    gamma: int = 3,
    *,
    confidence_threshold: float = 0.4,
    max_gamma: int = 8,
    cost: CostModel | None = None,
    prior_alpha: float = 0.8,
) -> GammaPolicy:
    """The policy ``name`` (one of ``POLICIES``); ``cost`` is required by ``cost``."""
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
