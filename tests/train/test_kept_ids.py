"""The trimmed head's kept set is counted on every folder ``draft.head_vocab_from`` names (e.g. the PT and CP
data of a pipeline run, so PT's head already covers code), relative folders resolved inside the run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastdraft_ray.data.synthetic import write_shards
from fastdraft_ray.layout import RunLayout
from tests.train.conftest import save_tiny_target, tiny_run_config


def test_head_vocab_sources_resolve_inside_the_run_dir(tmp_path):
    from fastdraft_ray.models.construct import head_vocab_sources

    cfg = tiny_run_config(tmp_path / "target", tmp_path / "runs")
    assert head_vocab_sources(cfg, "/stage/data") == [Path("/stage/data")]
    assert head_vocab_sources(cfg) == []
    cfg.draft.head_vocab_from = "data/pt, /abs/kd,"
    assert head_vocab_sources(cfg, "/ignored") == [tmp_path / "runs" / "t" / "data" / "pt", Path("/abs/kd")]


def test_kept_set_counts_every_named_folder(tmp_path):
    from fastdraft_ray.models.construct import prepare_init
    from fastdraft_ray.models.draft import load_draft
    from fastdraft_ray.models.target import load_target_config, load_tokenizer, tokenizer_fingerprint
    from fastdraft_ray.models.trimmed_head import trimmed_head
    from fastdraft_ray.models.vocab import kept_token_ids, special_token_ids, token_counts

    target = save_tiny_target(tmp_path / "target")
    fingerprint = tokenizer_fingerprint(load_tokenizer(str(target)))
    cfg = tiny_run_config(target, tmp_path / "runs")
    run_dir = RunLayout.of(cfg).root
    a = write_shards(run_dir / "data" / "pt", tokenizer_hash=fingerprint, vocab_size=96, seed=1)
    b = write_shards(run_dir / "data" / "cp", tokenizer_hash=fingerprint, vocab_size=96, seed=2)
    cfg.draft.head_vocab, cfg.draft.head_vocab_from = 24, "data/pt,data/cp"
    kept = set(trimmed_head(load_draft(prepare_init(cfg, tmp_path / "init", None))).kept_ids.tolist())

    both = token_counts(a, 96) + token_counts(b, 96)
    specials = special_token_ids(load_tokenizer(str(target)), load_target_config(str(target)))
    assert kept == set(kept_token_ids(both, 24, specials).tolist())
    assert kept != set(kept_token_ids(token_counts(a, 96), 24, specials).tolist())  # b was counted too


def test_missing_count_folder_says_what_to_prepare(tmp_path):
    from fastdraft_ray.models.construct import prepare_init

    target = save_tiny_target(tmp_path / "target")
    cfg = tiny_run_config(target, tmp_path / "runs")
    cfg.draft.head_vocab, cfg.draft.head_vocab_from = 24, "data/pt,data/cp"
    with pytest.raises(FileNotFoundError, match="prepare_data.py --stage"):
        prepare_init(cfg, tmp_path / "init", None)
