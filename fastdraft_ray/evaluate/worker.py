"""One evaluation worker (in-process, or the body of a Ray actor): the target and every draft loaded once, as
``SpecDecoder``s sharing one target, and the per-prompt records of the module ``evaluate.run`` describes.

For every prompt and decoding mode it runs the target alone (the baseline) and each draft's speculative decoding
back to back on the same process and threads, so wall-clock ratios compare like with like; which side runs first
alternates from prompt to prompt (``base_first`` in the record), so a drifting machine favours neither. Costs
(c, the draft's catch-up, the target's verify-cost curve) are measured once, on the first prompt it sees; the
``cost`` policy uses them. Every prompt's sampling generator is seeded from ``(seed, prompt id)`` alone, so
alpha, tau and the tokens do not depend on the worker count (only timings do).
"""

from __future__ import annotations

import hashlib
import time

import torch

from fastdraft_ray.config import EvaluateConfig, ModelConfig
from fastdraft_ray.data.tasks import EvalPrompt
from fastdraft_ray.models.draft import load_draft
from fastdraft_ray.models.prompting import pad_token_id
from fastdraft_ray.specdec.engine import SpecDecoder


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The sampling seed of one prompt: a function of the evaluation seed and the prompt id only."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{prompt_id}".encode()).digest()[:8], "big") >> 1


class Evaluator:
    """Holds the target and every draft (loaded once) and evaluates prompts; also the Ray actor body.

    ``cfg``: the evaluation settings with ``precision``/``draft_precision`` already resolved; ``gammas``: per
    draft, the gammas it is run at (default ``[cfg.gamma]``), each against the same target-alone baseline."""

    def __init__(
        self,
        target: ModelConfig,
        drafts: dict[str, str],
        cfg: EvaluateConfig,
        threads: int = 0,
        gammas: dict[str, list[int]] | None = None,
    ):
        if threads > 0:
            torch.set_num_threads(threads)
        device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        self.target_only = SpecDecoder.load(target, None, cfg, device)
        self.decoders = {name: self.target_only.with_draft(load_draft(path)) for name, path in drafts.items()}
        self.gammas = {name: list((gammas or {}).get(name) or [cfg.gamma]) for name in drafts}
        self.device = self.target_only.device
        self._latencies: dict | None = None
        self._prompts_run = 0

    def latencies(self, prompt: EvalPrompt) -> dict[str, dict]:
        """Median step latencies and the target's verify-cost curve on ``prompt``'s context, and warm every
        model up (first calls are slow)."""
        ids = prompt.input_ids
        for decoder in self.decoders.values():
            decoder.warm_up(ids)
        curve = None
        out = {}
        for name, decoder in self.decoders.items():
            if curve is None:  # one target: its curve is measured once and shared
                curve = decoder.measure_target(ids)
            costs = decoder.measure_costs(ids, target_curve=curve)
            out[name] = {
                "draft_step_s": costs.draft_step_s,
                "draft_catchup_s": costs.draft_catchup_s,  # each further token in one draft forward (probes)
                "target_step_s": costs.target_step_s,
                "verify_step_s": costs.verify_cost[self.cfg.gamma] * costs.target_step_s,
                "verify_cost": list(costs.verify_cost),
            }
        return out

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
        base_first = self._prompts_run % 2 == 0
        self._prompts_run += 1
        for mode in self.cfg.modes:
            kw = {
                "max_new_tokens": self.cfg.max_new_tokens,
                "temperature": self.cfg.temperature if mode == "sampling" else 0.0,
            }
            seed = prompt_seed(self.cfg.seed, prompt.id)

            base = (
                self.target_only.generate(prompt.input_ids, generator=self._gen(seed), **kw)
                if base_first
                else None
            )
            runs = []
            for name, decoder in self.decoders.items():
                for gamma in self.gammas[name]:
                    at_gamma = decoder if gamma == decoder.settings.gamma else decoder.with_gamma(gamma)
                    runs.append(
                        (name, gamma, at_gamma.generate(prompt.input_ids, generator=self._gen(seed), **kw))
                    )
            if base is None:
                base = self.target_only.generate(prompt.input_ids, generator=self._gen(seed), **kw)
            records += [_record(prompt, name, mode, spec, base, gamma, base_first) for name, gamma, spec in runs]
            if mode == "greedy":
                records += self._baseline_records(prompt, base)
        return records

    def _baseline_records(self, prompt: EvalPrompt, base) -> list[dict]:
        """transformers' own speculative paths on ``prompt``, greedy, against the same target-alone run ``base``:
        prompt lookup decoding (no draft) and assisted generation with each draft, ``cfg.gamma`` tokens."""
        methods = [("prompt_lookup", "", None)] if "prompt_lookup" in self.cfg.baselines else []
        if "assisted" in self.cfg.baselines:
            methods += [("assisted", name, decoder.draft) for name, decoder in self.decoders.items()]
        records = []
        for method, draft_name, assistant in methods:
            tokens, calls, wall = hf_generate(
                self.target_only, prompt.input_ids, self.cfg.max_new_tokens, self.cfg.gamma, assistant
            )
            records.append(
                {
                    "method": method,
                    "draft": draft_name,
                    "task": prompt.task,
                    "prompt_id": prompt.id,
                    "mode": "greedy",
                    "gamma": self.cfg.gamma,
                    "new_tokens": len(tokens),
                    "target_calls": calls,
                    "wall_time_s": wall,
                    "base_new_tokens": base.stats.new_tokens,
                    "base_wall_time_s": base.stats.wall_time_s,
                    "matches_target": tokens == base.tokens,
                }
            )
        return records

    def _gen(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


def hf_generate(decoder: SpecDecoder, input_ids, max_new_tokens: int, gamma: int, assistant=None):
    """Greedy ``generate`` of the decoder's target with transformers' speculation: assisted generation with
    ``assistant`` proposing a constant ``gamma`` tokens (no confidence cut-off), else prompt lookup decoding
    matching ``gamma`` tokens. ``(new tokens cut after the first stop token, target forward calls, seconds)``."""
    from transformers import GenerationConfig

    target = decoder.target
    ids = decoder.input_tensor(input_ids)
    settings = dict(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=decoder.stop_ids or None)
    if assistant is not None:
        assistant.generation_config.num_assistant_tokens = gamma
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.assistant_confidence_threshold = 0.0
    else:
        settings["prompt_lookup_num_tokens"] = gamma
    calls = [0]
    hook = target.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            out = target.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=GenerationConfig(pad_token_id=pad_token_id(decoder.tokenizer), **settings),
                assistant_model=assistant,
            )
        wall = time.perf_counter() - start
    finally:
        hook.remove()
    tokens = out[0, ids.shape[1] :].tolist()
    stops = set(decoder.stop_ids or ())
    end = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokens[:end], calls[0], wall


def _record(prompt: EvalPrompt, draft: str, mode: str, spec, base, gamma: int, base_first: bool) -> dict:
    st = spec.stats
    gamma_steps: dict[str, int] = {}
    for g in st.proposed_per_step:
        gamma_steps[str(g)] = gamma_steps.get(str(g), 0) + 1
    return {
        "task": prompt.task,
        "prompt_id": prompt.id,
        "prompt_tokens": len(prompt.input_ids),
        "draft": draft,
        "mode": mode,
        "gamma": gamma,
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
        "gamma_steps": gamma_steps,  # steps per draft length used: the ideal tau of evaluate.metrics
        "base_first": base_first,
        "base_new_tokens": base.stats.new_tokens,
        "base_wall_time_s": base.stats.wall_time_s,
        "matches_target": spec.tokens == base.tokens if mode == "greedy" else None,
        "tokens": spec.tokens,
    }
