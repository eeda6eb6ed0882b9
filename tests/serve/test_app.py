"""The Serve app on tiny random models over the real tokenizer, through real HTTP: authentication, every bad input
answered with its 4xx (and the replica never restarted), streaming, the target-only switch (lossless: the same
greedy text), stop strings, seeds, the openai client, 64 concurrent requests, a full queue."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.serve.conftest import API_KEY, FAIL_MIDWAY, scrape

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CLIENT_TIMEOUT_S = 120  # the client timeout of every request here (README: 64 concurrent requests)


def post(url: str, route: str, body, headers=AUTH, **kw) -> requests.Response:
    return requests.post(f"{url}{route}", json=body, headers=headers, timeout=CLIENT_TIMEOUT_S, **kw)


def chat(text: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 12, "temperature": 0, **fields}


def events(response: requests.Response) -> list:
    """The ``data:`` payloads of an SSE response, JSON-decoded except ``[DONE]``."""
    out = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def replica(url: str) -> str:
    health = requests.get(f"{url}/health", timeout=30)
    assert health.status_code == 200, health.text
    return health.json()["replica"]


def test_api_key_is_required_on_v1_routes(tiny_app):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = post(tiny_app, "/v1/chat/completions", chat("hi"), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{tiny_app}/v1/models", timeout=30).status_code == 401
    models = requests.get(f"{tiny_app}/v1/models", headers=AUTH, timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert requests.get(f"{tiny_app}/health", timeout=30).status_code == 200  # health needs no key


def bad_inputs(max_new: int, max_prompt: int) -> list[tuple[str, object, str]]:
    """(route, body, what the error message or param names) for every malformed request of the README, for an
    app with these limits."""
    limit = f"max_tokens must be between 1 and {max_new}"
    return [
        ("/v1/chat/completions", "{not json", "not valid JSON"),
        ("/v1/chat/completions", chat("hi", frequency_penalty=0.5), "frequency_penalty: Extra inputs"),
        ("/v1/chat/completions", chat("hi", max_tokens="ten"), "max_tokens"),
        ("/v1/chat/completions", chat("hi", max_tokens=-1), limit),
        ("/v1/chat/completions", chat("hi", max_tokens=0), limit),
        ("/v1/chat/completions", chat("hi", max_tokens=max_new + 1), limit),
        ("/v1/chat/completions", chat("word " * (max_prompt + 10)), f"accepts at most {max_prompt}"),
        ("/v1/chat/completions", {"messages": [], "max_tokens": 4}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "content"),
        ("/v1/chat/completions", chat("hi", model="gpt-4"), "not served here"),
        ("/v1/chat/completions", chat("hi", n=2), "n"),
        ("/v1/chat/completions", chat("hi", temperature=3.0), "temperature"),
        ("/v1/chat/completions", chat("hi", gamma=0), "gamma"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, "outside the vocabulary"),
        ("/v1/completions", {"prompt": "x", "model_path": "/etc/passwd"}, "Extra inputs"),
        ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed"),  # was a 500 (torch refuses the seed)
        ("/v1/completions", {"prompt": "x", "stop": ["x" * 200]}, "stop"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 600}, "messages"),
        ("/v1/completions", {"prompt": [5] * (max_prompt + 1)}, f"at most {max_prompt}"),
        # refused by the ingress unread (before: tokenised on the decoder's event loop, stalling its streams)
        ("/v1/completions", {"prompt": "word " * (16 * max_prompt)}, "characters"),
    ]


def check_refusals(url: str, cases: list[tuple[str, object, str]]) -> None:
    """Every case gets a 4xx with an OpenAI-style error naming the problem, and the replica is never restarted."""
    before = replica(url)
    for route, body, message in cases:
        if isinstance(body, str):
            r = requests.post(
                f"{url}{route}", data=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=30
            )
        else:
            r = post(url, route, body)
        assert 400 <= r.status_code < 500, (body, r.text)
        error = r.json()["error"]
        assert message in error["message"] or message == error["param"], (body, error)
        assert {"message", "type", "param", "code"} <= set(error)
    assert replica(url) == before, "a bad request restarted the decoder replica"
    assert post(url, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_bad_input_gets_an_openai_style_4xx(tiny_app):
    check_refusals(tiny_app, bad_inputs(256, 64))


def test_an_oversized_body_gets_413_unread(tiny_app):
    before = replica(tiny_app)
    huge = {"prompt": "x" * (2 << 20), "max_tokens": 2}  # 2 MiB > serve.max_request_bytes (1 MiB)
    r = post(tiny_app, "/v1/completions", huge)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
    chunked = requests.post(  # no Content-Length: counted as it arrives
        f"{tiny_app}/v1/completions", data=iter([b'{"prompt": "', b"y" * (2 << 20), b'"}']),
        headers={**AUTH, "Content-Type": "application/json"}, timeout=CLIENT_TIMEOUT_S,
    )  # fmt: skip
    assert chunked.status_code == 413, chunked.text[:300]
    assert replica(tiny_app) == before


def test_a_tiny_temperature_decodes_greedily_instead_of_failing(tiny_app):
    """1e-40 used to overflow logits / T (NaN, a 500); below 1e-5 a request decodes greedily, as on vLLM."""
    raw = {"prompt": "The weather today", "max_tokens": 8, "return_token_ids": True}
    greedy = post(tiny_app, "/v1/completions", {**raw, "temperature": 0}).json()["choices"][0]["token_ids"]
    tiny = post(tiny_app, "/v1/completions", {**raw, "temperature": 1e-40})
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["token_ids"] == greedy


def test_a_failure_in_mid_generation_is_an_openai_error(tiny_app):
    body = {"prompt": FAIL_MIDWAY, "max_tokens": 8, "temperature": 0}
    whole = post(tiny_app, "/v1/completions", body)
    assert whole.status_code == 500 and whole.json()["error"]["type"] == "server_error", whole.text[:300]
    with post(tiny_app, "/v1/completions", {**body, "stream": True}, stream=True) as r:
        chunks = events(r)
    assert chunks[-1]["error"]["type"] == "server_error"
    assert post(tiny_app, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_health_names_no_path_and_the_cost_policy_is_ready_for_any_request(tiny_app):
    """/health needs no key, so it shows no file path; the cost policy's costs were measured at start up to
    max_gamma (not only serve.gamma), so a request may ask for it without stalling the replica."""
    health = requests.get(f"{tiny_app}/health", timeout=30).json()
    assert "draft" not in health and "/" not in json.dumps({k: v for k, v in health.items() if k != "model"})
    assert health["cost_policy_max_gamma"] == 8 > health["gamma"]
    r = post(tiny_app, "/v1/completions", {"prompt": "Hello", "max_tokens": 8, "gamma_policy": "cost"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_api_keys_are_compared_in_constant_time_against_every_key(monkeypatch):
    import hmac

    from fastdraft_ray.serve import app

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(app.hmac, "compare_digest", lambda a, b: calls.append(b) or real(a, b))
    assert app.key_matches("k1", ["k1", "k2", "k3"]) and calls == [b"k1", b"k2", b"k3"]  # no early exit
    assert not app.key_matches("k", ["k1", "k2"])


def test_stream_matches_the_whole_response_and_target_only_is_lossless(tiny_app):
    whole = post(tiny_app, "/v1/chat/completions", chat("Tell me a story", return_token_ids=True)).json()
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "length" and whole["usage"]["completion_tokens"] == 12
    assert whole["usage"]["speculative"]["mode"] == "speculative" and whole["usage"]["speculative"]["proposed"] > 0
    with post(tiny_app, "/v1/chat/completions", chat("Tell me a story", stream=True), stream=True) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = events(r)
    assert chunks[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
    assert text == choice["message"]["content"] and chunks[-2]["choices"][0]["finish_reason"] == "length"

    baseline = post(
        tiny_app, "/v1/chat/completions", chat("Tell me a story", speculative=False, return_token_ids=True)
    )
    assert baseline.json()["usage"]["speculative"] == {**baseline.json()["usage"]["speculative"], "proposed": 0}
    assert baseline.json()["choices"][0]["token_ids"] == choice["token_ids"], "speculation changed the output"

    raw = {"prompt": "def add(a, b):", "max_tokens": 10, "temperature": 0}
    whole = post(tiny_app, "/v1/completions", raw).json()["choices"][0]["text"]
    body = {**raw, "stream": True, "stream_options": {"include_usage": True}}
    with post(tiny_app, "/v1/completions", body, stream=True) as r:
        chunks = events(r)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-2]) == whole
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 10


def test_stop_strings_seeds_and_gamma(tiny_app):
    raw = {"prompt": "The weather today", "max_tokens": 16, "temperature": 0}
    text = post(tiny_app, "/v1/completions", raw).json()["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = post(tiny_app, "/v1/completions", {**raw, "stop": [stop]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == text[: text.index(stop)]

    sampled = {**raw, "temperature": 1.0, "seed": 7}
    first, again = (post(tiny_app, "/v1/completions", sampled).json() for _ in range(2))
    assert first["choices"][0]["text"] == again["choices"][0]["text"]
    other = post(tiny_app, "/v1/completions", {**sampled, "seed": 8}).json()["choices"][0]["text"]
    assert other != first["choices"][0]["text"]

    one = post(tiny_app, "/v1/completions", {**raw, "gamma": 1}).json()
    assert one["choices"][0]["text"] == text and one["usage"]["speculative"]["proposed"] <= 16


def test_openai_client_streams(tiny_app):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{tiny_app}/v1", api_key=API_KEY, timeout=CLIENT_TIMEOUT_S)
    whole = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=10, temperature=0
    )
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=10, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole.choices[0].message.content and whole.usage.completion_tokens == 10
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{tiny_app}/v1", api_key="wrong").models.list()


def test_64_concurrent_requests_complete(tiny_app):
    before = replica(tiny_app)
    bodies = [chat(f"Request number {i}", max_tokens=16, stream=i % 2 == 0) for i in range(64)]

    def send(body):
        r = post(tiny_app, "/v1/chat/completions", body, stream=body["stream"])
        return r.status_code, (events(r)[-1] if body["stream"] else r.json()["choices"][0]["finish_reason"])

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(send, bodies))
    assert all(status == 200 for status, _ in results), results
    assert all(end in ("[DONE]", "length", "stop") for _, end in results), results
    assert replica(tiny_app) == before


def test_full_queue_answers_503_with_retry_after(tight_app, serve_instance):
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: post(tight_app, "/v1/completions", body, headers={}), range(6)))
    codes = sorted(a.status_code for a in answers)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.headers["Retry-After"] == "2" and refused.json()["error"]["code"] == "queue_full"
    counted = scrape(
        serve_instance[1], "ray_fastdraft_refused_requests_total", until=lambda v: sum(v.values()) > 0
    )
    assert sum(counted.values()) >= codes.count(503)
