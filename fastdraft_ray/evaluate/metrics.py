"""What an evaluation produces and how it is aggregated: per-prompt records -> rows per (draft, mode, task).

Per (draft, mode, task), with the definitions of docs/definitions.md:

- ``acceptance_rate`` alpha and ``block_efficiency`` tau (pooled counters over the task's prompts),
- ``ideal_block_efficiency``: the tau i.i.d. acceptance at the measured per-token alpha (``alpha_per_token``) would
  give at the gammas the steps actually used (their mean of (1 - alpha^(g+1)) / (1 - alpha)),
- ``mbsu`` = tau / (gamma * c + 1), c = the bytes a draft decode step reads / the bytes a target decode step reads,
  each at its decoding precision (``stats.decode_step_bytes``: one row of the input embedding, not all of it),
- ``hw_speedup``: the same formula with c = measured draft step / target step latency
  (``hw_speedup_verify`` also charges the measured (gamma+1)-token verify forward instead of one step),
- ``speedup``: wall-clock, target-only time / speculative time for the same prompts. Generations stop at the
  stop tokens, so lengths can differ when sampling; both sides are therefore compared per emitted token
  (time per token of the baseline / time per token of speculative decoding), which equals the plain time
  ratio whenever the lengths match (always under greedy).

Adaptive gamma policies vary gamma, so MBSU and the hardware-aware speedups use the mean gamma per step
(``mean_gamma``) there. ``gamma`` is the row's configured gamma (a draft can be run at several); ``selected`` marks
the rows at the gamma chosen for that draft and mode on calibration prompts (``evaluate.gamma_select``).
``speedup_lo`` / ``speedup_hi``: a 90% bootstrap interval of ``speedup`` over the row's ``prompts`` (prompts
resampled with replacement, ``BOOTSTRAP_SAMPLES`` times, fixed seed); None below ``MIN_INTERVAL_PROMPTS`` prompts
(2 prompts have at most 3 distinct resamples). ``interval_text`` prints it with its n.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from fastdraft_ray.config import MODES
from fastdraft_ray.specdec import stats as S

ALL = "all"  # pseudo-task pooling every prompt
TABLE_METRICS = ("acceptance_rate", "block_efficiency", "mbsu", "speedup")
BOOTSTRAP_SAMPLES = 2000
MIN_INTERVAL_PROMPTS = 4


def speedup_interval(recs: list[dict], level: float = 0.9, seed: int = 0) -> tuple[float | None, float | None]:
    """``(lo, hi)``: the central ``level`` bootstrap interval of the per-token wall-clock speedup over prompts;
    ``(None, None)`` for fewer than ``MIN_INTERVAL_PROMPTS`` prompts."""
    if len(recs) < MIN_INTERVAL_PROMPTS:
        return None, None
    base_t = np.array([r["base_wall_time_s"] for r in recs], float)
    base_n = np.array([r["base_new_tokens"] for r in recs], float)
    spec_t = np.array([r["wall_time_s"] for r in recs], float)
    spec_n = np.array([r["new_tokens"] for r in recs], float)
    idx = np.random.default_rng(seed).integers(0, len(recs), size=(BOOTSTRAP_SAMPLES, len(recs)))
    ratio = (base_t[idx].sum(1) / np.maximum(base_n[idx].sum(1), 1)) / np.maximum(
        spec_t[idx].sum(1) / np.maximum(spec_n[idx].sum(1), 1), 1e-12
    )
    lo, hi = np.quantile(ratio, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def interval_text(lo: float | None, hi: float | None, n: int) -> str:
    """``[lo, hi] (n=…)``, or why there is no interval."""
    if lo is None or hi is None:
        return f"— (n={n}: too few prompts for an interval)"
    return f"[{lo:.2f}, {hi:.2f}] (n={n})"


def ideal_tau(alpha: float, gamma_steps: dict, mean_gamma: float) -> float:
    """Expected tokens per step for i.i.d. acceptance ``alpha`` at the gammas the steps used (``gamma_steps``:
    {gamma: steps}); without them, at ``mean_gamma``."""
    steps = sum(gamma_steps.values())
    if not steps:
        return S.ideal_block_efficiency(alpha, mean_gamma)
    return sum(n * S.ideal_block_efficiency(alpha, int(g)) for g, n in gamma_steps.items()) / steps


@dataclass
class DraftInfo:
    """A draft under evaluation: where it lives, its size, c, and latencies measured on the workers."""

    name: str
    path: str
    params: int = 0
    param_bytes: int = 0  # stored size
    step_bytes: int = 0  # weights one decode step reads at the draft's precision (stats.decode_step_bytes)
    c_params: float = 0.0  # step_bytes / the target's: MBSU's c
    draft_step_s: float = 0.0
    target_step_s: float = 0.0
    verify_step_s: float = 0.0
    verify_cost: list[float] = field(default_factory=list)  # target: k tokens in one forward / one step, k=1..
    precision: str = ""  # the draft's deployment precision (the target's is settings["precision"])


@dataclass
class EvalResults:
    """Everything an evaluation produced: per-prompt records, aggregated rows, drafts and settings."""

    target: str
    settings: dict
    drafts: list[DraftInfo]
    records: list[dict]
    rows: list[dict] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    baselines: list[dict] = field(default_factory=list)  # aggregate_baselines rows (evaluate.baselines)

    def headline(self, row: dict) -> bool:
        """Whether ``row`` is its draft and mode's headline: the selected gamma's when one was selected
        (``settings["selected_gamma"]``), else the configured ``evaluate.gamma``'s."""
        chosen = self.settings.get("selected_gamma", {}).get(row["draft"], {}).get(row["mode"])
        return row.get("gamma", self.settings["gamma"]) == (self.settings["gamma"] if chosen is None else chosen)

    def row(self, draft: str, mode: str, task: str, gamma: int | None = None) -> dict | None:
        """The row of (draft, mode, task) at ``gamma`` (default: the headline row), or None."""
        for row in self.rows:
            if (row["draft"], row["mode"], row["task"]) == (draft, mode, task) and (
                row.get("gamma") == gamma if gamma is not None else self.headline(row)
            ):
                return row
        return None

    def metrics(self, draft: str | None = None, mode: str = "sampling") -> dict[str, float]:
        """Flat ``eval/<task>/<metric>`` dict for one draft (default: the first) and mode (headline rows)."""
        draft = draft or self.drafts[0].name
        out = {}
        for row in self.rows:
            if row["draft"] == draft and row["mode"] == mode and self.headline(row):
                for key in (*TABLE_METRICS, "hw_speedup"):
                    out[f"eval/{row['task']}/{key}"] = row[key]
        if not out:
            raise KeyError(f"no results for draft {draft!r} in mode {mode!r}")
        return out

    def to_dict(self) -> dict:
        """JSON-friendly form (``results.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EvalResults:
        """Read back ``results.json`` (e.g. to re-render a report)."""
        return cls(**{**data, "drafts": [DraftInfo(**d) for d in data["drafts"]]})


def aggregate(
    records: list[dict], drafts: list[DraftInfo], gamma: int, tasks: list[str], gamma_policy: str = "constant"
) -> list[dict]:
    """Rows per (draft, gamma, mode, task) plus the pooled ``all`` task, with every metric of the module docstring.
    Records without a ``gamma`` ran at ``gamma``. An adaptive ``gamma_policy`` prices the cost metrics at the mean
    gamma per step instead."""
    rows = []
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    for info in drafts:
        for g in sorted({r.get("gamma", gamma) for r in records if r["draft"] == info.name}):
            for mode in modes:
                for task in [*tasks, ALL]:
                    recs = [
                        r
                        for r in records
                        if r["draft"] == info.name
                        and r.get("gamma", gamma) == g
                        and r["mode"] == mode
                        and (task == ALL or r["task"] == task)
                    ]
                    if recs:
                        rows.append(_row(info, mode, task, recs, g, gamma_policy != "constant"))
    return rows


def _verify_s(info: DraftInfo, gamma: float) -> float:
    """Target time to verify ``gamma`` (possibly a fractional mean) draft tokens, from the measured curve."""
    curve = info.verify_cost
    if not curve:
        return info.verify_step_s
    k = min(gamma + 1.0, float(len(curve)))
    lo, frac = int(k), k - int(k)
    v = curve[lo - 1] + (curve[lo] - curve[lo - 1]) * frac if frac else curve[lo - 1]
    return v * info.target_step_s


def _row(info: DraftInfo, mode: str, task: str, recs: list[dict], gamma: int, adaptive: bool = False) -> dict:
    tot = {
        k: sum(r[k] for r in recs)
        for k in (
            "proposed",
            "accepted",
            "steps",
            "new_tokens",
            "wall_time_s",
            "base_new_tokens",
            "base_wall_time_s",
        )
    }
    alpha = S.acceptance_rate(tot["accepted"], tot["proposed"])
    tau = S.block_efficiency(tot["new_tokens"], tot["steps"])
    mean_gamma = tot["proposed"] / tot["steps"] if tot["steps"] else 0.0
    g_cost = mean_gamma if adaptive else gamma  # gamma the cost formulas charge
    base_per_token = tot["base_wall_time_s"] / max(tot["base_new_tokens"], 1)
    spec_per_token = tot["wall_time_s"] / max(tot["new_tokens"], 1)
    hw = S.hardware_speedup(tau, g_cost, info.draft_step_s, info.target_step_s) if info.target_step_s else 0.0
    hw_verify = (
        S.hardware_speedup(tau, g_cost, info.draft_step_s, info.target_step_s, _verify_s(info, g_cost))
        if info.target_step_s
        else 0.0
    )
    speedup_lo, speedup_hi = speedup_interval(recs) if spec_per_token > 0 else (None, None)
    alpha_token = S.per_token_alpha(tot["accepted"], sum(r.get("rejected_steps", 0) for r in recs))
    gamma_steps: dict = {}
    for r in recs:
        for g, n in r.get("gamma_steps", {}).items():
            gamma_steps[g] = gamma_steps.get(g, 0) + n
    return {
        "draft": info.name,
        "mode": mode,
        "task": task,
        "gamma": gamma,
        "selected": False,  # evaluate() flags the rows at the gamma chosen on calibration prompts
        "prompts": len(recs),
        **tot,
        "acceptance_rate": alpha,
        "block_efficiency": tau,
        "ideal_block_efficiency": ideal_tau(alpha_token, gamma_steps, mean_gamma),
        "mbsu": S.mbsu(tau, g_cost, info.c_params),
        "mean_gamma": mean_gamma,
        "plain_steps": sum(r.get("plain_steps", 0) for r in recs),
        # per-token acceptance probability: what evaluate.prior_alpha gives the cost policy
        "alpha_per_token": alpha_token,
        "hw_speedup": hw,
        "hw_speedup_verify": hw_verify,
        "speedup": S.wallclock_speedup(base_per_token, spec_per_token) if spec_per_token > 0 else 0.0,
        "speedup_lo": speedup_lo,
        "speedup_hi": speedup_hi,
        "target_tokens_per_s": 1.0 / base_per_token if base_per_token else 0.0,
        "spec_tokens_per_s": 1.0 / spec_per_token if spec_per_token else 0.0,
        # greedy only: fraction of prompts whose output equals the target's own greedy output (lossless check)
        "matches_target": sum(bool(r["matches_target"]) for r in recs) / len(recs) if mode == "greedy" else None,
    }


def aggregate_baselines(records: list[dict], tasks: list[str]) -> list[dict]:
    """Rows per (method, draft, task) plus ``all`` for the ``evaluate.baselines`` records (transformers' prompt
    lookup / assisted generation, greedy): wall-clock speedup over the target alone per emitted token with its
    90% bootstrap interval, tokens per target call, and the share of prompts whose output equals the target's."""
    rows = []
    for method, draft in dict.fromkeys((r["method"], r["draft"]) for r in records):
        for task in [*tasks, ALL]:
            recs = [
                r for r in records if (r["method"], r["draft"]) == (method, draft) and task in (ALL, r["task"])
            ]
            if not recs:
                continue
            base = sum(r["base_wall_time_s"] for r in recs) / max(1, sum(r["base_new_tokens"] for r in recs))
            spec = sum(r["wall_time_s"] for r in recs) / max(1, sum(r["new_tokens"] for r in recs))
            lo, hi = speedup_interval(recs)
            calls = sum(r["target_calls"] for r in recs)
            rows.append(
                {
                    "method": method,
                    "draft": draft,
                    "task": task,
                    "gamma": recs[0]["gamma"],
                    "prompts": len(recs),
                    "speedup": S.wallclock_speedup(base, spec) if spec > 0 else 0.0,
                    "speedup_lo": lo,
                    "speedup_hi": hi,
                    "target_calls": calls,
                    "tokens_per_call": sum(r["new_tokens"] for r in recs) / max(1, calls),
                    "matches_target": sum(r["matches_target"] for r in recs) / len(recs),
                }
            )
    return rows
