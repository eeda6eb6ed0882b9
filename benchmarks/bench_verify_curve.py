"""What a verify step and a token of KD data cost on this machine (issue 16's measured facts, re-measured here).

1. The target's verify-cost curve v(k) = time to score k tokens in one forward / one decode step, on a warm KV
   cache of ``--context`` tokens, at 1 thread and at 2, ``--runs`` independent runs each (``stats.measure_verify_cost``,
   the function the evaluation and the cost policy use), with torch's linear (the baseline) and with the
   small-batch kernel (``decode.linear_kernel=auto``, ``specdec/kernels.py``) one after the other in each run.
   Printed: the step in ms and v(2..8) per run and kernel, and the kernel's step and verify costs relative to
   torch's (the time to score k tokens, kernel / torch).
2. Tokens per second of the target GENERATING (``distill.batched.generate_batch``, sampling T=1, 64-token prompts,
   32 new tokens) at batch 1, 16 and 64, and SCORING teacher-forced (one forward over batch x length, the full
   next-token distribution at every position) at 8 x 256 and 16 x 512 -- with the ratio score / generate.

    python benchmarks/bench_verify_curve.py                # ~5 min on a 2-core CPU
    python benchmarks/bench_verify_curve.py --runs 1 --quick
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import harness  # the repository on sys.path and the offline hub, before any model library loads

# isort: split

import torch

from fastdraft_ray.models.batched import generate_batch
from fastdraft_ray.models.prompting import pad_token_id, stop_token_ids
from fastdraft_ray.models.target import load_target
from fastdraft_ray.specdec.kernels import (
    small_batch_linear_op,
    use_small_batch_kernel,
    use_torch_linear,
)
from fastdraft_ray.specdec.stats import measure_verify_cost


def verify_curves(model, context: int, runs: int, threads: list[int], max_k: int) -> list[str]:
    lines = [
        f"verify-cost curve v(k), KV cache {context} tokens (median of 15 forwards per k, sizes interleaved; "
        "torch = torch's linear, kernel = decode.linear_kernel=auto)"
    ]
    ids = torch.randint(100, 20000, (1, context), generator=torch.Generator().manual_seed(0))
    kernels = ["torch", "kernel"] if small_batch_linear_op() is not None else ["torch"]
    for n in threads:
        torch.set_num_threads(n)
        for run in range(runs):
            times = {}
            for kernel in kernels:
                use_small_batch_kernel(model) if kernel == "kernel" else use_torch_linear(model)
                curve, step = measure_verify_cost(model, ids, max_k, repeats=15, warmup=3)
                times[kernel] = [v * step for v in curve]
                vs = "  ".join(f"v({k})={v:.2f}" for k, v in enumerate(curve, start=1) if k > 1)
                lines.append(f"  {n} thread(s), run {run + 1}, {kernel:>6}: step {step * 1e3:6.1f} ms  {vs}")
            if len(times) == 2:
                ratios = "  ".join(
                    f"k={k}: {b / a:.2f}" for k, (a, b) in enumerate(zip(*times.values(), strict=True), 1)
                )
                lines.append(f"  {n} thread(s), run {run + 1}, kernel time / torch time:  {ratios}")
    use_torch_linear(model)
    return lines


@torch.inference_mode()
def throughput(model, tokenizer, quick: bool) -> list[str]:
    torch.set_num_threads(os.cpu_count() or 1)
    pad, eos = pad_token_id(tokenizer), stop_token_ids(tokenizer, model)
    g = torch.Generator().manual_seed(1)
    lines = ["target throughput (all cores): generating vs scoring teacher-forced"]
    gen_rates = {}
    for batch in (1, 16) if quick else (1, 16, 64):
        prompts = torch.randint(100, 20000, (batch, 64), generator=g).tolist()
        torch.manual_seed(0)
        t0 = time.perf_counter()
        out = generate_batch(model, prompts, temperature=1.0, max_new_tokens=32, pad=pad, eos=eos)
        seconds = time.perf_counter() - t0
        tokens = sum(len(r) for r, _ in out)
        gen_rates[batch] = tokens / seconds
        lines.append(
            f"  generate batch {batch:>3}: {tokens:>5} tokens in {seconds:6.1f} s = {tokens / seconds:7.1f} tok/s"
        )
    for batch, length in ((8, 256),) if quick else ((8, 256), (16, 512)):
        ids = torch.randint(100, 20000, (batch, length), generator=g)
        model(input_ids=ids[:1, :32])  # warm
        t0 = time.perf_counter()
        model(input_ids=ids)
        seconds = time.perf_counter() - t0
        rate = batch * length / seconds
        best = max(gen_rates.values())
        lines.append(
            f"  score {batch} x {length}: {batch * length} positions in {seconds:5.1f} s = {rate:7.1f} tok/s "
            f"({rate / best:.1f}x the best generation rate)"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-k", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="fewer throughput points")
    args = ap.parse_args()
    model, tokenizer = load_target(args.target)
    header = [
        f"# bench_verify_curve {harness.now()} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at start",
        f"target {args.target}, fp32",
    ]
    lines = (
        header
        + verify_curves(model, args.context, args.runs, [1, 2], args.max_k)
        + throughput(model, tokenizer, args.quick)
    )
    lines.append(f"load average {os.getloadavg()[0]:.2f} at the end")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
