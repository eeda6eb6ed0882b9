"""Benchmark: this Ray Data prepare pipeline vs ``datasets.Dataset.map(batched=True, num_proc=2)`` + the same packing.

Same corpus (real embedded prose written to JSON lines), same tokenizer (SmolLM2), same packing and shard
writing. Each pipeline runs in a fresh subprocess; the parent samples the proportional set size (PSS) of that
process and all its descendants (Ray's raylet, workers and actors; the datasets worker processes) and reports
the peak. Runs at 1x and 4x corpus size (the 4x corpus repeats the documents with a distinct first line each,
so exact dedup keeps them).

    python benchmarks/bench_prepare.py [--mb 4] [--scales 1 4] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # the repository on sys.path and the offline hub, before any model library loads

# isort: split
TOKENIZER = "embedded:smollm2-135m-instruct"
SEQ_LEN = 512


def build_corpus(path: Path, mb: float, scale: int) -> int:
    """Write ``scale`` copies of ~``mb`` MB of embedded prose as JSON lines; returns the byte count."""
    from fastdraft_ray.data.sources import iter_documents

    docs, size = [], 0
    for doc in iter_documents("embedded:text", reserved=False):
        docs.append(doc.text)
        size += len(doc.text.encode())
        if size >= mb * 1e6:
            break
    with open(path, "w") as fh:
        for copy in range(scale):
            for i, text in enumerate(docs):
                fh.write(json.dumps({"text": f"[copy {copy} doc {i}]\n{text}"}) + "\n")
    return path.stat().st_size


def run_ray(corpus: str, out: str) -> dict:
    import ray

    from fastdraft_ray.config import DataConfig
    from fastdraft_ray.data.prepare import prepare

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a shared cluster
    data = DataConfig(
        sources={"bench": corpus},
        token_budget=10**12,
        seq_len=SEQ_LEN,
        val_fraction=0.0,
        rows_per_shard=2048,
        num_tokenizer_actors=2,
    )
    t0 = time.perf_counter()
    manifest = prepare(data, TOKENIZER, out, progress=False)
    seconds = time.perf_counter() - t0
    return {"tokens": manifest["tokens"]["train"], "seconds": seconds}


def run_hf(corpus: str, out: str) -> dict:
    import datasets
    import numpy as np

    from fastdraft_ray.data.packing import Packer, ShardWriter
    from fastdraft_ray.models.target import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    eos = tok.eos_token_id
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=f"{out}/hf_cache")
    ds = ds.map(
        lambda b: {"ids": tok(b["text"], add_special_tokens=False)["input_ids"]},
        batched=True,
        num_proc=2,
        remove_columns=ds.column_names,
    )
    packer, writer = Packer(SEQ_LEN + 1), ShardWriter(out, "train", 2048)
    for batch in ds.iter(batch_size=256):
        for ids in batch["ids"]:
            packer.add(np.asarray(ids + [eos], dtype=np.int32), "bench")
        writer.add(packer.pop_rows())
    writer.flush()
    seconds = time.perf_counter() - t0
    return {"tokens": sum(s["rows"] for s in writer.shards) * (SEQ_LEN + 1), "seconds": seconds}


def measure(which: str, corpus: str) -> dict:
    """Run one pipeline in a subprocess; sample the PSS of its process tree."""
    import psutil

    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        proc = subprocess.Popen(
            [sys.executable, __file__, "--run", which, "--corpus", corpus, "--work", out],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                break
            peak = max(peak, total)
            time.sleep(0.25)
        stdout = proc.stdout.read()
        if proc.returncode != 0:
            raise RuntimeError(f"{which} pipeline failed (exit {proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "peak_pss_mb": peak / 2**20, "tokens_per_s": result["tokens"] / result["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=4.0, help="corpus size at 1x, in MB of text")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--out", default=str(harness.RESULTS))
    parser.add_argument("--run", choices=["ray", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # child process
        result = (run_ray if args.run == "ray" else run_hf)(args.corpus, args.work)
        print(json.dumps(result))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in args.scales:
            corpus = Path(tmp) / f"corpus_{scale}x.jsonl"
            nbytes = build_corpus(corpus, args.mb, scale)
            ray_r, hf_r = measure("ray", str(corpus)), measure("hf", str(corpus))
            rows.append((scale, nbytes, ray_r, hf_r))
            print(
                f"{scale}x ({nbytes / 1e6:.1f} MB): ray {ray_r['tokens_per_s']:,.0f} tok/s, peak {ray_r['peak_pss_mb']:.0f} MB"
                f" | datasets.map {hf_r['tokens_per_s']:,.0f} tok/s, peak {hf_r['peak_pss_mb']:.0f} MB"
                f" | ratio {ray_r['tokens_per_s'] / hf_r['tokens_per_s']:.2f}",
                flush=True,
            )
    lines = [
        f"# bench_prepare — {harness.now()}",
        "",
        f"`python benchmarks/bench_prepare.py --mb {args.mb} --scales {' '.join(map(str, args.scales))}` — "
        f"{os.cpu_count()} CPUs, tokenizer {TOKENIZER}, seq_len {SEQ_LEN}. Ray: `prepare()` with 2 tokenizer "
        "actors on `ray.init(num_cpus=2)` (Ray start-up excluded, actor start-up included). Baseline: "
        "`datasets.load_dataset('json')` + `Dataset.map(batched=True, num_proc=2)` + the same Packer/ShardWriter. "
        "Peak = max PSS of the pipeline's whole process tree.",
        "",
        harness.table(
            [
                "corpus",
                "tokens",
                "Ray tok/s",
                "datasets tok/s",
                "ratio",
                "Ray peak PSS MB",
                "datasets peak PSS MB",
            ],
            [
                [f"{scale}x ({nbytes / 1e6:.1f} MB)", f"{r['tokens']:,}", f"{r['tokens_per_s']:,.0f}"]
                + [f"{h['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / h['tokens_per_s']:.2f}"]
                + [f"{r['peak_pss_mb']:.0f}", f"{h['peak_pss_mb']:.0f}"]
                for scale, nbytes, r, h in rows
            ],
        ),
    ]
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / f"prepare_{harness.today()}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
