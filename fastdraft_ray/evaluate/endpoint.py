"""Evaluation through a running server (``evaluate.endpoint=URL``, the app of ``jobs/serve.py``): the same
prompts, token ids and per-prompt seeds as the in-process ``Evaluator``, sent to ``POST /v1/completions``
(token-id prompt, ``return_token_ids``; the target-alone baseline with ``"speculative": false``), so the tokens,
alpha and tau are the ones the in-process evaluation measures. Timings are the client's (HTTP included) and the
draft/target split is not known, so the latency columns stay empty.
"""

from __future__ import annotations

import os
import time

import requests

from fastdraft_ray.config import EvaluateConfig
from fastdraft_ray.data.tasks import EvalPrompt
from fastdraft_ray.evaluate.worker import prompt_seed

TIMEOUT_S = 600  # one generation of up to max_new_tokens on a loaded CPU server


class EndpointError(RuntimeError):
    """The server could not be used for the evaluation; the message says why."""


class EndpointEvaluator:
    """``Evaluator``'s interface (``run``, ``measured_latencies``) over HTTP for the one draft the server holds."""

    def __init__(self, url: str, drafts: dict[str, str], cfg: EvaluateConfig, gammas: dict[str, list[int]]):
        if len(drafts) != 1:
            raise EndpointError(f"a server holds one draft: evaluate.drafts lists {len(drafts)} ({list(drafts)})")
        self.url, self.cfg = url.rstrip("/"), cfg
        self.name = next(iter(drafts))
        self.gammas = gammas.get(self.name) or [cfg.gamma]
        self.prompts_run = 0
        key = os.environ.get("FASTDRAFT_API_KEY", "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            info = requests.get(f"{self.url}/health", timeout=30)
        except requests.RequestException as exc:
            raise EndpointError(
                f"evaluate.endpoint={url}: no server answers ({exc}); start jobs/serve.py"
            ) from exc
        if info.status_code != 200:
            raise EndpointError(f"evaluate.endpoint={url}: /health answered {info.status_code}: {info.text[:200]}")
        self.info = info.json()
        if not self.info.get("speculative"):
            raise EndpointError(f"the server at {url} decodes without a draft: start it with serve.draft=<folder>")

    def run(self, prompts: list[EvalPrompt]) -> tuple[list[dict], dict]:
        """Records for every (prompt, mode, gamma), as ``Evaluator.run`` returns them (no latencies)."""
        return [r for prompt in prompts for r in self._records(prompt)], {}

    def measured_latencies(self) -> dict:
        return {}

    def complete(self, prompt: EvalPrompt, temperature: float, seed: int, **extra) -> tuple[dict, float]:
        """One completion of ``prompt``'s token ids; ``(response json, client seconds)``."""
        body = {
            "prompt": list(prompt.input_ids),
            "max_tokens": self.cfg.max_new_tokens,
            "temperature": temperature,
            "top_p": self.cfg.top_p,
            "seed": seed,
            "return_token_ids": True,
            **extra,
        }
        start = time.perf_counter()
        r = requests.post(f"{self.url}/v1/completions", json=body, headers=self.headers, timeout=TIMEOUT_S)
        elapsed = time.perf_counter() - start
        if r.status_code != 200:
            raise EndpointError(f"{self.url}/v1/completions answered {r.status_code}: {r.text[:300]}")
        return r.json(), elapsed

    def _records(self, prompt: EvalPrompt) -> list[dict]:
        """As ``worker.Evaluator``'s records; the baseline runs before or after the speculative requests,
        alternating from prompt to prompt."""
        records = []
        seed = prompt_seed(self.cfg.seed, prompt.id)
        base_first = self.prompts_run % 2 == 0
        self.prompts_run += 1
        for mode in self.cfg.modes:
            temperature = self.cfg.temperature if mode == "sampling" else 0.0
            if base_first:
                base, base_s = self.complete(prompt, temperature, seed, speculative=False)
            specs = [
                self.complete(
                    prompt, temperature, seed, speculative=True, gamma=gamma, gamma_policy=self.cfg.gamma_policy
                )
                for gamma in self.gammas
            ]
            if not base_first:
                base, base_s = self.complete(prompt, temperature, seed, speculative=False)
            base_tokens = base["choices"][0]["token_ids"]
            for gamma, (spec, spec_s) in zip(self.gammas, specs, strict=True):
                tokens, u = spec["choices"][0]["token_ids"], spec["usage"]["speculative"]
                records.append(
                    {
                        "task": prompt.task,
                        "prompt_id": prompt.id,
                        "prompt_tokens": len(prompt.input_ids),
                        "draft": self.name,
                        "mode": mode,
                        "gamma": gamma,
                        **{k: u[k] for k in ("proposed", "accepted", "steps", "plain_steps", "rejected_steps")},
                        "new_tokens": len(tokens),
                        "wall_time_s": spec_s,
                        "draft_time_s": 0.0,
                        "target_time_s": 0.0,
                        "draft_forwards": u["draft_forwards"],
                        "target_forwards": u["target_forwards"],
                        "base_first": base_first,
                        "base_new_tokens": len(base_tokens),
                        "base_wall_time_s": base_s,
                        "matches_target": tokens == base_tokens if mode == "greedy" else None,
                        "tokens": tokens,
                    }
                )
        return records
