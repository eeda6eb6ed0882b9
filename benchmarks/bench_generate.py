"""KD generation throughput: the batched actor-pool generator (Ray Data, left-padded KV-cached ``generate``) vs
one-prompt-at-a-time ``model.generate``, same target, same prompts, same token cap, greedy, same CPU count.

    python benchmarks/bench_generate.py [--prompts 32 --max-new-tokens 64 --batch-size 16 --actors 1 --cpus 1]

Baseline: one process with ``actors x cpus`` torch threads. Generated tokens/s counts response tokens (EOS
included) over pure generation time (model load excluded on both sides; the pool's Ray/actor start-up is
reported separately as end-to-end time). Prints the ratio and writes ``benchmarks/results/generate_<date>.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import harness  # the repository on sys.path and the offline hub, before any model library loads

# isort: split


def one_at_a_time(target: str, prompts: list[list[int]], max_new_tokens: int, threads: int) -> tuple[int, float]:
    """(generated tokens, seconds) of plain ``model.generate`` per prompt."""
    import torch

    from fastdraft_ray.models.batched import generate_batch
    from fastdraft_ray.models.prompting import pad_token_id, stop_token_ids
    from fastdraft_ray.models.target import load_target

    torch.set_num_threads(threads)
    model, tok = load_target(target)
    pad, eos = pad_token_id(tok), stop_token_ids(tok, model)
    start, tokens = time.perf_counter(), 0
    for p in prompts:
        ((ids, _),) = generate_batch(model, [p], temperature=0.0, max_new_tokens=max_new_tokens, pad=pad, eos=eos)
        tokens += len(ids)
    return tokens, time.perf_counter() - start


def actor_pool(args, out: Path) -> tuple[int, float, float]:
    """(generated tokens, generation seconds per actor, end-to-end seconds) of the Ray Data actor pool."""
    import ray

    from fastdraft_ray.config import load_config
    from fastdraft_ray.distill.generate import response_units, run_generation, run_units
    from fastdraft_ray.layout import RunLayout

    cfg = load_config(
        None,
        [
            f"model.target={args.target}",
            f"storage={out}",
            "run_name=bench",
            f"generate.num_prompts={args.prompts}",
            "generate.temperatures=[0.0]",
            f"generate.max_new_tokens={args.max_new_tokens}",
            f"generate.batch_size={args.batch_size}",
            f"generate.shard_prompts={max(1, args.prompts // args.actors)}",
            f"generate.num_actors={args.actors}",
            f"generate.cpus_per_actor={args.cpus}",
            "generate.prompt_sources={alpaca: 'embedded:alpaca'}",
        ],
    )
    ray.init(address="local", num_cpus=args.actors * args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        run_generation(cfg, max_units=0)  # fixes the prompt list only
        import pyarrow.parquet as pq

        kd = RunLayout.of(cfg).kd
        units = response_units(cfg, kd, pq.read_table(kd.prompts))
        start = time.perf_counter()
        summary = run_units(cfg, units, None)
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    tokens = sum(int(s["tokens"]) for s in summary)
    busy = sum(float(s["seconds"]) for s in summary) / args.actors
    return tokens, busy, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=1, help="CPUs (torch threads) per actor")
    args = parser.parse_args()

    from fastdraft_ray.distill.prompts import load_prompts
    from fastdraft_ray.models.target import load_tokenizer

    prompts = load_prompts(
        {"alpaca": "embedded:alpaca"}, load_tokenizer(args.target), args.prompts, max_prompt_tokens=384
    )
    with tempfile.TemporaryDirectory() as tmp:
        pool_tokens, pool_busy, pool_wall = actor_pool(args, Path(tmp))
    base_tokens, base_s = one_at_a_time(
        args.target, [p.prompt_ids for p in prompts], args.max_new_tokens, args.actors * args.cpus
    )
    base_tps, pool_tps = base_tokens / base_s, pool_tokens / pool_busy
    ratio = pool_tps / base_tps
    lines = [
        f"# KD generation throughput, {harness.today()}",
        "",
        f"target `{args.target}`, {args.prompts} alpaca prompts, greedy, max_new_tokens {args.max_new_tokens}, "
        f"batch {args.batch_size}, {args.actors} actor(s) x {args.cpus} CPU; baseline {args.actors * args.cpus} "
        "thread(s), one prompt at a time.",
        "",
        harness.table(
            ["generator", "generated tokens", "seconds", "tokens/s"],
            [
                ["one-at-a-time model.generate", base_tokens, f"{base_s:.1f}", f"{base_tps:.1f}"],
                ["batched actor pool (generation)", pool_tokens, f"{pool_busy:.1f}", f"{pool_tps:.1f}"],
                ["batched actor pool (end to end, actor start-up incl.)", pool_tokens, f"{pool_wall:.1f}"]
                + [f"{pool_tokens / pool_wall:.1f}"],
            ],
            "lrrr",
        ),
        "",
        f"**ratio (batched / one-at-a-time): {ratio:.2f}x** "
        f"(end to end: {pool_tokens / pool_wall / base_tps:.2f}x)",
        "",
        f"command: `python benchmarks/bench_generate.py {' '.join(sys.argv[1:])}`",
    ]
    report = "\n".join(lines)
    print(report)
    out = harness.result_path("generate")
    out.write_text(report + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
