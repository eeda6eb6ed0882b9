"""The decoder deployment: one replica holds the target (+ draft) as a ``SpecDecoder`` and streams generations.

The models are loaded by an injected loader (default ``load_decoder``: ``SpecDecoder.load``, which refuses an
incompatible target/draft pair with ``models.draft.check_compatible``'s message), so tests can serve tiny random
models through the same code. Several requests may be in flight on one replica (``serve.max_ongoing_requests``):
their decoding steps take turns on the model (one step at a time, in a worker thread, so the replica's event loop
keeps answering health checks; a long prompt is prefilled in ``serve.prefill_chunk``-token steps, so it does not
hold the others up for its whole prefill); a request whose client went away is cancelled between two steps.
Tokenisation runs in a worker thread too. The costs the ``cost`` gamma policy needs are measured once, when the
replica starts (verify curve up to ``max_gamma + 1`` tokens, so any request may ask for that policy).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import PurePath

import torch

from fastdraft_ray.config import ModelConfig, ServeConfig
from fastdraft_ray.models.prompting import encode_messages
from fastdraft_ray.serve.metrics import DecoderMetrics
from fastdraft_ray.serve.schema import Delta, GenerationRequest, RequestError
from fastdraft_ray.specdec.decode import DecodeStats, Step
from fastdraft_ray.specdec.engine import SpecDecoder

log = logging.getLogger(__name__)

WARM_UP_PROMPT = "Hello"


def load_decoder(model: ModelConfig, settings: ServeConfig, device: str) -> SpecDecoder:
    """The default loader: the target of ``model`` and the draft folder ``settings.draft`` (none: target only)."""
    return SpecDecoder.load(model, settings.draft or None, settings, device=device)


def served_model_name(model: ModelConfig, settings: ServeConfig) -> str:
    """The model id of /v1/models: ``serve.model_name``, else the target's embedded name, folder or hub id."""
    if settings.model_name:
        return settings.model_name
    target = model.target.removeprefix("embedded:")
    return PurePath(target).name if "/" in target and PurePath(target).is_absolute() else target


def _replica_id() -> str:
    """This Serve replica's id ('' outside Serve): a restarted replica has a new one."""
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not running inside a Serve replica
        return ""


class TextStream:
    """Token ids in, text out as it becomes final: a piece is held back while it ends in an incomplete UTF-8
    sequence or might be the start of a stop string; the first stop string found ends the text before it."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0

    def add(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """The new text ``ids`` complete and whether a stop string ended the text."""
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        elif final:
            end, stopped = len(text), False
        else:
            end, stopped = min(len(text) - self.hold, len(text.rstrip("\ufffd"))), False
        piece = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece, stopped


def usage(prompt_tokens: int, stats: DecodeStats, mode: str) -> dict:
    """OpenAI's usage counts plus the generation's speculative statistics."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": stats.new_tokens,
        "total_tokens": prompt_tokens + stats.new_tokens,
        "speculative": {
            "mode": mode,
            "steps": stats.steps,
            "proposed": stats.proposed,
            "accepted": stats.accepted,
            "rejected_steps": stats.rejected_steps,
            "plain_steps": stats.proposed_per_step.count(0),
            "target_forwards": stats.target_forwards,
            "draft_forwards": stats.draft_forwards,
            "acceptance_rate": round(stats.acceptance_rate, 6),
            "mean_accepted_length": round(stats.block_efficiency, 6),
        },
    }


class Decoder:
    """A Serve deployment class (``serve.app`` decorates it): ``generate`` streams ``Delta`` pieces of one request,
    ``info`` describes the loaded pair, ``check_health`` fails while no model is loaded."""

    def __init__(
        self,
        settings: ServeConfig,
        model: ModelConfig,
        name: str,
        loader: Callable[[ModelConfig, ServeConfig, str], SpecDecoder] = load_decoder,
    ):
        self.engine: SpecDecoder | None = None
        torch.set_num_threads(settings.threads or max(1, int(settings.cpus_per_replica)))
        device = "cuda" if settings.gpus_per_replica > 0 else "cpu"
        engine = loader(model, settings, device)
        if engine.tokenizer is None:
            raise ValueError("the served target needs a tokenizer (the loader returned a decoder without one)")
        self.settings, self.name = settings, name
        self.metrics = DecoderMetrics(name)
        self._turn = asyncio.Lock()
        self.max_positions = getattr(engine.target.config, "max_position_embeddings", None)
        self.vocab_size = engine.target.get_output_embeddings().weight.shape[0]
        warm = engine.tokenizer(WARM_UP_PROMPT)["input_ids"]
        engine.warm_up(warm)
        if engine.draft is not None:  # for the cost policy, whatever the server's own (costed up to max_gamma)
            engine.costs = engine.with_settings(gamma_policy="cost").measure_costs(warm)
        self.engine = engine
        self.replica = _replica_id()
        log.info("serving %s (draft: %s)", name, settings.draft or "none")

    def check_health(self) -> None:
        """Serve's health check: raises while the models are not loaded."""
        if self.engine is None:
            raise RuntimeError("the target/draft pair is not loaded")

    def info(self) -> dict:
        """The served pair: model id, whether a draft is loaded, the default decoding settings and limits."""
        self.check_health()
        s = self.settings
        return {  # no paths: /health answers without a key
            "model": self.name,
            "replica": self.replica,
            "speculative": s.speculative and self.engine.draft is not None,
            "gamma": s.gamma,
            "gamma_policy": s.gamma_policy,
            "precision": self.engine.precision,
            # the longest draft the cost policy may choose (its costs were measured up to it at start)
            "cost_policy_max_gamma": self.engine.costs.cost_model().max_gamma if self.engine.costs else None,
            "max_prompt_tokens": s.max_prompt_tokens,
            "max_new_tokens": s.max_tokens_limit,
        }

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream ``request``'s generation as ``Delta`` pieces; the last carries the finish reason and usage.
        A prompt the target cannot take gets one piece carrying the ``RequestError``."""
        started = time.perf_counter()
        engine = self._engine_for(request)
        try:
            ids = await asyncio.to_thread(self.prompt_ids, request)
        except RequestError as refused:
            yield Delta("", [], refused=refused)
            return
        mode = "speculative" if request.speculative and engine.draft is not None else "target"
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        generator = torch.Generator(device=engine.device).manual_seed(seed)
        steps = engine.stream(
            ids,
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            generator=generator,
            speculative=mode == "speculative",
            prefill_chunk=self.settings.prefill_chunk,
        )
        text = TextStream(engine.tokenizer, request.stop)
        status, first_token_s = "error", None
        try:
            while True:
                step = await self._next_step(steps)
                if step is None:  # the engine emitted nothing more (cannot happen after a finished step)
                    break
                self.metrics.step(mode, step.proposed, step.accepted, len(step.tokens))
                if first_token_s is None and step.tokens:
                    first_token_s = time.perf_counter() - started
                piece, stopped = text.add(step.tokens, final=step.finished)
                done = step.finished or stopped
                finish = None
                if done:
                    at_stop_token = bool(step.tokens) and step.tokens[-1] in (engine.stop_ids or ())
                    finish = "stop" if stopped or at_stop_token else "length"
                yield Delta(piece, step.tokens, finish, usage(len(ids), step.stats, mode) if done else None)
                if done:
                    status = "finished"
                    break
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            steps.close()
            self.metrics.finished(mode, status, time.perf_counter() - started, first_token_s)

    async def _next_step(self, steps: Iterator[Step]) -> Step | None:
        """The next step of ``steps``, computed in a worker thread when the model's turn comes. A cancellation
        lets the running step end first, so the model is never used by two steps at once."""
        async with self._turn:
            running = asyncio.ensure_future(asyncio.to_thread(next, steps, None))
            try:
                return await asyncio.shield(running)
            except asyncio.CancelledError:
                await asyncio.wait([running])
                raise

    def _engine_for(self, request: GenerationRequest) -> SpecDecoder:
        """The loaded engine, with the request's gamma / gamma policy when it asks for others."""
        self.check_health()
        changes = {}
        if request.gamma is not None:
            changes["gamma"] = request.gamma
        if request.gamma_policy is not None:
            changes["gamma_policy"] = request.gamma_policy
        return self.engine.with_settings(**changes) if changes else self.engine

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The request's prompt as target token ids, checked against the limits (``RequestError`` otherwise)."""
        tokenizer = self.engine.tokenizer
        if request.messages is not None:
            try:
                ids = encode_messages(tokenizer, request.messages)
            except Exception as exc:  # a template that rejects the conversation (e.g. roles out of order)
                raise RequestError(f"messages: {exc}", param="messages") from exc
        elif request.prompt is not None:
            ids = list(tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
        else:
            ids = list(request.prompt_ids or [])
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(
                    f"prompt: token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                    param="prompt",
                )
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        limit = self.settings.max_prompt_tokens
        if len(ids) > limit:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; this server accepts at most {limit} (serve.max_prompt_tokens)",
                param="messages" if request.messages is not None else "prompt",
                code="context_length_exceeded",
            )
        if self.max_positions and len(ids) + request.max_new_tokens > self.max_positions:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({request.max_new_tokens}) exceeds the target's "
                f"context of {self.max_positions} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return ids
