"""Bounded fuzzing of the HTTP API (hypothesis): hundreds of generated requests -- valid chat and completions,
wrong types, unknown fields, oversized bodies and prompts, unicode (lone surrogates included), huge and negative
token ids, raw bytes -- against the tiny app on loopback. None may get a 5xx (or an error inside a 200 stream), the
decoder replica must never restart, and a greedy request afterwards must answer the same tokens as before."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdraft_ray.serve.schema import GAMMA_POLICIES
from tests.serve.conftest import SMOLLM2_VOCAB
from tests.serve.test_app import AUTH, events, post, replica

REQUESTS = 600
TEXT = st.text(st.characters(exclude_categories=()), max_size=60)  # every code point, lone surrogates too
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=8,
)
MAX_TOKENS = {"max_tokens": st.integers(1, 12)}  # always given: the app's default (128) would make the run slow
OPTIONAL = {
    "temperature": st.just(0) | st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "stop": TEXT | st.lists(st.text(max_size=8), max_size=4),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "gamma": st.integers(1, 16),
    "gamma_policy": st.sampled_from(GAMMA_POLICIES),
    "speculative": st.booleans(),
    "return_token_ids": st.booleans(),
    "model": st.just("tiny"),
}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT})
CHAT = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, min_size=1, max_size=3), **MAX_TOKENS}, optional=OPTIONAL
)
PROMPT = TEXT.filter(bool) | st.lists(st.integers(0, SMOLLM2_VOCAB - 1), min_size=1, max_size=64)
COMPLETION = st.fixed_dictionaries({"prompt": PROMPT, **MAX_TOKENS}, optional=OPTIONAL)
VALID = st.tuples(st.just("/v1/chat/completions"), CHAT) | st.tuples(st.just("/v1/completions"), COMPLETION)


@st.composite
def wrong_types(draw):
    """A valid body with one field replaced (or added) by an arbitrary JSON value, or a body that is not an
    object at all."""
    route, body = draw(VALID)
    if draw(st.integers(0, 9)) == 0:
        return route, draw(JSON)
    key = draw(st.sampled_from([*body, *OPTIONAL, "unknown_field"]))
    return route, {**body, key: draw(JSON)}


@st.composite
def oversized(draw):
    """A body, prompt, message list, stop string or token list past the server's limits."""
    size = draw(st.sampled_from([1_100, 70_000, 2_200_000]))
    route, body = draw(VALID)
    which = draw(st.sampled_from(["prompt_text", "prompt_ids", "messages", "content", "stop"]))
    if which == "prompt_text":
        return "/v1/completions", {**body, "prompt": "word " * (size // 5)}
    if which == "prompt_ids":
        return "/v1/completions", {"prompt": [7] * min(size, 200_000)}
    if which == "messages":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * min(size, 5_000)}
    if which == "content":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * size}]}
    return route, {**body, "stop": ["s" * min(size, 100_000)]}


HUGE_IDS = st.tuples(
    st.just("/v1/completions"),
    st.fixed_dictionaries({"prompt": st.lists(st.integers(-(2**70), 2**70), min_size=1, max_size=8)}),
)
RAW = st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), st.binary(max_size=300))
CASES = (
    st.tuples(st.just("valid"), VALID)
    | st.tuples(st.just("wrong types"), wrong_types())
    | st.tuples(st.just("oversized"), oversized())
    | st.tuples(st.just("huge ids"), HUGE_IDS)
    | st.tuples(st.just("raw bytes"), RAW)
)


def greedy_tokens(url: str) -> list[int]:
    body = {"prompt": "The weather today", "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    r = post(url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def send(url: str, route: str, payload) -> tuple[int, bool, str]:
    """``(status, whether it is a server error, response excerpt)``; an error event inside a 200 stream counts."""
    if isinstance(payload, bytes):
        headers = {**AUTH, "Content-Type": "application/json"}
        r = requests.post(f"{url}{route}", data=payload, headers=headers, timeout=120)
    else:
        r = post(url, route, payload, stream=isinstance(payload, dict) and payload.get("stream") is True)
    if r.status_code == 200 and "text/event-stream" in r.headers.get("content-type", ""):
        chunks = events(r)
        return r.status_code, any(isinstance(e, dict) and "error" in e for e in chunks), str(chunks[-2:])[:300]
    return r.status_code, r.status_code >= 500, r.text[:300]


def test_fuzzed_requests_get_no_server_error_and_change_nothing(tiny_app):
    before, tokens = replica(tiny_app), greedy_tokens(tiny_app)
    cases = []

    @settings(
        max_examples=REQUESTS, deadline=None, database=None, derandomize=True, phases=["generate"],
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(case=CASES)
    def generate(case):
        cases.append(case)

    generate()
    with ThreadPoolExecutor(8) as pool:  # 8 clients at once: requests also interleave on the replica
        answers = list(pool.map(lambda case: send(tiny_app, *case[1]), cases))
    kinds = Counter(kind for kind, _ in cases)
    statuses = Counter(status for status, _, _ in answers)
    print(f"fuzz: {len(cases)} requests by kind {dict(kinds)}; statuses {dict(sorted(statuses.items()))}")
    server_errors = [
        (kind, route, json.dumps(payload, default=repr)[:300], status, text)
        for (kind, (route, payload)), (status, failed, text) in zip(cases, answers, strict=True)
        if failed
    ]
    assert len(cases) >= 500 and all(kinds[k] >= 30 for k in ("valid", "wrong types", "oversized")), kinds
    assert not server_errors, server_errors[:5]
    assert replica(tiny_app) == before, "the fuzzing restarted the decoder replica"
    assert greedy_tokens(tiny_app) == tokens
