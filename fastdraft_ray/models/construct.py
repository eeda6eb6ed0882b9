"""Draft construction policy: the draft a training stage starts from (``prepare_init``), and the kept vocabulary
of a trimmed output head counted on the run's data (``draft.head_vocab``, ``draft.head_vocab_from``).

PT starts from a fresh draft derived from the target (``draft`` shape and ``init``: random, PCA-projected
embeddings, or copied target layers); CP and FT start from the upstream stage's export. Both are written as a
plain HF folder with the target's tokenizer.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from fastdraft_ray.config import FastDraftConfig
from fastdraft_ray.layout import RunLayout
from fastdraft_ray.models.draft import check_compatible, load_draft, new_draft, save_draft
from fastdraft_ray.models.target import load_target, load_target_config, load_tokenizer
from fastdraft_ray.models.trimmed_head import trimmed_head
from fastdraft_ray.models.vocab import coverage, kept_token_ids, special_token_ids, token_counts, trim_draft

log = logging.getLogger(__name__)


def prepare_init(cfg: FastDraftConfig, out: Path, init_from: str | None, data_dir: str | None = None) -> Path:
    """Write the stage's starting draft to ``out``: a copy of ``init_from`` or a fresh draft derived from the
    target (``cfg.draft`` shape and ``init``, ``cfg.train.seed``), with the target's tokenizer. Idempotent.

    ``cfg.draft.head_vocab > 0``: a fresh draft gets a trimmed head whose kept set is counted on
    ``cfg.draft.head_vocab_from`` or else ``data_dir`` (the stage's shards); an ``init_from`` draft keeps its
    kept set (CP/FT continue with PT's), and a full-head ``init_from`` draft is trimmed to that count's top K.
    """
    if (out / "config.json").exists():
        return out
    tokenizer = load_tokenizer(cfg.model.target, cfg.model.trust_remote_code)
    target_config = load_target_config(cfg.model.target, cfg.model.trust_remote_code)
    k = cfg.draft.head_vocab
    if init_from:
        draft = load_draft(init_from)
        head = trimmed_head(draft)
        if head is not None and k and k != head.head_vocab:
            log.warning(
                "%s has a %d-token head: keeping it (draft.head_vocab=%d ignored)", init_from, head.head_vocab, k
            )
        if head is None and k:
            draft = trim_draft(draft, _kept_ids(cfg, data_dir, tokenizer, target_config))
    else:
        kept = _kept_ids(cfg, data_dir, tokenizer, target_config) if k else None
        target_model = None
        if cfg.draft.init != "random":
            target_model = load_target(cfg.model.target, trust_remote_code=cfg.model.trust_remote_code)[0]
        draft = new_draft(target_config, cfg.draft, seed=cfg.train.seed, kept_ids=kept, target_model=target_model)
    check_compatible(target_config, draft)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_draft(draft, tokenizer, tmp)
    tmp.rename(out)
    return out


def _kept_ids(cfg: FastDraftConfig, data_dir: str | None, tokenizer, target_config):
    """Kept token ids of a trimmed head: special tokens + the most frequent tokens of the counted data."""
    sources = head_vocab_sources(cfg, data_dir)
    if not sources:
        raise ValueError(
            "draft.head_vocab > 0 needs token counts: set draft.head_vocab_from or pass the data folder"
        )
    missing = [str(source) for source in sources if not source.exists()]
    if missing:
        raise FileNotFoundError(
            f"draft.head_vocab counts tokens in {', '.join(missing)}, which does not exist: prepare that data first "
            "(python jobs/prepare_data.py --stage pt / --stage cp) or set draft.head_vocab_from to existing folders"
        )
    counts = sum(token_counts(source, target_config.vocab_size) for source in sources)
    kept = kept_token_ids(counts, cfg.draft.head_vocab, special_token_ids(tokenizer, target_config))
    log.info("trimmed head: %d kept tokens cover %.2f%% of %s", len(kept), 100 * coverage(counts, kept), sources)
    return kept


def head_vocab_sources(cfg: FastDraftConfig, data_dir: str | None = None) -> list[Path]:
    """The folders ``draft.head_vocab_from`` names (comma-separated; relative ones inside the run directory,
    e.g. ``data/pt,data/cp``), or else the stage's own ``data_dir``."""
    if not cfg.draft.head_vocab_from:
        return [Path(data_dir)] if data_dir else []
    layout = RunLayout.of(cfg)
    return [Path(layout.inside(s.strip())) for s in cfg.draft.head_vocab_from.split(",") if s.strip()]
