"""Export a trimmed-head draft as its family's stock architecture, for servers that load drafts without remote
code (vLLM's and SGLang's draft-model paths, llama.cpp conversion):

    python jobs/export_draft.py runs/cpu_default/ft/export runs/cpu_default/ft/export_stock

The full-vocabulary lm_head holds the kept rows and zeros elsewhere (``models.vocab.untrim_draft``): lossless like
any draft; its acceptance is measured next to the trimmed one in benchmarks/results/ (README, Serving).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from the working dir, installed or not

from fastdraft_ray.models.draft import load_draft, save_draft  # noqa: E402
from fastdraft_ray.models.target import load_tokenizer  # noqa: E402
from fastdraft_ray.models.vocab import untrim_draft  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("draft", help="a trimmed-head draft folder (a stage export)")
    parser.add_argument("out", help="the folder to write the stock-architecture draft to")
    args = parser.parse_args()
    if not (Path(args.draft) / "config.json").exists():
        raise SystemExit(f"{args.draft} is not an HF model folder (no config.json)")
    try:
        stock = untrim_draft(load_draft(args.draft))
    except ValueError as exc:
        raise SystemExit(f"cannot export {args.draft}: {exc}") from exc
    out = save_draft(stock, load_tokenizer(args.draft), args.out)
    print(f"stock {type(stock).__name__} draft: {out} (loads without trust_remote_code)")


if __name__ == "__main__":
    main()
