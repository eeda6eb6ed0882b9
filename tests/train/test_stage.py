"""End-to-end PT stage on 2 Ray Train workers (ZeRO-2): exact data lineage, falling loss, TensorBoard, export,
DONE.json, and refusal of shards made with another tokenizer."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fastdraft_ray.data.synthetic import write_shards
from fastdraft_ray.train.position import DataPosition, Geometry
from tests.train.audit import effective_lineage, expected_rows, read_trace
from tests.train.conftest import tiny_run_config


def test_pt_stage_trains_every_row_once_in_order_and_exports(tmp_path, tiny_target, tiny_data, ray_3cpu):
    from transformers import AutoModelForCausalLM

    from fastdraft_ray.models.draft import check_compatible
    from fastdraft_ray.pipeline.stages import build_stage
    from fastdraft_ray.train.loop import Hooks
    from fastdraft_ray.train.run import resume_position, train_stage

    # 24 steps x 4 rows = 96 rows: all 64 rows of epoch 0, then the first 32 of epoch 1
    cfg = tiny_run_config(tiny_target, tmp_path / "runs", token_budget=1536)
    record = train_stage(cfg, str(tiny_data), hooks=Hooks(trace_dir=str(tmp_path)))

    geo = Geometry(2, 2, 1, 16)
    total = geo.total_steps(1536)
    trace = read_trace(tmp_path)
    lineage, steps = effective_lineage(trace)
    assert sorted(steps) == list(range(1, total + 1))
    assert lineage == expected_rows(tiny_data, total * geo.rows_per_step)
    # each worker received only its own rows: together, each trained row once (not once per worker)
    assert sum(recs[-1]["rows_read"] for recs in trace.values()) == total * geo.rows_per_step

    first, last = steps[1]["loss"], record["metrics"]["train/loss"]
    assert first > 4.0 and last < first - 0.5, (first, last)  # log(96) = 4.56 at init
    assert record["metrics"]["val/loss"] < first - 0.5
    assert record["geometry"]["tokens"] == 1536 and record["metrics"]["train/tokens_seen"] == 1536
    assert record["resumed_from"] is None  # a fresh run folder: trained from step 0

    sdir = tmp_path / "runs" / "t" / "pt"
    assert (
        json.loads((sdir / "DONE.json").read_text())["inputs"]["tokenizer_hash"]
        == record["inputs"]["tokenizer_hash"]
    )
    # what a re-run would resume: the last checkpoint, after every step (nothing left to train)
    assert resume_position(sdir) == DataPosition(total, total * geo.rows_per_step, 64)
    assert resume_position(tmp_path / "runs" / "t" / "cp") is None
    # the checkpoint cannot be resumed by another worker count: refused before any worker starts, saying how
    one_worker = tiny_run_config(tiny_target, tmp_path / "runs", token_budget=3072, num_workers=1)
    with pytest.raises(ValueError, match=r"written by 2 workers.*Resume with train.num_workers=2"):
        train_stage(one_worker, str(tiny_data))
    draft = AutoModelForCausalLM.from_pretrained(sdir / "export")
    check_compatible(AutoModelForCausalLM.from_pretrained(tiny_target).config, draft)
    with torch.no_grad():
        assert torch.isfinite(draft(input_ids=torch.tensor([[1, 5, 6, 7]])).logits).all()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(sdir / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/tokens_per_s",
        "train/lr",
        "val/loss",
        "train/samples_seen",
        "train/tokens_seen",
    } <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, total + 1))
    # the training proxy: before the first step and after the last (proxy_every=25 > 24 steps), in [0, 1]
    assert [e.step for e in events.Scalars("train/proxy_acceptance")] == [0, total]
    assert {"train/proxy_top1", "train/elapsed_s", "proxy/code/acceptance", "proxy/story/top1"} <= tags
    assert 0.0 <= record["metrics"]["train/proxy_acceptance"] <= 1.0
    assert record["metrics"]["train/proxy_acceptance"] == events.Scalars("train/proxy_acceptance")[-1].value

    # the finished stage is recognised by the pipeline's stage (which every stage job runs: same training
    # settings) and adopted, whatever the evaluation settings or speed-only knobs say; other training settings
    # are a re-run, and the message says which
    def adopt(cfg) -> str | None:
        on_these_shards = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, output=str(tiny_data)))
        return build_stage("pt", on_these_shards, ["pt"]).adopt()

    assert adopt(cfg) is None
    other_sections = dataclasses.replace(
        cfg,
        evaluate=dataclasses.replace(cfg.evaluate, gamma=5),
        train=dataclasses.replace(cfg.train, log_every=7, proxy_every=3, proxy_tokens=5),
    )
    assert adopt(other_sections) is None
    assert adopt(tiny_run_config(tiny_target, tmp_path / "runs", token_budget=2048)) == (
        "settings changed: train.token_budget"
    )


def test_shards_of_another_tokenizer_are_refused(tmp_path, tiny_target):
    from fastdraft_ray.train.run import train_stage

    data = write_shards(tmp_path / "data", tokenizer_hash="0" * 64, vocab_size=96)
    with pytest.raises(ValueError, match="different tokenizer"):
        train_stage(tiny_run_config(tiny_target, tmp_path / "runs"), str(data))


@pytest.mark.timeout(600)
def test_small_val_split_stale_build_lock_and_frozen_embeddings(tmp_path, tiny_target, tiny_hash, ray_3cpu):
    """One run, three checks. 3 val rows < 4 (2 workers x micro-batch 2): scored as 2 rows, one per worker (a small
    FT split's case). A lock left in DeepSpeed's op build folder by a killed build: the workers clear it and train
    (before, they waited on it forever right after loading their weights). train.freeze_embeddings: the embeddings
    end where they started while the layers train."""
    from safetensors.torch import load_file

    from fastdraft_ray.jit_ops import extensions_root
    from fastdraft_ray.layout import RunLayout
    from fastdraft_ray.train.run import train_stage

    data = write_shards(tmp_path / "data", tokenizer_hash=tiny_hash, vocab_size=96, val_rows=3)
    lock = extensions_root() / "deepspeed_shm_comm" / "lock"  # the folder the workers build in (same env)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    cfg = tiny_run_config(tiny_target, tmp_path / "runs", token_budget=256, freeze_embeddings=True)
    try:
        record = train_stage(cfg, str(data))
    finally:
        planted = lock.exists()
        lock.unlink(missing_ok=True)
    assert not planted
    val = record["metrics"]["val/loss"]
    assert val is not None and 0 < val < 10

    stage = RunLayout.of(cfg).stage("pt")
    init, out = load_file(stage.init / "model.safetensors"), load_file(stage.export / "model.safetensors")
    assert torch.equal(init["model.embed_tokens.weight"], out["model.embed_tokens.weight"])
    assert not torch.equal(init["model.layers.0.mlp.up_proj.weight"], out["model.layers.0.mlp.up_proj.weight"])
