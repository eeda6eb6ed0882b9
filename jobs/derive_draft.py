"""Fetch the target, derive a vocabulary-compatible draft from it, print both sizes and the cost ratio c.

python jobs/derive_draft.py --config cpu_default [draft.num_layers=2 ...]
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from the working dir, installed or not

from fastdraft_ray.cli import parse_job_args, setup_logging  # noqa: E402
from fastdraft_ray.layout import RunLayout  # noqa: E402
from fastdraft_ray.models.draft import check_compatible, count_params, new_draft, param_bytes, save_draft  # noqa: E402
from fastdraft_ray.models.target import load_target  # noqa: E402

log = logging.getLogger("derive_draft")


def main() -> None:
    cfg, _ = parse_job_args(__doc__)
    setup_logging()
    start = time.perf_counter()
    target, tokenizer = load_target(cfg.model.target, dtype=cfg.model.dtype)
    log.info("target %s ready in %.1f s", cfg.model.target, time.perf_counter() - start)
    target_model = target if cfg.draft.init != "random" else None  # pca / layers copy the target's weights
    draft = new_draft(target.config, cfg.draft, seed=cfg.train.seed, target_model=target_model)
    check_compatible(target, draft, tokenizer, tokenizer)
    out = save_draft(draft, tokenizer, RunLayout.of(cfg).draft_init)

    t_count, d_count = count_params(target), count_params(draft)
    c = param_bytes(draft) / param_bytes(target)
    print(
        f"{'model':<8}{'family':<10}{'layers':>7}{'hidden':>8}{'total params':>15}{'embedding':>13}{'non-emb':>13}"
    )
    for name, model, n in (("target", target, t_count), ("draft", draft, d_count)):
        conf = model.config
        print(
            f"{name:<8}{conf.model_type:<10}{conf.num_hidden_layers:>7}{conf.hidden_size:>8}"
            f"{n.total:>15,}{n.embedding:>13,}{n.non_embedding:>13,}"
        )
    print(f"parameter ratio c = draft bytes / target bytes = {c:.4f}")
    print(f"draft (init={cfg.draft.init}, vocabulary-compatible) saved to {out}")


if __name__ == "__main__":
    main()
