"""Evaluation harness: speculative decoding of the target with each draft over the four task families.

For every prompt and decoding mode a worker runs the target alone (the baseline) and then each draft's
speculative decoding, back to back on the same process and threads, so wall-clock ratios compare like with
like. Per (draft, mode, task) it reports, with the definitions of DESIGN.md:

- ``acceptance_rate`` alpha and ``block_efficiency`` tau (pooled counters over the task's prompts),
- ``mbsu`` = tau / (gamma * c + 1), c = draft parameter bytes / target parameter bytes,
- ``hw_speedup``: the same formula with c = measured draft step / target step latency
  (``hw_speedup_verify`` also charges the measured (gamma+1)-token verify forward instead of one step),
- ``speedup``: wall-clock, target-only time / speculative time for the same prompts. Generations stop at EOS,
  so lengths can differ when sampling; both sides are therefore compared per emitted token
  (time per token of the baseline / time per token of speculative decoding), which equals the plain time
  ratio whenever the lengths match (always under greedy).

Target and drafts run at ``evaluate.precision`` (fp32 | bf16 | fp16 | int8, ``specdec.precision``): the
baseline is the target alone AT THE SAME PRECISION. ``evaluate.gamma_policy`` picks the draft length per step
(``specdec.policy``); each worker measures c, the draft's catch-up cost and the target's verify-cost curve
first, which the ``cost`` policy uses, with ``evaluate.prior_alpha`` as the drafts' known per-token acceptance
(the ``alpha_per_token`` an earlier evaluation reports; < 0 = unknown); a fresh policy is built per generation,
so prompts stay independent. Adaptive policies vary gamma, so MBSU and the hardware-aware speedups use the mean
gamma per step (``mean_gamma``) there.

``num_workers == 1`` runs in this process (CPU); more, or ``use_gpu``, spreads the prompts round-robin over Ray actors that each load
the models once. Every prompt's sampling generator is seeded from ``(seed, prompt id)`` alone, so alpha, tau
and the tokens do not depend on the worker count (only timings do).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastdraft_ray.config import EvaluateConfig, ModelConfig
from fastdraft_ray.evaluate.tasks import EvalPrompt, load_tasks
from fastdraft_ray.models.draft import check_compatible, count_params, load_draft, param_bytes
from fastdraft_ray.models.target import load_target, load_target_config, load_tokenizer
from fastdraft_ray.specdec import stats as S
from fastdraft_ray.specdec.decode import autoregressive_generate, speculative_generate
from fastdraft_ray.specdec.policy import POLICIES, CostModel, make_policy
from fastdraft_ray.specdec.precision import PrecisionError, prepare_for_inference, resolve_precision

log = logging.getLogger(__name__)

MODES = ("sampling", "greedy")
ALL = "all"  # pseudo-task pooling every prompt
TABLE_METRICS = ("acceptance_rate", "block_efficiency", "mbsu", "speedup")


class EvaluationError(ValueError):
    """The evaluation cannot run as configured; the message says what to change."""


@dataclass
class DraftInfo:
    """A draft under evaluation: where it lives, its size, c, and latencies measured on the workers."""

    name: str
    path: str
    params: int = 0
    param_bytes: int = 0
    c_params: float = 0.0
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

    def metrics(self, draft: str | None = None, mode: str = "sampling") -> dict[str, float]:
        """Flat ``eval/<task>/<metric>`` dict for one draft (default: the first) and mode."""
        draft = draft or self.drafts[0].name
        out = {}
        for row in self.rows:
            if row["draft"] == draft and row["mode"] == mode:
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


# ---------------------------------------------------------------------------------------------------- worker


def _prompt_seed(seed: int, prompt_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{prompt_id}".encode()).digest()[:8], "big") >> 1


class Evaluator:
    """Holds the target and every draft (loaded once) and evaluates prompts; also the Ray actor body."""

    def __init__(self, target: ModelConfig, drafts: dict[str, str], settings: dict, threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = "cuda" if settings.get("use_gpu") and torch.cuda.is_available() else "cpu"
        self.target, self.tokenizer = load_target(
            target.target, dtype=target.dtype, device=self.device, trust_remote_code=target.trust_remote_code
        )
        self.target = prepare_for_inference(self.target, settings.get("precision", "fp32"), inplace=True)
        self.drafts = {
            name: prepare_for_inference(
                load_draft(path).to(self.device), settings.get("draft_precision", "fp32"), inplace=True
            )
            for name, path in drafts.items()
        }
        self.s = settings
        self._latencies: dict | None = None
        gen_eos = getattr(self.target.generation_config, "eos_token_id", None)
        self.eos = (
            (gen_eos if gen_eos is not None else self.tokenizer.eos_token_id) if settings["stop_at_eos"] else None
        )

    def _ids(self, prompt: EvalPrompt) -> torch.Tensor:
        return torch.tensor([prompt.input_ids], dtype=torch.long, device=self.device)

    def latencies(self, prompt: EvalPrompt) -> dict[str, dict]:
        """Median step latencies and the target's verify-cost curve on ``prompt``'s context, and warm every
        model up (first calls are slow)."""
        ids, gamma = self._ids(prompt), self.s["gamma"]
        policy = self.s.get("gamma_policy", "constant")
        max_k = max(gamma, self.s.get("max_gamma", gamma) if policy in ("cost", "heuristic") else gamma) + 1
        for draft in self.drafts.values():
            speculative_generate(self.target, draft, ids, gamma=gamma, max_new_tokens=gamma + 2)
        curve, target_step = S.measure_verify_cost(self.target, ids, max_k)
        out = {}
        for name, draft in self.drafts.items():
            draft_step, catchup = S.measure_catchup(draft, ids)
            out[name] = {
                "draft_step_s": draft_step,
                "draft_catchup_s": catchup,  # each further token in one draft forward (cost policy probes)
                "target_step_s": target_step,
                "verify_step_s": curve[gamma] * target_step,
                "verify_cost": list(curve),
            }
        return out

    def _policy(self, name: str):
        """A fresh gamma policy for one generation with draft ``name`` (cost: from this worker's latencies)."""
        s, cost = self.s, None
        if s.get("gamma_policy", "constant") == "cost":
            lat = self._latencies[name]
            target_step = lat["target_step_s"]
            cost = CostModel(
                lat["draft_step_s"] / target_step, tuple(lat["verify_cost"]), lat["draft_catchup_s"] / target_step
            )
        prior = s.get("prior_alpha", -1.0)
        return make_policy(
            s.get("gamma_policy", "constant"),
            s["gamma"],
            confidence_threshold=s.get("confidence_threshold", 0.4),
            max_gamma=s.get("max_gamma", 8),
            cost=cost,
            prior_alpha=prior if prior >= 0 else None,
        )

    def run(self, prompts: list[EvalPrompt]) -> tuple[list[dict], dict]:
        """Records for every (prompt, mode, draft), and the latencies measured on this worker (once, on the
        first prompt it sees)."""
        if not prompts:
            return [], self._latencies or {}
        if self._latencies is None:
            self._latencies = self.latencies(prompts[0])
        return [r for prompt in prompts for r in self._records(prompt)], self._latencies

    def measured_latencies(self) -> dict:
        """What ``run`` measured on this worker ({} before any prompt)."""
        return self._latencies or {}

    def _records(self, prompt: EvalPrompt) -> list[dict]:
        records = []
        ids = self._ids(prompt)
        for mode in self.s["modes"]:
            kw = {
                "max_new_tokens": self.s["max_new_tokens"],
                "eos_token_id": self.eos,
                "temperature": self.s["temperature"] if mode == "sampling" else 0.0,
                "top_p": self.s["top_p"],
            }
            seed = _prompt_seed(self.s["seed"], prompt.id)
            base = autoregressive_generate(self.target, ids, generator=self._gen(seed), **kw)
            for name, draft in self.drafts.items():
                spec = speculative_generate(
                    self.target, draft, ids, policy=self._policy(name), generator=self._gen(seed), **kw
                )
                st = spec.stats
                records.append(
                    {
                        "task": prompt.task,
                        "prompt_id": prompt.id,
                        "prompt_tokens": len(prompt.input_ids),
                        "draft": name,
                        "mode": mode,
                        "proposed": st.proposed,
                        "accepted": st.accepted,
                        "steps": st.steps,
                        "new_tokens": st.new_tokens,
                        "wall_time_s": st.wall_time_s,
                        "draft_time_s": st.draft_time_s,
                        "target_time_s": st.target_time_s,
                        "draft_forwards": st.draft_forwards,
                        "target_forwards": st.target_forwards,
                        "plain_steps": st.proposed_per_step.count(0),
                        "rejected_steps": st.rejected_steps,
                        "base_new_tokens": base.stats.new_tokens,
                        "base_wall_time_s": base.stats.wall_time_s,
                        "matches_target": spec.tokens == base.tokens if mode == "greedy" else None,
                        "tokens": spec.tokens,
                    }
                )
        return records

    def _gen(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


# ------------------------------------------------------------------------------------------------ aggregation


def aggregate(
    records: list[dict], drafts: list[DraftInfo], gamma: int, tasks: list[str], gamma_policy: str = "constant"
) -> list[dict]:
    """Rows per (draft, mode, task) plus the pooled ``all`` task, with every metric of the module docstring.
    An adaptive ``gamma_policy`` prices the cost metrics at the mean gamma per step instead of ``gamma``."""
    rows = []
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    for info in drafts:
        for mode in modes:
            for task in [*tasks, ALL]:
                recs = [
                    r
                    for r in records
                    if r["draft"] == info.name and r["mode"] == mode and (task == ALL or r["task"] == task)
                ]
                if recs:
                    rows.append(_row(info, mode, task, recs, gamma, gamma_policy != "constant"))
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
    return {
        "draft": info.name,
        "mode": mode,
        "task": task,
        "prompts": len(recs),
        **tot,
        "acceptance_rate": alpha,
        "block_efficiency": tau,
        "ideal_block_efficiency": S.ideal_block_efficiency(alpha, gamma),
        "mbsu": S.mbsu(tau, g_cost, info.c_params),
        "mean_gamma": mean_gamma,
        "plain_steps": sum(r.get("plain_steps", 0) for r in recs),
        # per-token acceptance probability: what evaluate.prior_alpha gives the cost policy
        "alpha_per_token": S.per_token_alpha(tot["accepted"], sum(r.get("rejected_steps", 0) for r in recs)),
        "hw_speedup": hw,
        "hw_speedup_verify": hw_verify,
        "speedup": S.wallclock_speedup(base_per_token, spec_per_token) if spec_per_token > 0 else 0.0,
        "target_tokens_per_s": 1.0 / base_per_token if base_per_token else 0.0,
        "spec_tokens_per_s": 1.0 / spec_per_token if spec_per_token else 0.0,
        # greedy only: fraction of prompts whose output equals the target's own greedy output (lossless check)
        "matches_target": sum(bool(r["matches_target"]) for r in recs) / len(recs) if mode == "greedy" else None,
    }


# ---------------------------------------------------------------------------------------------------- driver


GENERIC_FOLDERS = {"export", "model", "hf", "final"}  # folder names that say nothing: show the parent


def _draft_names(paths: list[str]) -> dict[str, str]:
    """Short display names: the folder name, or its stage folder for ``<run>/<stage>/export``-style paths."""
    names: dict[str, str] = {}
    for path in paths:
        parts = Path(path).parts
        base = (
            (parts[-2] if len(parts) > 1 and parts[-1] in GENERIC_FOLDERS else parts[-1]) if parts else str(path)
        )
        name = base if base not in names else f"{base}#{len(names)}"
        names[name] = str(path)
    return names


def _check_drafts(model: ModelConfig, drafts: dict[str, str], tokenizer) -> None:
    """Fail early, on the driver, for a missing or vocabulary-incompatible draft (configs only, no weights)."""
    from transformers import AutoConfig, AutoTokenizer

    target_cfg = load_target_config(model.target, model.trust_remote_code)
    for name, path in drafts.items():
        if not (Path(path) / "config.json").exists():
            raise EvaluationError(f"draft {name!r}: {path} is not an HF model folder (no config.json)")
        draft_tok = (
            AutoTokenizer.from_pretrained(path) if (Path(path) / "tokenizer_config.json").exists() else None
        )
        check_compatible(target_cfg, AutoConfig.from_pretrained(path), tokenizer, draft_tok)


def _threads(cfg: EvaluateConfig) -> int:
    """Torch threads per worker. On a shared, oversubscribed CPU more threads than free cores is far slower
    (measured here: 2 threads 16x slower than 1 per SmolLM2 step under load), so set cpus_per_worker there."""
    return cfg.cpus_per_worker or max(1, (os.cpu_count() or 1) // cfg.num_workers)


def _run_workers(
    model: ModelConfig, drafts: dict[str, str], settings: dict, prompts: list[EvalPrompt], cfg: EvaluateConfig
) -> tuple[list[dict], list[dict]]:
    """Evaluate prompts one at a time, here (1 worker on CPU) or on ``num_workers`` Ray actors, with a progress
    bar; records come back in prompt order whatever the worker count."""
    from tqdm import tqdm

    bar = tqdm(total=len(prompts), desc="evaluate", unit="prompt")
    if cfg.num_workers == 1 and not cfg.use_gpu:
        previous = torch.get_num_threads()
        try:
            evaluator = Evaluator(model, drafts, settings, _threads(cfg))
            records = []
            for prompt in prompts:
                records += evaluator.run([prompt])[0]
                bar.update()
        finally:
            torch.set_num_threads(previous)  # this process keeps its own setting afterwards
            bar.close()
        return records, [evaluator.measured_latencies()]
    import ray
    from ray.util import ActorPool

    if not ray.is_initialized():
        raise EvaluationError("evaluate.num_workers > 1 needs Ray: call ray.init() first (jobs/evaluate.py does)")
    threads = _threads(cfg)
    actor_cls = ray.remote(num_cpus=threads, num_gpus=1 if cfg.use_gpu else 0)(Evaluator)
    actors = [
        actor_cls.remote(model, drafts, settings, threads) for _ in range(min(cfg.num_workers, len(prompts)))
    ]
    records = []
    try:
        for recs, _ in ActorPool(actors).map(lambda actor, prompt: actor.run.remote([prompt]), prompts):
            records += recs
            bar.update()
        latencies = [lat for lat in ray.get([a.measured_latencies.remote() for a in actors]) if lat]
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    return records, latencies


def evaluate(
    model: ModelConfig,
    draft_paths: list[str],
    cfg: EvaluateConfig,
    prompts: dict[str, list[EvalPrompt]] | None = None,
) -> EvalResults:
    """Evaluate each draft folder against ``model.target`` on the configured tasks and modes."""
    start = time.perf_counter()
    if not draft_paths:
        raise EvaluationError("no draft to evaluate: set evaluate.drafts=[path, ...]")
    modes = list(cfg.modes)
    if not modes or any(m not in MODES for m in modes):
        raise EvaluationError(f"evaluate.modes={modes!r}: choose from {', '.join(MODES)}")
    if "sampling" in modes and cfg.temperature <= 0:
        raise EvaluationError("sampling mode needs evaluate.temperature > 0 (greedy is its own mode)")
    if cfg.num_workers < 1 or cfg.gamma < 1 or cfg.max_new_tokens < 1 or cfg.max_gamma < 1:
        raise EvaluationError("evaluate.num_workers, gamma, max_gamma and max_new_tokens must all be >= 1")
    if cfg.gamma_policy not in POLICIES:
        raise EvaluationError(f"evaluate.gamma_policy={cfg.gamma_policy!r}: choose from {', '.join(POLICIES)}")
    if cfg.prior_alpha > 1.0:
        raise EvaluationError(f"evaluate.prior_alpha must be in [0, 1] (or < 0: unknown), got {cfg.prior_alpha}")
    if not 0.0 <= cfg.confidence_threshold < 1.0:
        raise EvaluationError(f"evaluate.confidence_threshold must be in [0, 1), got {cfg.confidence_threshold}")
    try:
        precision = resolve_precision(cfg.precision, model.dtype)
        draft_precision = resolve_precision(cfg.draft_precision or precision)
    except PrecisionError as exc:
        raise EvaluationError(f"evaluate.precision / draft_precision: {exc}") from None
    if cfg.use_gpu and "int8" in (precision, draft_precision):
        raise EvaluationError("int8 (dynamic quantisation) runs on CPU only: use precision=bf16 with use_gpu")
    tokenizer = load_tokenizer(model.target, model.trust_remote_code)
    drafts = _draft_names([str(p) for p in draft_paths])
    _check_drafts(model, drafts, tokenizer)
    if prompts is None:
        prompts = load_tasks(
            tokenizer, cfg.tasks, cfg.prompts_per_task, cfg.seed, cfg.source, cfg.max_article_tokens, cfg.code_chat
        )
    flat = [p for task_prompts in prompts.values() for p in task_prompts]
    settings = {
        "gamma": cfg.gamma,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "seed": cfg.seed,
        "modes": modes,
        "stop_at_eos": cfg.stop_at_eos,
        "use_gpu": cfg.use_gpu,
        "num_workers": cfg.num_workers,
        "source": cfg.source,
        "prompts_per_task": cfg.prompts_per_task,
        "precision": precision,
        "draft_precision": draft_precision,
        "gamma_policy": cfg.gamma_policy,
        "confidence_threshold": cfg.confidence_threshold,
        "max_gamma": cfg.max_gamma,
        "prior_alpha": cfg.prior_alpha,
    }
    log.info(
        "evaluating %d draft(s) on %d prompts x %d mode(s) with %d worker(s)",
        len(drafts),
        len(flat),
        len(modes),
        cfg.num_workers,
    )
    records, latencies = _run_workers(model, drafts, settings, flat, cfg)
    order = {p.id: i for i, p in enumerate(flat)}
    records.sort(key=lambda r: (order[r["prompt_id"]], modes.index(r["mode"]), list(drafts).index(r["draft"])))

    target_bytes = _target_param_bytes(model)
    infos = []
    for name, path in drafts.items():
        d_model = load_draft(path)
        info = DraftInfo(name, path, count_params(d_model).total, param_bytes(d_model), precision=draft_precision)
        info.c_params = info.param_bytes / target_bytes
        worker_lat = [lat[name] for lat in latencies if name in lat]
        for key in ("draft_step_s", "target_step_s", "verify_step_s"):
            setattr(info, key, sum(w[key] for w in worker_lat) / len(worker_lat) if worker_lat else 0.0)
        if worker_lat:  # mean curve over workers
            curves = [w["verify_cost"] for w in worker_lat]
            info.verify_cost = [sum(v) / len(curves) for v in zip(*curves, strict=True)]
        infos.append(info)
    tasks = list(prompts)
    return EvalResults(
        model.target,
        settings,
        infos,
        records,
        aggregate(records, infos, cfg.gamma, tasks, cfg.gamma_policy),
        tasks,
        time.perf_counter() - start,
    )


def _target_param_bytes(model: ModelConfig) -> int:
    """Parameter bytes of the target in its configured dtype, counted on the meta device (no weights)."""
    from fastdraft_ray.models.target import DTYPES

    n = count_params(load_target_config(model.target, model.trust_remote_code)).total
    return n * torch.tensor([], dtype=DTYPES[model.dtype]).element_size()
