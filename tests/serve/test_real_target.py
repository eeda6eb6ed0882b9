"""The Serve app on the real embedded target with a draft derived from it (24 of its 30 layers: six middle ones
dropped, so it is accepted about a third of the time and rejected the rest): greedy chat and raw
completions give exactly the target's own greedy text, streams concatenate to it, the acceptance counters on Ray's
Prometheus endpoint count what the responses reported, a client that leaves cancels its generation, and the
evaluation harness run through the endpoint gets the in-process tokens, alpha and tau."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

from fastdraft_ray.config import ConfigError, DraftConfig, load_config
from fastdraft_ray.evaluate.run import evaluate
from fastdraft_ray.models.draft import new_draft, save_draft
from fastdraft_ray.models.prompting import render_prompt
from tests.serve.conftest import API_KEY, deploy, scrape
from tests.serve.test_app import bad_inputs, check_refusals, events, post

pytestmark = pytest.mark.real_target
ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
NEW = 20
QUESTION = "What are three good habits for writing clear code?"
CODE = "def fibonacci(n):\n    "


@pytest.fixture(scope="module")
def real_draft(smollm2, tmp_path_factory) -> str:
    target, tokenizer = smollm2
    layers = [*range(12), *range(18, 30)]
    shape = DraftConfig(num_layers=len(layers), init="layers", init_layers=layers)
    draft = new_draft(target.config, shape, target_model=target)
    return str(save_draft(draft, tokenizer, tmp_path_factory.mktemp("serve") / "draft"))


@pytest.fixture(scope="module")
def real_app(serve_instance, real_draft):
    settings = ["serve.threads=1", "serve.gamma=2", f"serve.api_keys=[{API_KEY}]", "serve.max_tokens_limit=384"]
    return deploy(serve_instance, "real", [f"serve.draft={real_draft}", *settings, "serve.max_prompt_tokens=1024"])


def test_bad_inputs_and_a_wrong_key_are_refused_by_the_real_app(real_app):
    check_refusals(real_app, bad_inputs(384, 1024))
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = post(real_app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def target_greedy(smollm2, ids: list[int]) -> list[int]:
    """The target's own greedy continuation (transformers' generate), stop token included."""
    target, tokenizer = smollm2
    with torch.inference_mode():
        out = target.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def test_greedy_chat_and_completion_equal_the_target_and_streams_match(real_app, smollm2):
    tokenizer = smollm2[1]
    chat = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": NEW, "temperature": 0}
    raw = {"prompt": CODE, "max_tokens": NEW, "temperature": 0}
    cases = [
        ("/v1/chat/completions", chat, render_prompt(tokenizer, QUESTION)[1], lambda c: c["message"]["content"]),
        ("/v1/completions", raw, render_prompt(tokenizer, CODE, chat=False)[1], lambda c: c["text"]),
    ]
    for route, body, prompt_ids, text_of in cases:
        whole = post(real_app, route, {**body, "return_token_ids": True}).json()
        choice = whole["choices"][0]
        reference = target_greedy(smollm2, prompt_ids)
        assert choice["token_ids"] == reference, route
        assert text_of(choice) == tokenizer.decode(reference, skip_special_tokens=True)
        assert whole["usage"]["prompt_tokens"] == len(prompt_ids)
        assert whole["usage"]["speculative"]["proposed"] > 0
        with post(real_app, route, {**body, "stream": True}, stream=True) as r:
            chunks = [c for c in events(r) if c != "[DONE]"]
        pieces = [
            c["choices"][0].get("delta", c["choices"][0]).get("content") or c["choices"][0].get("text", "")
            for c in chunks
        ]
        assert "".join(p or "" for p in pieces) == text_of(choice), route


def test_acceptance_counters_count_what_the_responses_report(real_app, serve_instance):
    def totals():
        out = {}
        for name in ("ray_spec_decode_num_draft_tokens_total", "ray_spec_decode_num_accepted_tokens_total"):
            series = scrape(serve_instance[1], name)
            out[name] = sum(v for k, v in series.items() if f'model="{MODEL}"' in k)
        return out

    before = totals()
    while True:  # the previous test's last counts may still be on their way (Ray exports every second)
        time.sleep(2.5)
        if (again := totals()) == before:
            break
        before = again
    usage = [
        post(
            real_app,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": q}], "max_tokens": 16, "temperature": 0},
        ).json()["usage"]["speculative"]  # fmt: skip
        for q in ("Name a color.", "Say hello in French.")
    ]
    proposed, accepted = sum(u["proposed"] for u in usage), sum(u["accepted"] for u in usage)
    assert proposed > 0

    def moved(_):
        now = totals()
        return (
            now["ray_spec_decode_num_draft_tokens_total"] - before["ray_spec_decode_num_draft_tokens_total"]
            == proposed
            and now["ray_spec_decode_num_accepted_tokens_total"]
            - before["ray_spec_decode_num_accepted_tokens_total"]
            == accepted
        )

    scrape(serve_instance[1], "ray_spec_decode_num_draft_tokens_total", until=moved)
    assert moved(None), (totals(), before, proposed, accepted)
    assert accepted > 0, "the derived draft should be accepted sometimes"
    per_pos = scrape(serve_instance[1], "ray_spec_decode_num_accepted_tokens_per_pos_total")
    assert any('position="0"' in k and f'model="{MODEL}"' in k for k in per_pos), per_pos


def relabel(series: list[tuple[str, dict]], rules: list[dict]) -> list[tuple[str, dict]]:
    """Prometheus's ``replace`` relabelling (the default action): the source labels joined by ';' must match the
    anchored regex; the target label gets the replacement with $1 / ${1} expanded."""
    out = []
    for name, labels in series:
        labels = {"__name__": name, **labels}
        for rule in rules:
            value = ";".join(labels.get(k, "") for k in rule["source_labels"])
            if match := re.fullmatch(rule["regex"], value):
                labels[rule["target_label"]] = re.sub(
                    r"\$\{?(\d+)\}?", lambda m: match.group(int(m[1])), rule["replacement"]
                )
        out.append((labels.pop("__name__"), labels))
    return out


def test_prometheus_rules_give_the_series_vllm_dashboards_query(real_app, serve_instance):
    post(real_app, "/v1/completions", {"prompt": CODE, "max_tokens": 16, "temperature": 0})
    wanted = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_accepted_tokens_per_pos")
    for _ in range(30):  # Ray exports every second
        text = requests.get(serve_instance[1], timeout=10).text
        series = [
            (m[1], dict(re.findall(r'(\w+)="([^"]*)"', m[2])))
            for m in re.finditer(r"^(ray_spec_decode_\w+)\{(.*)\} \S+$", text, re.M)
        ]
        if {name for name, _ in series} >= {f"ray_spec_decode_{w}_total" for w in wanted}:
            break
        time.sleep(1)
    config = yaml.safe_load((ROOT / "cluster" / "prometheus" / "vllm_names.yml").read_text())
    renamed = relabel(series, config["scrape_configs"][0]["metric_relabel_configs"])
    mine = [(name, labels) for name, labels in renamed if labels.get("model_name") == MODEL]
    assert {name for name, _ in mine} >= {f"vllm:spec_decode_{w}_total" for w in wanted}, renamed
    assert any("position" in labels for name, labels in mine if name.endswith("per_pos_total"))


def test_a_client_that_disconnects_stops_its_generation(real_app, serve_instance):
    """The client leaves after the first chunk of a 256-token generation: the request is counted as cancelled and
    the replica's generated-token counter stops growing far short of 256 more tokens."""

    def generated() -> float:
        series = scrape(serve_instance[1], "ray_fastdraft_generated_tokens_total")
        return sum(v for k, v in series.items() if f'model="{MODEL}"' in k)

    def cancelled(series: dict) -> float:
        return sum(x for k, x in series.items() if 'status="cancelled"' in k and f'model="{MODEL}"' in k)

    before, cancelled_before = (
        settled(generated),
        cancelled(scrape(serve_instance[1], "ray_fastdraft_requests_total")),
    )
    body = {"prompt": "A long story:", "max_tokens": 256, "temperature": 0, "stream": True}
    with post(real_app, "/v1/completions", body, stream=True) as r:
        next(r.iter_lines())  # the first chunk arrived: the generation is under way; leave
    series = scrape(
        serve_instance[1], "ray_fastdraft_requests_total", until=lambda v: cancelled(v) > cancelled_before,
        timeout_s=60,
    )  # fmt: skip
    assert cancelled(series) > cancelled_before, series
    after = settled(generated)
    assert after - before < 64, f"{after - before} tokens generated after the client left"


def settled(read, interval_s: float = 2.5, timeout_s: float = 60.0) -> float:
    """``read()`` once two reads ``interval_s`` apart agree (Ray exports counters every second)."""
    deadline, last = time.monotonic() + timeout_s, read()
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        if (now := read()) == last:
            return now
        last = now
    raise AssertionError(f"the counter kept moving for {timeout_s} s (last {last})")


def test_evaluation_through_http_gets_the_in_process_tokens_alpha_and_tau(real_app, real_draft, monkeypatch):
    monkeypatch.setenv("FASTDRAFT_API_KEY", API_KEY)
    cfg = load_config(
        "cpu_quick",
        [
            "evaluate.gamma_select=[]",
            "evaluate.baselines=[]",  # transformers' baselines run in-process only
            "evaluate.tasks=[story,code]",
            "evaluate.prompts_per_task=1",
            "evaluate.max_new_tokens=12",
            "evaluate.gamma=2",
            "evaluate.num_workers=1",
            "evaluate.cpus_per_worker=1",  # the server's thread count: the same float reductions
        ],
    )
    here = evaluate(cfg.model, [real_draft], cfg.evaluate)
    remote = evaluate(cfg.model, [real_draft], dataclasses.replace(cfg.evaluate, endpoint=real_app))
    keys = ("prompt_id", "mode", "gamma", "tokens", "proposed", "accepted", "steps", "rejected_steps")
    assert [{k: r[k] for k in keys} for r in remote.records] == [{k: r[k] for k in keys} for r in here.records]
    for a, b in zip(here.rows, remote.rows, strict=True):
        assert (a["task"], a["mode"]) == (b["task"], b["mode"])
        assert a["acceptance_rate"] == b["acceptance_rate"] and a["block_efficiency"] == b["block_efficiency"]
    assert remote.settings["endpoint"] == real_app
    with pytest.raises(ConfigError, match="gamma_select"):  # gammas are priced in-process: refused when built
        dataclasses.replace(cfg.evaluate, endpoint=real_app, gamma_select=[1, 2])
