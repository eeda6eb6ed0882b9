"""Training throughput: a plain single-process PyTorch loop (2 threads) vs this stack (Ray Train V2, 2 workers x
1 thread, DeepSpeed ZeRO-2), same draft, same data, same global batch and step count.

    python benchmarks/bench_train.py [--steps 8 --seq-len 256 --micro-batch 4 --target embedded:smollm2-135m-instruct]

Prints steady-state tokens/s of each (steps after the first ``--warmup`` excluded), their ratio (goal >= 0.9),
end-to-end wall time (start-up included) and peak resident memory (the stack: the largest worker), and writes
``benchmarks/results/train_<date>.md``. The draft is the recipe's default shape derived from the target, so with
the embedded target this also measures the real 49,152-token vocabulary's cost; token ids are random (throughput
does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # the repository on sys.path and the offline hub, before any model library loads
import numpy as np

# isort: split


def plain_loop(
    init_dir: str,
    data_dir: str,
    steps: int,
    rows_per_step: int,
    warmup: int,
    threads: int,
    lr: float,
    warmup_steps: int = 2,
    min_lr_ratio: float = 0.1,
):
    """The baseline: one process, ``threads`` torch threads, torch AdamW, the same schedule and clipping."""
    import pyarrow.parquet as pq
    import torch

    from fastdraft_ray.models.draft import load_draft
    from fastdraft_ray.train.deepspeed import lr_ratio
    from fastdraft_ray.train.losses import lm_loss

    start = time.perf_counter()
    torch.set_num_threads(threads)
    model = load_draft(init_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    # the stack's schedule (train/deepspeed.lr_ratio), so the two loops differ only in how they run
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_ratio(s, warmup_steps=warmup_steps, total_steps=steps, min_ratio=min_lr_ratio)
    )
    files = sorted(Path(data_dir, "train").glob("*.parquet"))
    rows = np.concatenate([np.stack(pq.read_table(f)["input_ids"].to_numpy(zero_copy_only=False)) for f in files])
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = torch.from_numpy(rows[step * rows_per_step : (step + 1) * rows_per_step].astype(np.int32))
        loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    seq_len = rows.shape[1] - 1
    return {
        "tokens_per_s": rows_per_step * seq_len * (steps - warmup) / sum(times[warmup:]),
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": loss.item(),
    }


def stack(cfg, data_dir: str, trace_dir: Path, warmup: int, tokens_per_step: int):
    """This stack: ``train_stage`` on a private local Ray (2 workers + 1 logical CPU for data reads)."""
    import ray

    from fastdraft_ray.train.loop import Hooks
    from fastdraft_ray.train.run import train_stage

    start = time.perf_counter()
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray runs workers at nice 15: same priority as the baseline
    ray.init(
        num_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker + 1,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        record = train_stage(cfg, data_dir, hooks=Hooks(trace_dir=str(trace_dir)))
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    traces = {
        p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in trace_dir.glob("rank*.jsonl")
    }
    # a step ends when its slowest worker is done (the all-reduce waits for it)
    step_s = [max(recs[i]["seconds"] for recs in traces.values()) for i in range(len(traces["rank0"]))]
    return {
        "tokens_per_s": tokens_per_step * (len(step_s) - warmup) / sum(step_s[warmup:]),
        "wall_s": wall,
        "peak_rss_mb": max(recs[-1]["peak_rss_mb"] for recs in traces.values()),
        "final_loss": record["metrics"]["train/loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu_default")
    parser.add_argument("--target", default=None, help="override model.target")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per worker per step (plain: x2)")
    parser.add_argument("--out", default=str(harness.result_path("train")))
    parser.add_argument("--_plain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._plain:  # child process: the baseline, so its peak memory is its own
        print(json.dumps(plain_loop(**json.loads(args._plain))))
        return

    from fastdraft_ray.config import load_config, stage_config
    from fastdraft_ray.data.synthetic import write_shards
    from fastdraft_ray.models.target import load_tokenizer, tokenizer_fingerprint
    from fastdraft_ray.train.run import prepare_init

    load_before = os.getloadavg()[0]
    workers, rows_per_step = 2, 2 * args.micro_batch
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    overrides = [
        f"storage={work}",
        "run_name=bench",
        f"train.num_workers={workers}",
        "train.cpus_per_worker=1",
        "train.zero_stage=2",
        "train.precision=fp32",
        f"train.micro_batch_size={args.micro_batch}",
        "train.grad_accum_steps=1",
        f"train.token_budget={args.steps * rows_per_step * args.seq_len}",
        "train.warmup_steps=2",
        f"train.eval_every={10**9}",
        f"train.checkpoint_every={10**9}",
        "train.val_rows=0",
        "train.log_every=1",
        "draft.head_vocab_from=",  # a trimmed head counts its kept tokens on the benchmark's own shards
    ] + ([f"model.target={args.target}"] if args.target else [])
    cfg = stage_config(load_config(args.config, overrides), "pt")
    tokenizer = load_tokenizer(cfg.model.target)
    data_dir = write_shards(
        work / "data",
        tokenizer_hash=tokenizer_fingerprint(tokenizer),
        vocab_size=len(tokenizer),
        seq_len=args.seq_len,
        train_rows=args.steps * rows_per_step,
        val_rows=0,
        rows_per_shard=64,
    )
    init_dir = prepare_init(cfg, work / "bench" / "pt" / "init", None, str(data_dir))

    plain_args = {
        "init_dir": str(init_dir),
        "data_dir": str(data_dir),
        "steps": args.steps,
        "warmup": args.warmup,
        "rows_per_step": rows_per_step,
        "threads": 2,
        "lr": cfg.train.lr,
        "warmup_steps": cfg.train.warmup_steps,
        "min_lr_ratio": cfg.train.min_lr_ratio,
    }
    out = subprocess.run(
        [sys.executable, __file__, "--_plain", json.dumps(plain_args)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(harness.ROOT)},
    )
    plain = json.loads(out.stdout.strip().splitlines()[-1])
    trace_dir = work / "trace"
    trace_dir.mkdir()
    ours = stack(cfg, str(data_dir), trace_dir, args.warmup, rows_per_step * args.seq_len)

    ratio = ours["tokens_per_s"] / plain["tokens_per_s"]
    params = sum(
        p.numel()
        for p in __import__("fastdraft_ray.models.draft", fromlist=["x"]).load_draft(init_dir).parameters()
    )
    lines = [
        f"# Training throughput, {harness.now()}",
        "",
        f"Draft: {cfg.draft.num_layers} layers x {cfg.draft.hidden_size} hidden, vocab {len(tokenizer):,}, "
        f"{params / 1e6:.1f}M params (target {cfg.model.target}). {args.steps} steps of {rows_per_step} rows x "
        f"{args.seq_len} tokens (global batch {rows_per_step * args.seq_len:,} tokens); tokens/s excludes the first "
        f"{args.warmup} steps. Machine: {os.cpu_count()} CPUs, load average before the run {load_before:.2f}, after {os.getloadavg()[0]:.2f} (1 min).",
        "",
        harness.table(
            ["run", "tokens/s", "wall s (incl. start-up)", "peak RSS MB", "final loss"],
            [
                ["plain PyTorch, 1 process x 2 threads", f"{plain['tokens_per_s']:,.0f}", f"{plain['wall_s']:.1f}"]
                + [f"{plain['peak_rss_mb']:,.0f}", f"{plain['final_loss']:.3f}"],
                ["Ray Train V2 + DeepSpeed ZeRO-2, 2 workers x 1 thread", f"{ours['tokens_per_s']:,.0f}"]
                + [
                    f"{ours['wall_s']:.1f}",
                    f"{ours['peak_rss_mb']:,.0f} (per worker)",
                    f"{ours['final_loss']:.3f}",
                ],
            ],
            "lrrrr",
        ),
        "",
        f"**Ratio stack / plain = {ratio:.2f}** (goal >= 0.9).",
        "",
        f"Command: `python benchmarks/bench_train.py --steps {args.steps} --seq-len {args.seq_len} "
        f"--micro-batch {args.micro_batch}`",
    ]
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
