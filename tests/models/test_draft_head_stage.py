"""A PT stage (Ray Train + DeepSpeed, 2 workers) training a PCA-initialised draft with a trimmed head: the kept
set is counted on the stage's shards, the loss falls, the export is a trimmed draft, and the next stage's init
keeps the same kept set. Slow (a Ray Train run; 14 min on the loaded shared 2-core machine): run with ``-m slow``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdraft_ray.data.synthetic import write_shards
from tests.train.conftest import save_tiny_target, tiny_run_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_3cpu():
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_pt_stage_with_trimmed_pca_draft(tmp_path, ray_3cpu):
    from fastdraft_ray.models.construct import prepare_init
    from fastdraft_ray.models.draft import load_draft
    from fastdraft_ray.models.target import load_tokenizer, tokenizer_fingerprint
    from fastdraft_ray.models.trimmed_head import trimmed_head
    from fastdraft_ray.models.vocab import token_counts
    from fastdraft_ray.train.run import train_stage

    target = save_tiny_target(tmp_path / "target")
    data = write_shards(
        tmp_path / "data", tokenizer_hash=tokenizer_fingerprint(load_tokenizer(str(target))), vocab_size=96
    )
    cfg = tiny_run_config(target, tmp_path / "runs", token_budget=1024)
    cfg.draft.head_vocab, cfg.draft.init = 48, "pca"
    record = train_stage(cfg, str(data))
    assert np.isfinite(record["metrics"]["train/loss"]) and record["metrics"]["val/loss"] < np.log(48)

    export = load_draft(tmp_path / "runs" / "t" / "pt" / "export")
    head = trimmed_head(export)
    assert head is not None and head.head_vocab == 48
    counts = token_counts(data, 96)
    kept = set(head.kept_ids.tolist())
    assert {0, 1, 2} <= kept  # pad, bos, eos always kept
    most_frequent = [int(i) for i in np.argsort(-counts, kind="stable") if i > 2][:20]
    assert set(most_frequent) <= kept
    with torch.no_grad():
        logits = export(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(logits[..., head.kept_ids]).all() and torch.isinf(logits).sum() == 4 * (96 - 48)

    # the next stage (CP/FT) starts from the export and keeps its kept set
    cp_init = load_draft(prepare_init(cfg, tmp_path / "cp_init", str(tmp_path / "runs" / "t" / "pt" / "export")))
    assert torch.equal(trimmed_head(cp_init).kept_ids, head.kept_ids)
