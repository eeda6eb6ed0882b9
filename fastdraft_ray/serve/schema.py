"""The OpenAI-compatible wire format: request models (strict: an unknown or mistyped field is a 400, never a
crashed replica), the ``GenerationRequest`` the decoder receives, and the response / error bodies.

Extensions beyond OpenAI's fields: ``gamma`` and ``gamma_policy`` (draft length per step), ``speculative``
(false: the target alone), ``return_token_ids`` (the completion's token ids in each choice), a list of token ids as
``prompt`` of ``/v1/completions`` (OpenAI allows it too), and ``usage.speculative`` (proposed / accepted draft
tokens, α, mean accepted length).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from fastdraft_ray.specdec.sampling import MIN_TEMPERATURE

GAMMA_POLICIES = ("constant", "confidence", "heuristic", "cost")
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 128  # a stop string holds back that many characters of every streamed piece
MAX_GAMMA = 16
MAX_MESSAGES = 512
MAX_PROMPT_IDS = 131_072  # the schema's bound; the server's own limit (serve.max_prompt_tokens) is checked next
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, like vLLM (torch's generator refuses seeds >= 2^64)


class RequestError(ValueError):
    """A request the server refuses: the HTTP status and the OpenAI error fields to answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


Temperature = Annotated[float, Field(ge=0.0, le=2.0, strict=True)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, strict=True)]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS, strict=True)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class GenerationFields(BaseModel):
    """Fields both endpoints take."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1], strict=True)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: StrictStr | None = None
    gamma: Annotated[int, Field(ge=1, le=MAX_GAMMA, strict=True)] | None = None
    gamma_policy: Literal[GAMMA_POLICIES] | None = None  # type: ignore[valid-type]
    speculative: StrictBool | None = None
    return_token_ids: StrictBool = False

    def decoding_temperature(self) -> float | None:
        """``temperature``, with values below ``MIN_TEMPERATURE`` meaning greedy (0), as vLLM does."""
        t = self.temperature
        return 0.0 if t is not None and t < MIN_TEMPERATURE else t

    def prompt_chars(self) -> int:
        """Characters of text the prompt holds (0 for token ids)."""
        return 0

    def stop_strings(self) -> list[str]:
        """``stop`` as a list without empty strings."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stop if s]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: StrictStr
    name: StrictStr | None = None


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``: the messages go through the target's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]

    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``: a raw prompt (text, or token ids), no chat template (code completion)."""

    prompt: (
        Annotated[str, Field(min_length=1, strict=True)]
        | Annotated[list[StrictInt], Field(min_length=1, max_length=MAX_PROMPT_IDS)]
    )

    def prompt_chars(self) -> int:
        return len(self.prompt) if isinstance(self.prompt, str) else 0


@dataclass
class GenerationRequest:
    """What the ingress asks the decoder for, validated: exactly one of ``messages`` / ``prompt`` /
    ``prompt_ids``."""

    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    speculative: bool = True
    gamma: int | None = None
    gamma_policy: str | None = None
    messages: list[dict] | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None


@dataclass
class Delta:
    """One streamed piece of a generation: new text and token ids, and on the last piece the finish reason
    (``stop`` / ``length``) and the usage; or, as the only piece, the ``RequestError`` that refused the request
    (a refusal is an answer, not a replica failure)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: dict | None = None
    refused: RequestError | None = None


def new_id(prefix: str) -> str:
    """An OpenAI-style object id (``chatcmpl-…``, ``cmpl-…``)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None) -> dict:
    """One ``chat.completion.chunk`` of a streamed chat completion."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None, token_ids=None) -> dict:
    """One ``text_completion`` chunk of a streamed completion."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, created: int, obj: str, usage: dict) -> dict:
    """The final streamed chunk that carries only the usage (``stream_options.include_usage``)."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}


def chat_response(rid: str, model: str, text: str, finish: str, usage: dict, token_ids=None) -> dict:
    """A whole ``chat.completion``."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish,
    }
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def completion_response(rid: str, model: str, text: str, finish: str, usage: dict, token_ids=None) -> dict:
    """A whole ``text_completion``."""
    body = completion_chunk(rid, model, int(time.time()), text, finish, token_ids)
    body["usage"] = usage
    return body
