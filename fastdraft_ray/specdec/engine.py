"""``SpecDecoder``: the one place a target and a draft are paired for decoding.

It holds the target, the draft (or none: target-only decoding), both prepared at the ``DecodeConfig``'s
precision, the stop tokens (``models.prompting.stop_token_ids``) and the measured costs the ``cost`` gamma
policy needs. ``stream()`` yields each step's accepted tokens and running statistics as the target verifies
them (a server streams from it); ``generate()`` is ``stream()`` run to its end. Evaluation, the benchmarks, the
search and the server all decode through it, reading one typed settings section, ``config.DecodeConfig``.

    decoder = SpecDecoder.load(ModelConfig(), "runs/cpu_default/ft/export", DecodeConfig(gamma=3))
    for step in decoder.stream(ids, temperature=0.0, max_new_tokens=64):
        print(decoder.tokenizer.decode(step.tokens), end="")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from fastdraft_ray.config import DecodeConfig, ModelConfig
from fastdraft_ray.models.draft import check_compatible, load_draft
from fastdraft_ray.models.prompting import stop_token_ids
from fastdraft_ray.models.target import load_target
from fastdraft_ray.specdec import stats as S
from fastdraft_ray.specdec.decode import DecodeResult, Step, autoregressive_stream, collect, speculative_stream
from fastdraft_ray.specdec.policy import CostModel, GammaPolicy, make_policy
from fastdraft_ray.specdec.precision import model_device, prepare_for_inference, resolve_precision


@dataclass
class Costs:
    """Latencies measured on this process's device and threads: one draft step, each further draft token in one
    forward (catch-up), one target decode step, and the target's verify-cost curve v(k), k = 1.."""

    draft_step_s: float
    draft_catchup_s: float
    target_step_s: float
    verify_cost: tuple[float, ...]

    def cost_model(self) -> CostModel:
        """The ``CostModel`` of the ``cost`` gamma policy (costs relative to one target step)."""
        step = self.target_step_s
        return CostModel(self.draft_step_s / step, tuple(self.verify_cost), self.draft_catchup_s / step)


class SpecDecoder:
    """A target (+ draft) at one precision, decoding as ``settings`` says; see the module docstring."""

    def __init__(
        self,
        target: PreTrainedModel,
        draft: PreTrainedModel | None,
        settings: DecodeConfig,
        *,
        tokenizer=None,
        stop_ids: list[int] | None = None,
        precision: str = "",
    ):
        """``stop_ids``: the stop tokens (default: ``stop_token_ids`` of ``tokenizer``; none when
        ``settings.stop_at_eos`` is off); ``precision``: the target's, already applied (default
        ``settings.precision`` or fp32): the draft's unless ``settings.draft_precision`` says otherwise."""
        if draft is not None:
            check_compatible(target, draft)
        self.target, self.draft, self.settings, self.tokenizer = target, draft, settings, tokenizer
        if not settings.stop_at_eos:
            stop_ids = None
        elif stop_ids is None and tokenizer is not None:
            stop_ids = stop_token_ids(tokenizer, target)
        self.stop_ids = stop_ids
        self.precision = resolve_precision(precision or settings.precision or "fp32")
        self.device = model_device(target)
        self.costs: Costs | None = None

    @classmethod
    def load(
        cls, model: ModelConfig, draft: str | None, settings: DecodeConfig, device: str = "cpu"
    ) -> SpecDecoder:
        """Load the target (``model``) and the draft folder (None: target only) on ``device``, each prepared at
        its precision (``settings.precision`` / ``draft_precision``; '' = ``model.dtype``)."""
        precision = resolve_precision(settings.precision, model.dtype)
        target, tokenizer = load_target(
            model.target, dtype=model.dtype, device=device, trust_remote_code=model.trust_remote_code
        )
        target = prepare_for_inference(target, precision, inplace=True, linear_kernel=settings.linear_kernel)
        decoder = cls(target, None, settings, tokenizer=tokenizer, precision=precision)
        return decoder.with_draft(load_draft(draft)) if draft else decoder

    def with_gamma(self, gamma: int) -> SpecDecoder:
        """The same target and draft (no copy, no re-preparation) proposing ``gamma`` tokens per step."""
        return self.with_settings(gamma=gamma)

    def with_settings(self, **changes) -> SpecDecoder:
        """The same target, draft and measured costs (no copy, no re-preparation) decoding with ``changes``
        applied to the settings (``gamma``, ``gamma_policy``, ``temperature``, ...)."""
        decoder = SpecDecoder(
            self.target,
            self.draft,
            dataclasses.replace(self.settings, **changes),
            tokenizer=self.tokenizer,
            stop_ids=self.stop_ids,
            precision=self.precision,
        )
        decoder.costs = self.costs
        return decoder

    def with_draft(self, draft: PreTrainedModel) -> SpecDecoder:
        """A decoder sharing this one's target (no copy) with ``draft``, prepared at the draft precision."""
        s = self.settings
        draft = prepare_for_inference(
            draft.to(self.device),
            resolve_precision(s.draft_precision or self.precision),
            inplace=True,
            linear_kernel=s.linear_kernel,
        )
        return SpecDecoder(
            self.target, draft, s, tokenizer=self.tokenizer, stop_ids=self.stop_ids, precision=self.precision
        )

    # ------------------------------------------------------------------------------------------ decoding

    def stream(
        self,
        input_ids: torch.LongTensor | list[int],
        *,
        max_new_tokens: int = 64,
        temperature: float | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        speculative: bool = True,
        policy: GammaPolicy | None = None,
        prefill_chunk: int = 0,
    ) -> Iterator[Step]:
        """Yield each decoding step (``decode.Step``: tokens, proposed/accepted, running stats) of the continuation
        of ``input_ids`` (shape (1, n) or a list). ``temperature``/``top_p`` default to the settings' (0 = greedy);
        ``speculative=False`` (or no draft, unless ``settings.proposer`` is ``ngram``) decodes with the target
        alone, one token per step; proposals come from ``settings.proposer`` (``decode.speculative_stream``); ``policy``
        defaults to a fresh one from the settings (``policy()``); ``prefill_chunk`` > 0 prefills a longer prompt in
        chunks of that many tokens, an empty step after each (``decode.speculative_stream``). Closing the iterator
        stops the generation."""
        ids = self.input_tensor(input_ids)
        kw = {
            "max_new_tokens": max_new_tokens,
            "temperature": self.settings.temperature if temperature is None else temperature,
            "top_p": self.settings.top_p if top_p is None else top_p,
            "eos_token_id": self.stop_ids,
            "generator": generator,
            "prefill_chunk": prefill_chunk,
        }
        proposer = self.settings.proposer
        if not speculative or (self.draft is None and proposer != "ngram"):
            return autoregressive_stream(self.target, ids, **kw)
        ngram = {
            "proposer": proposer,
            "ngram_max": self.settings.ngram_max,
            "ngram_tokens": self.settings.ngram_tokens,
        }
        return speculative_stream(self.target, self.draft, ids, policy=policy or self.policy(), **kw, **ngram)

    def generate(self, input_ids: torch.LongTensor | list[int], **kwargs) -> DecodeResult:
        """``stream()`` run to its end: every new token and the final counters."""
        return collect(self.stream(input_ids, **kwargs))

    def policy(self) -> GammaPolicy:
        """A fresh gamma policy for one generation (policies carry state across steps, not prompts); the ``cost``
        policy needs ``measure_costs`` first."""
        s = self.settings
        cost = None
        if s.gamma_policy == "cost":
            if self.costs is None:
                raise RuntimeError(
                    "the cost gamma policy needs measured costs: call measure_costs(input_ids) first"
                )
            cost = self.costs.cost_model()
        return make_policy(
            s.gamma_policy,
            s.gamma,
            confidence_threshold=s.confidence_threshold,
            max_gamma=s.max_gamma,
            cost=cost,
            prior_alpha=s.prior_alpha if s.prior_alpha >= 0 else None,
        )

    # ----------------------------------------------------------------------------------------- measuring

    def verify_curve_length(self) -> int:
        """Tokens k up to which the target's verify cost is measured: gamma + 1, or max_gamma + 1 for the
        policies that may draft longer."""
        s = self.settings
        longest = max(s.gamma, s.max_gamma) if s.gamma_policy in ("cost", "heuristic") else s.gamma
        return longest + 1

    def warm_up(self, input_ids: torch.LongTensor | list[int]) -> None:
        """Run one short greedy generation (first calls are slow)."""
        self.generate(
            input_ids,
            max_new_tokens=self.settings.gamma + 2,
            temperature=0.0,
            policy=GammaPolicy(self.settings.gamma),
        )

    def measure_target(self, input_ids: torch.LongTensor | list[int]) -> tuple[tuple[float, ...], float]:
        """The target's verify-cost curve up to ``verify_curve_length()`` tokens and its decode step, in seconds
        (``stats.measure_verify_cost``)."""
        return S.measure_verify_cost(self.target, self.input_tensor(input_ids), self.verify_curve_length())

    def measure_costs(
        self, input_ids: torch.LongTensor | list[int], target_curve: tuple[tuple[float, ...], float] | None = None
    ) -> Costs:
        """Measure (median of repeats) the draft step, its catch-up cost, the target step and the target's
        verify-cost curve on ``input_ids``'s context; ``target_curve`` = ``(v, step_s)`` already measured for this
        target (decoders sharing one target measure it once). Kept in ``self.costs`` for the cost policy."""
        if self.draft is None:
            raise RuntimeError("a target-only decoder has no draft costs to measure")
        ids = self.input_tensor(input_ids)
        curve, target_step = target_curve or self.measure_target(ids)
        draft_step, catchup = S.measure_catchup(self.draft, ids)
        self.costs = Costs(draft_step, catchup, target_step, tuple(curve))
        return self.costs

    def input_tensor(self, input_ids: torch.LongTensor | list[int]) -> torch.LongTensor:
        """``input_ids`` as a (1, n) tensor on the models' device."""
        if isinstance(input_ids, torch.Tensor):
            return input_ids.to(self.device)
        return torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)
