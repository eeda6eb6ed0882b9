"""The engine's n-gram proposer (prompt lookup, no draft model) against the target alone and transformers' prompt
lookup, on the evaluation's held-out prompts of the four task families (greedy):

    python benchmarks/bench_ngram.py [--prompts-per-task 4 --max-new-tokens 64 --ngram-tokens 3 --threads 1]

Per prompt the three methods run back to back, in an order that rotates from prompt to prompt (no method always
first on a drifting machine). Prints per family and overall: tokens/s of each method, the speedup of each over the
target alone (ratio of summed times), the share of n-gram steps, and whether the engine's output equals the
target's own greedy output on every prompt. Writes ``benchmarks/results/ngram_<date>.md``.
"""

from __future__ import annotations

import argparse
import time

import harness  # the repository on sys.path and the offline hub, before any model library loads

# isort: split

import torch

from fastdraft_ray.config import DecodeConfig
from fastdraft_ray.data.tasks import load_tasks
from fastdraft_ray.evaluate.worker import hf_generate
from fastdraft_ray.models.target import load_target
from fastdraft_ray.specdec.engine import SpecDecoder

METHODS = ("target", "ngram", "hf_prompt_lookup")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--prompts-per-task", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ngram-tokens", type=int, default=3)
    parser.add_argument("--ngram-max", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_target(args.target)
    settings = DecodeConfig(proposer="ngram", ngram_tokens=args.ngram_tokens, ngram_max=args.ngram_max)
    engine = SpecDecoder(model, None, settings, tokenizer=tokenizer)
    prompts = load_tasks(tokenizer, prompts_per_task=args.prompts_per_task)
    engine.generate(next(iter(prompts.values()))[0].input_ids, max_new_tokens=8, speculative=False)  # warm-up

    def run(method: str, ids: list[int]) -> tuple[list[int], float, int]:
        start = time.perf_counter()
        if method == "hf_prompt_lookup":
            tokens, _, seconds = hf_generate(engine, ids, args.max_new_tokens, args.ngram_tokens)
            return tokens, seconds, 0
        out = engine.generate(
            ids, max_new_tokens=args.max_new_tokens, temperature=0.0, speculative=method != "target"
        )
        return out.tokens, time.perf_counter() - start, out.stats.ngram_steps * (method == "ngram")

    rows, totals = [], {m: [0.0, 0] for m in METHODS}
    identical, prompt_index = [], 0
    for task, items in prompts.items():
        family = {m: [0.0, 0] for m in METHODS}
        ngram_steps = 0
        for item in items:
            order = METHODS[prompt_index % 3 :] + METHODS[: prompt_index % 3]
            prompt_index += 1
            got = {}
            for method in order:
                tokens, seconds, steps = run(method, item.input_ids)
                got[method] = tokens
                ngram_steps += steps
                for acc in (family[method], totals[method]):
                    acc[0] += seconds
                    acc[1] += len(tokens)
            identical.append(got["ngram"] == got["target"])
        rows.append(_row(task, family, ngram_steps))
    rows.append(_row("all", totals, None))

    header = [
        "family",
        *[f"{m} tok/s" for m in METHODS],
        "ngram speedup",
        "hf prompt lookup speedup",
        "ngram steps",
    ]
    table = harness.table(header, rows, align="lrrrrrr")
    text = (
        f"{harness.machine()}\n\n`python benchmarks/bench_ngram.py --prompts-per-task {args.prompts_per_task} "
        f"--max-new-tokens {args.max_new_tokens} --ngram-tokens {args.ngram_tokens} --threads {args.threads}` "
        f"({harness.now()}), greedy\n\n{table}\n\nengine output identical to the target's own greedy output on "
        f"{sum(identical)}/{len(identical)} prompts\n"
    )
    print(text)
    harness.result_path("ngram").write_text(text)


def _row(name: str, acc: dict, ngram_steps: int | None) -> list:
    """Tokens/s per method and the speedups over the target alone (per emitted token)."""
    speed = {m: acc[m][1] / acc[m][0] if acc[m][0] else 0.0 for m in METHODS}
    return [
        name,
        *[f"{speed[m]:.1f}" for m in METHODS],
        f"{speed['ngram'] / speed['target']:.2f}×",
        f"{speed['hf_prompt_lookup'] / speed['target']:.2f}×",
        "" if ngram_steps is None else ngram_steps,
    ]


if __name__ == "__main__":
    main()
