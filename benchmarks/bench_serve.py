"""Load test of the Serve app on loopback: requests of the four task families at several concurrencies against
the speculative mode, the target-only mode (the same app, ``"speculative": false``) and batched target-only
generation (``@serve.batch`` over one KV-cached ``generate`` call per batch: what a user would run instead at high
load), each with the same replicas and threads:

    python benchmarks/bench_serve.py --draft runs/cpu_default/ft/export --gamma 1

Prints, per mode and concurrency, throughput (generated tokens/s), p50/p95 latency, p50 time to first token,
errors and refusals (503), the ratios to target-only, and the concurrency at which speculation stops paying.
Writes ``benchmarks/results/serve_<date>.md``. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import harness  # the repository on sys.path and the offline hub, before any model library loads

# isort: split

import requests
from ray import serve
from starlette.requests import Request

from fastdraft_ray.config import load_config
from fastdraft_ray.data.tasks import load_tasks
from fastdraft_ray.models.target import load_tokenizer
from fastdraft_ray.serve.app import build_app

CLIENT_TIMEOUT_S = 900
PROMPTS_PER_TASK = 12  # distinct held-out prompts per family (the offline story source has 13)


@serve.deployment(max_ongoing_requests=128)
class BatchedTarget:
    """The target alone, requests batched (``serve.batch``): one left-padded ``generate`` call per batch."""

    def __init__(self, target: str, threads: int):
        import torch

        from fastdraft_ray.models.prompting import pad_token_id, stop_token_ids
        from fastdraft_ray.models.target import load_target

        torch.set_num_threads(threads)
        self.model, tokenizer = load_target(target)
        self.pad, self.eos = pad_token_id(tokenizer), stop_token_ids(tokenizer, self.model)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def generate(self, bodies: list[dict]) -> list[dict]:
        from fastdraft_ray.models.batched import generate_batch

        outs = generate_batch(
            self.model,
            [b["prompt"] for b in bodies],
            temperature=0.0,
            max_new_tokens=max(b["max_tokens"] for b in bodies),
            pad=self.pad,
            eos=self.eos,
        )
        return [{"token_ids": ids[: b["max_tokens"]]} for (ids, _), b in zip(outs, bodies, strict=True)]

    async def __call__(self, request: Request) -> dict:
        return await self.generate(await request.json())


def one_request(url: str, body: dict, stream: bool) -> dict:
    """Send one request; latency, time to first token, generated tokens, HTTP status."""
    start = time.perf_counter()
    try:
        r = requests.post(url, json={**body, "stream": stream}, stream=stream, timeout=CLIENT_TIMEOUT_S)
    except requests.RequestException as exc:
        return {"status": -1, "error": str(exc)}
    first, tokens = None, 0
    if r.status_code != 200:
        return {"status": r.status_code}
    if stream:
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
    else:
        tokens = len(r.json().get("token_ids") or r.json()["choices"][0]["token_ids"])
    latency = time.perf_counter() - start
    return {"status": 200, "latency": latency, "ttft": first if first is not None else latency, "tokens": tokens}


def load_level(url: str, bodies: list[dict], concurrency: int, stream: bool) -> dict:
    """``bodies`` sent with ``concurrency`` requests in flight; the level's summary."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda b: one_request(url, b, stream), bodies))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    q = lambda xs, p: statistics.quantiles(xs, n=20)[int(p * 20) - 1] if len(xs) > 1 else (xs or [0])[0]  # noqa: E731
    return {
        "requests": len(bodies),
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "p50_s": statistics.median([r["latency"] for r in ok]) if ok else 0.0,
        "p95_s": q([r["latency"] for r in ok], 0.95),
        "ttft_p50_s": statistics.median([r["ttft"] for r in ok]) if ok else 0.0,
        "errors": sum(r["status"] not in (200, 503) for r in results),
        "refused": sum(r["status"] == 503 for r in results),
        "wall_s": wall,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu_default")
    parser.add_argument("--draft", required=True)
    parser.add_argument("--gamma", type=int, default=1, help="draft tokens per step (the evaluation's selected γ)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, nargs="+", default=[8, 16, 64], help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2, help="decoder replicas, 1 CPU and 1 thread each")
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=args.replicas, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = load_config(
        args.config,
        [
            f"serve.draft={args.draft}",
            f"serve.gamma={args.gamma}",
            f"serve.num_replicas={args.replicas}",
            "serve.threads=1",
            f"serve.max_tokens_limit={args.max_tokens}",
            "serve.max_queued_requests=256",
        ],
    )
    tokenizer = load_tokenizer(cfg.model.target)
    per_task = min(-(-max(args.requests) // 4), PROMPTS_PER_TASK)
    by_task = list(load_tasks(tokenizer, cfg.evaluate.tasks, per_task, seed=1).values())
    mixed = [ps[i] for i in range(per_task) for ps in by_task]  # the families interleaved
    prompts = [mixed[i % len(mixed)] for i in range(max(args.requests))]  # cycled when more requests than prompts
    body = {"max_tokens": args.max_tokens, "temperature": 0}
    levels = list(zip(args.concurrency, args.requests, strict=True))
    base = f"http://127.0.0.1:{port}"
    results: dict[tuple[str, int], dict] = {}
    serve.run(build_app(cfg), name="spec", route_prefix="/spec")
    for mode, speculative in (("speculative", True), ("target-only", False)):
        for conc, n in levels:
            bodies = [{**body, "prompt": list(p.input_ids), "speculative": speculative} for p in prompts[:n]]
            bodies = [{**b, "stream_options": {"include_usage": True}} for b in bodies]
            results[(mode, conc)] = load_level(f"{base}/spec/v1/completions", bodies, conc, stream=True)
            print(mode, conc, results[(mode, conc)], flush=True)
    serve.delete("spec")
    batched = BatchedTarget.options(num_replicas=args.replicas, ray_actor_options={"num_cpus": 1})
    serve.run(batched.bind(cfg.model.target, 1), name="batched", route_prefix="/batched")
    for conc, n in levels:
        bodies = [{"prompt": list(p.input_ids), "max_tokens": args.max_tokens} for p in prompts[:n]]
        results[("batched target-only", conc)] = load_level(f"{base}/batched", bodies, conc, stream=False)
        print("batched", conc, results[("batched target-only", conc)], flush=True)
    serve.shutdown()
    ray.shutdown()

    lines = [
        "# Serve load test (loopback)",
        "",
        f"`python benchmarks/bench_serve.py --draft {args.draft} --gamma {args.gamma} --concurrency "
        f"{' '.join(map(str, args.concurrency))} --requests {' '.join(map(str, args.requests))} --max-tokens "
        f"{args.max_tokens} --replicas {args.replicas}`",
        "",
        harness.machine(),
        "",
        f"{args.replicas} replicas × 1 CPU × 1 thread per mode; greedy, {args.max_tokens} new tokens; prompts of the "
        f"four task families interleaved; client timeout {CLIENT_TIMEOUT_S} s.",
        "",
    ]
    table = []
    for (mode, conc), r in results.items():
        ratio = r["tokens_per_s"] / results[("target-only", conc)]["tokens_per_s"]
        table.append(
            [mode, conc, r["requests"], f"{r['tokens_per_s']:.1f}", f"{ratio:.2f}×", f"{r['p50_s']:.2f}"]
            + [f"{r['p95_s']:.2f}", f"{r['ttft_p50_s']:.2f}", r["errors"], r["refused"]]
        )
    head = ["mode", "concurrency", "requests", "tok/s", "× target-only", "p50 latency s", "p95 latency s"]
    lines.append(harness.table([*head, "p50 TTFT s", "errors", "refused"], table, "l" + "r" * 9))
    losing = [
        c
        for c, _ in levels
        if results[("speculative", c)]["tokens_per_s"] < results[("target-only", c)]["tokens_per_s"]
    ]
    beaten = [
        c
        for c, _ in levels
        if results[("speculative", c)]["tokens_per_s"] < results[("batched target-only", c)]["tokens_per_s"]
    ]
    lines += [
        "",
        f"Speculation is slower than the target alone at concurrency {losing or 'none'}; batched target-only "
        f"generation out-serves it at concurrency {beaten or 'none'}.",
    ]
    harness.result_path("serve").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
