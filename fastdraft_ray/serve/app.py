"""The Ray Serve application: a FastAPI ingress (0 CPUs) in front of the decoder deployment, composed through a
``DeploymentHandle``, speaking OpenAI's chat and completions API with server-sent-event streaming.

    app = build_app(load_config("cpu_default", ["serve.draft=runs/cpu_default/ft/export"]))
    serve.start(http_options={"host": "127.0.0.1", "port": 8000}); serve.run(app, name="fastdraft")

``serve run fastdraft_ray.serve.app:app_builder config=cpu_default serve.draft=...`` builds the same app.
Every refusal is an OpenAI-style ``{"error": {...}}`` body: 400 for a malformed request, 401 for a missing or
wrong API key, 404 for an unknown model, 413 for a body over ``serve.max_request_bytes``, 503 + ``Retry-After``
when every decoder queue is full, 500 when a generation fails. The ingress refuses what it can before a decoder
sees it: the body size, a prompt longer than ``serve.max_prompt_tokens`` in token ids or (text) beyond
``CHARS_PER_TOKEN`` characters per allowed token.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures of the Serve ingress class at
# run time, where string annotations are not resolved (a `Request` parameter became a query field).
import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from fastdraft_ray.config import FastDraftConfig, ServeConfig, load_config
from fastdraft_ray.serve import schema as W
from fastdraft_ray.serve.decoder import Decoder, load_decoder, served_model_name
from fastdraft_ray.serve.metrics import IngressMetrics

log = logging.getLogger(__name__)

api = FastAPI(
    title="fastdraft-ray", description="A target + draft pair decoding speculatively, OpenAI-compatible."
)
INFO_TIMEOUT_S = 10.0
CHARS_PER_TOKEN = 16  # text prompts longer than this many characters per allowed token are refused unread


class BodyTooLarge(HTTPException):
    """The request body passed ``serve.max_request_bytes`` (an ``HTTPException``: FastAPI passes those on unchanged
    from reading a body, where it turns any other exception into a 400)."""

    def __init__(self, size: int):
        super().__init__(413, f"request body of at least {size} bytes")


class BodyLimit:
    """ASGI middleware: the body a route reads may not pass the app's ``state.max_request_bytes`` (a declared
    Content-Length is checked before anything is read, a streamed body as it arrives)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        limit = getattr(scope["app"].state, "max_request_bytes", 0) if "app" in scope else 0
        if scope["type"] != "http" or not limit:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length", b"0")
        received = 0

        async def limited():
            nonlocal received
            if declared.isdigit() and int(declared) > limit:
                raise BodyTooLarge(int(declared))
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(received)
            return message

        await self.app(scope, limited, send)


api.add_middleware(BodyLimit)


def key_matches(given: str, keys: list[str]) -> bool:
    """Whether ``given`` is one of ``keys``, compared in constant time against every key (no early exit)."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    return matched


def error_response(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None, **kw):
    """A JSONResponse with OpenAI's error body."""
    return JSONResponse(W.error_body(message, kind, param, code), status_code=status, **kw)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"{where}: {first['msg']}" if where else first["msg"]
    if first.get("type") == "json_invalid":
        message, where = f"the request body is not valid JSON ({first['msg']})", ""
    if metrics := getattr(request.app.state, "metrics", None):
        metrics.client_errors.inc(1, {"code": "400"})
    return error_response(400, message, param=where or None, code=first.get("type"))


@api.exception_handler(BodyTooLarge)
async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
    limit = request.app.state.max_request_bytes
    if metrics := getattr(request.app.state, "metrics", None):
        metrics.client_errors.inc(1, {"code": "413"})
    return error_response(
        413, f"the request body is over {limit} bytes (serve.max_request_bytes)", code="request_too_large"
    )


@api.middleware("http")
async def _authorize(request: Request, call_next):
    """With ``serve.api_keys`` set, every /v1/ route needs ``Authorization: Bearer <key>`` (checked before the
    body is read: an unauthenticated caller learns nothing about the request format)."""
    keys = getattr(request.app.state, "api_keys", None)
    if keys and "/v1/" in request.url.path:
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and key_matches(given.removeprefix("Bearer ").strip(), keys)):
            request.app.state.metrics.client_errors.inc(1, {"code": "401"})
            return error_response(
                401, "missing or wrong API key: send `Authorization: Bearer <key>`", kind="authentication_error",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
    return await call_next(request)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class Ingress:
    """HTTP in, decoder calls out: validation, authentication, the OpenAI response shapes, SSE streaming."""

    def __init__(self, decoder: DeploymentHandle, settings: ServeConfig, name: str):
        self.decoder, self.settings, self.name = decoder, settings, name
        self.streams = decoder.options(stream=True)
        self.metrics = IngressMetrics(name)
        api.state.api_keys, api.state.metrics = list(settings.api_keys), self.metrics
        api.state.max_request_bytes = settings.max_request_bytes

    # ------------------------------------------------------------------------------------------- routes

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 with the decoder's ``info`` once a decoder replica has its models loaded, else 503."""
        try:
            info = await asyncio.wait_for(self.decoder.info.remote(), INFO_TIMEOUT_S)
        except Exception as exc:
            return error_response(503, f"the decoder is not ready: {exc}", kind="unavailable")
        return JSONResponse({"status": "ok", **info})

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        card = {"id": self.name, "object": "model", "created": 0, "owned_by": "fastdraft-ray"}
        return JSONResponse({"object": "list", "data": [card]})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: W.ChatCompletionRequest):
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        return await self._complete(body, chat=True, messages=messages)

    @api.post("/v1/completions")
    async def completions(self, body: W.CompletionRequest):
        if isinstance(body.prompt, str):
            return await self._complete(body, chat=False, prompt=body.prompt)
        return await self._complete(body, chat=False, prompt_ids=list(body.prompt))

    # ------------------------------------------------------------------------------------------ helpers

    def _client_error(self, status: int, message: str, param=None, code=None, kind="invalid_request_error"):
        self.metrics.client_errors.inc(1, {"code": str(status)})
        return error_response(status, message, kind=kind, param=param, code=code)

    def _generation_request(self, body: W.GenerationFields, **prompt) -> W.GenerationRequest | JSONResponse:
        s = self.settings
        max_tokens = s.default_max_tokens if body.max_tokens is None else body.max_tokens
        if not 1 <= max_tokens <= s.max_tokens_limit:
            return self._client_error(
                400, f"max_tokens must be between 1 and {s.max_tokens_limit} (serve.max_tokens_limit), got {max_tokens}",
                param="max_tokens", code="invalid_value",
            )  # fmt: skip
        ids = prompt.get("prompt_ids") or ()
        if len(ids) > s.max_prompt_tokens:
            return self._client_error(
                400, f"the prompt has {len(ids)} tokens; this server accepts at most {s.max_prompt_tokens} "
                "(serve.max_prompt_tokens)", param="prompt", code="context_length_exceeded",
            )  # fmt: skip
        if (chars := body.prompt_chars()) > s.max_prompt_tokens * CHARS_PER_TOKEN:
            return self._client_error(
                400, f"the prompt has {chars} characters; this server accepts at most {s.max_prompt_tokens} tokens "
                f"(serve.max_prompt_tokens), and at most {CHARS_PER_TOKEN} characters per token",
                param="messages" if "messages" in prompt else "prompt", code="context_length_exceeded",
            )  # fmt: skip
        return W.GenerationRequest(
            max_new_tokens=max_tokens,
            temperature=body.decoding_temperature(),
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop_strings(),
            speculative=s.speculative if body.speculative is None else body.speculative,
            gamma=body.gamma,
            gamma_policy=body.gamma_policy,
            **prompt,
        )

    async def _complete(self, body: W.GenerationFields, chat: bool, **prompt):
        if body.model not in (None, self.name):
            return self._client_error(
                404, f"model {body.model!r} is not served here; GET /v1/models lists {self.name!r}",
                param="model", code="model_not_found",
            )  # fmt: skip
        generation = self._generation_request(body, **prompt)
        if isinstance(generation, JSONResponse):
            return generation
        try:
            pieces = self.streams.generate.remote(generation)
            first = await pieces.__anext__()
        except BackPressureError:  # the decoders' queues are full: nothing was started
            self.metrics.refused.inc(1)
            return error_response(
                503, "the server is at capacity (every decoder queue is full); retry later", kind="unavailable",
                code="queue_full", headers={"Retry-After": str(self.settings.retry_after_s)},
            )  # fmt: skip
        except Exception as exc:
            log.exception("generation failed")
            return error_response(500, f"generation failed: {type(exc).__name__}", kind="server_error")
        if (refused := first.refused) is not None:
            return self._client_error(refused.status, refused.message, refused.param, refused.code)
        rid = W.new_id("chatcmpl" if chat else "cmpl")
        want_ids = body.return_token_ids
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._events(first, pieces, rid, chat, include_usage, want_ids)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            last, text, ids = first, [first.text], list(first.token_ids)
            while last.finish_reason is None:
                last = await pieces.__anext__()
                text.append(last.text)
                ids += last.token_ids
        except Exception as exc:  # the decoder failed mid-generation
            log.exception("generation failed")
            return error_response(500, f"generation failed: {type(exc).__name__}", kind="server_error")
        finally:
            pieces.cancel()
        shape = W.chat_response if chat else W.completion_response
        return shape(rid, self.name, "".join(text), last.finish_reason, last.usage, ids if want_ids else None)

    async def _events(
        self,
        first: W.Delta,
        pieces: DeploymentResponseGenerator,
        rid: str,
        chat: bool,
        include_usage: bool,
        want_ids: bool,
    ) -> AsyncIterator[str]:
        """The SSE stream: a chunk per accepted step (``data: {json}``), the usage chunk if asked, ``[DONE]``.
        A client that disconnects closes this generator, which cancels the generation."""
        created = int(time.time())
        chunk: Callable[[W.Delta], dict]
        if chat:
            yield _sse(W.chat_chunk(rid, self.name, created, {"role": "assistant", "content": ""}, None))

            def chunk(d: W.Delta) -> dict:
                body = W.chat_chunk(
                    rid, self.name, created, {"content": d.text} if d.text else {}, d.finish_reason
                )
                if want_ids:
                    body["choices"][0]["token_ids"] = d.token_ids
                return body
        else:

            def chunk(d: W.Delta) -> dict:
                ids = d.token_ids if want_ids else None
                return W.completion_chunk(rid, self.name, created, d.text, d.finish_reason, ids)

        delta = first
        try:
            while True:
                if delta.text or delta.finish_reason or want_ids:
                    yield _sse(chunk(delta))
                if delta.finish_reason is not None:
                    break
                delta = await pieces.__anext__()
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield _sse(W.usage_chunk(rid, self.name, created, obj, delta.usage))
            yield _sse("[DONE]")
        except Exception as exc:  # the decoder failed mid-stream: say so in the stream, then end it
            log.exception("generation failed mid-stream")
            yield _sse(W.error_body(f"generation failed: {type(exc).__name__}", "server_error"))
        finally:
            pieces.cancel()


def build_app(cfg: FastDraftConfig, loader: Callable = load_decoder) -> serve.Application:
    """The application for ``cfg.serve`` / ``cfg.model``: the ingress bound to a decoder deployment whose
    replicas load the pair with ``loader`` (a module-level function: it travels to the replicas)."""
    s = cfg.serve
    name = served_model_name(cfg.model, s)
    scaling = {"autoscaling_config": dict(s.autoscaling)} if s.autoscaling else {"num_replicas": s.num_replicas}
    decoder = serve.deployment(Decoder).options(
        name="Decoder",
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        health_check_period_s=10,
        health_check_timeout_s=60,
        **scaling,
    )
    return Ingress.bind(decoder.bind(s, cfg.model, name, loader), s, name)


def app_builder(args: dict) -> serve.Application:
    """``serve run fastdraft_ray.serve.app:app_builder config=RECIPE key.sub=value ...``."""
    args = dict(args)
    recipe = args.pop("config", "cpu_default")
    return build_app(load_config(recipe, [f"{k}={v}" for k, v in args.items()]))
