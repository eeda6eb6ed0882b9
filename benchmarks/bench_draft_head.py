"""Cost of the draft's output head: decode-step latency and training throughput vs head size K.

    python benchmarks/bench_draft_head.py [--data runs/cpu_default/data/pt] [--draft runs/cpu_default/cp/export]
                                          [--ks 4096 8192 16384 0] [--threads 1] [--repeats 3]

For each draft shape (default 4x256 and 2x192, derived from the real target SmolLM2-135M-Instruct) and each K
(0 = the full 49,152-token head, tied like the target), a randomly initialised draft is timed:

- decode step: one token with a warm KV cache (128-token prefill), ``logits_to_keep=1``, FULL-vocabulary
  output (the -inf scatter included: what the speculative decoding engine pays); median of 64 steps;
- training: forward + backward of ``lm_loss`` on a batch of 8 x 256 tokens (trimmed drafts score K-wide
  logits), tokens/s; median of 3 iterations after a warm-up.

Configurations are interleaved and the best of ``--repeats`` rounds kept (other processes add noise). The kept
set is counted on ``--data`` (coverage of each K on that data is printed) or, without data, the lowest ids.
``--draft PATH`` also measures greedy acceptance (gamma 3) of a TRAINED full-head draft and its trimmed copies
on held-out instruction prompts with the real target: the acceptance a trimmed head gives up. Writes
``benchmarks/results/draft_head_<date>.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import harness  # the repository on sys.path and the offline hub, before any model library loads

# isort: split

import numpy as np
import torch
from transformers import DynamicCache

from fastdraft_ray.config import DraftConfig
from fastdraft_ray.models.draft import count_params, new_draft
from fastdraft_ray.models.target import load_target_config, load_tokenizer
from fastdraft_ray.models.vocab import coverage, kept_token_ids, special_token_ids, token_counts
from fastdraft_ray.train.losses import lm_loss

TARGET = "embedded:smollm2-135m-instruct"
SHAPES = {
    "4x256": DraftConfig(),
    "2x192": DraftConfig(num_layers=2, hidden_size=192, num_heads=3, num_kv_heads=1, intermediate_size=512),
}


@torch.inference_mode()
def decode_step_ms(model, steps: int = 64, prefill: int = 128) -> float:
    """Median ms of one cached single-token forward (full-vocabulary logits of the last position)."""
    gen = torch.Generator().manual_seed(0)
    cache = DynamicCache(config=model.config)
    ids = torch.randint(100, 5000, (1, prefill), generator=gen)
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    times = []
    for i in range(steps):
        tok = torch.tensor([[100 + i]])
        t0 = time.perf_counter()
        model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1).logits.argmax()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def train_tokens_per_s(model, batch: int = 8, seq: int = 256, iters: int = 3) -> float:
    """Tokens/s of forward + backward of the training loss (median of ``iters`` after one warm-up)."""
    model.train()
    rows = torch.randint(100, 5000, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    times = []
    for i in range(iters + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        lm_loss(model, rows).backward()
        if i:
            times.append(time.perf_counter() - t0)
    model.eval()
    return batch * seq / statistics.median(times)


def acceptance(target, tokenizer, drafts: dict, prompts: int, new_tokens: int) -> dict[str, float]:
    """Greedy acceptance rate (gamma 3) of each draft on held-out instruction prompts."""
    from fastdraft_ray.config import DecodeConfig
    from fastdraft_ray.data.tasks import load_tasks
    from fastdraft_ray.specdec.engine import SpecDecoder

    items = load_tasks(tokenizer, ["instruction"], prompts_per_task=prompts)["instruction"]
    out = {}
    for name, draft in drafts.items():
        acc = prop = 0
        decoder = SpecDecoder(target, draft, DecodeConfig(gamma=3, temperature=0.0, stop_at_eos=False))
        for item in items:
            stats = decoder.generate(item.input_ids, max_new_tokens=new_tokens).stats
            acc, prop = acc + stats.accepted, prop + stats.proposed
        out[name] = acc / max(prop, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", default=str(harness.ROOT / "runs/cpu_default/data/pt"), help="shard or KD folder to count"
    )
    ap.add_argument("--ks", type=int, nargs="+", default=[4096, 8192, 16384, 0], help="head sizes (0 = full)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft", default="", help="trained full-head draft: also measure acceptance of its trims")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    target_cfg = load_target_config(TARGET)
    tokenizer = load_tokenizer(TARGET)
    vocab = target_cfg.vocab_size
    if Path(args.data).exists():
        counts, counted_on = token_counts(args.data, vocab), args.data
    else:
        counts, counted_on = np.arange(vocab, 0, -1), "none (lowest ids as a proxy)"
    specials = special_token_ids(tokenizer, target_cfg)
    kept = {k: kept_token_ids(counts, k, specials) for k in args.ks if k}

    models = {}
    for shape_name in args.shapes:
        for k in args.ks:
            shape = DraftConfig(**{**SHAPES[shape_name].__dict__, "head_vocab": k})
            models[(shape_name, k)] = new_draft(target_cfg, shape, seed=0, kept_ids=kept.get(k))
    step: dict = {key: float("inf") for key in models}
    train: dict = {key: 0.0 for key in models}
    for r in range(args.repeats):
        for key, model in models.items():  # interleaved: load from other processes spreads over all configs
            step[key] = min(step[key], decode_step_ms(model))
            train[key] = max(train[key], train_tokens_per_s(model))
        print(f"round {r + 1}/{args.repeats} done", flush=True)

    lines = [
        f"# Draft output-head size vs cost ({harness.today()})",
        "",
        f"Command: `python benchmarks/bench_draft_head.py {' '.join(sys.argv[1:])}`".rstrip() + "  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {args.threads} torch thread(s); best of {args.repeats} interleaved rounds. "
        "Shared machine: other jobs were running, numbers are noisy.  ",
        f"Kept sets counted on: {counted_on} ({int(counts.sum()):,} tokens); {len(specials)} special tokens always "
        "kept. Random-weight drafts (cost does not depend on the weights).",
        "",
    ]
    table = []
    for (shape_name, k), model in models.items():
        pc = count_params(model)
        full = (shape_name, 0) if (shape_name, 0) in models else None
        cov = f"{100 * coverage(counts, kept[k]):.2f}%" if k else "100%"
        ratio_step = f"{step[full] / step[(shape_name, k)]:.2f}x" if full else "-"
        ratio_train = f"{train[(shape_name, k)] / train[full]:.2f}x" if full else "-"
        table.append(
            [shape_name, k or f"full ({vocab:,})", f"{pc.total / 1e6:.1f}", f"{pc.embedding / pc.total:.0%}", cov]
            + [f"{step[(shape_name, k)]:.2f}", ratio_step, f"{train[(shape_name, k)]:,.0f}", ratio_train]
        )
    head = ["shape", "head K", "params (M)", "head+emb share", "coverage", "decode step ms", "vs full"]
    lines.append(harness.table([*head, "train tok/s", "vs full"], table))
    if args.draft:
        from fastdraft_ray.models.draft import load_draft
        from fastdraft_ray.models.target import load_target
        from fastdraft_ray.models.vocab import trim_draft

        target, _ = load_target(TARGET)
        trained = load_draft(args.draft)
        drafts = {"full": trained, **{f"K={k}": trim_draft(trained, kept[k]) for k in args.ks if k}}
        rates = acceptance(target, tokenizer, drafts, args.prompts, args.max_new_tokens)
        lines += [
            "",
            f"Greedy acceptance (gamma 3, {args.prompts} held-out instruction prompts x {args.max_new_tokens} "
            f"tokens) of the trained draft `{args.draft}` and its trimmed copies (no retraining):",
            "",
            harness.table(["draft head", "acceptance rate"], [[n, f"{r:.3f}"] for n, r in rates.items()]),
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out or harness.result_path("draft_head"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
