"""Fast checks of the training building blocks: batch geometry, epoch plan, DeepSpeed config, losses, init."""

from __future__ import annotations

import pytest
import torch

from fastdraft_ray.config import TrainConfig, load_config
from fastdraft_ray.train.deepspeed import deepspeed_config
from fastdraft_ray.train.losses import lm_loss, split_row_batch
from fastdraft_ray.train.position import DataPosition, Geometry, epoch_plan


def test_geometry_counts_steps_and_slices_each_worker_disjointly():
    geo = Geometry(world_size=2, micro_batch_size=3, grad_accum_steps=2, seq_len=16)
    assert (geo.rows_per_micro_step, geo.rows_per_step, geo.tokens_per_step) == (6, 12, 192)
    assert geo.total_steps(192) == 1 and geo.total_steps(193) == 2
    slices = [range(6)[geo.worker_slice(r)] for r in range(2)]
    assert list(slices[0]) + list(slices[1]) == list(range(6))
    with pytest.raises(ValueError):
        geo.worker_slice(2)
    with pytest.raises(ValueError):
        geo.total_steps(0)


def test_epoch_plan_covers_a_row_range_across_epochs():
    assert epoch_plan(0, 64, 64) == [(0, 0)]
    assert epoch_plan(60, 200, 64) == [(0, 60), (1, 0), (2, 0), (3, 0)]
    assert epoch_plan(128, 130, 64) == [(2, 0)]
    pos = DataPosition(step=10, rows_consumed=130, rows_per_epoch=64)
    assert (pos.epoch, pos.row_in_epoch) == (2, 2)
    assert DataPosition.from_dict(pos.to_dict()) == pos
    with pytest.raises(ValueError):
        epoch_plan(0, 10, 0)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_config_follows_the_typed_config(zero, precision):
    tc = TrainConfig(
        zero_stage=zero,
        precision=precision,
        micro_batch_size=4,
        grad_accum_steps=3,
        warmup_steps=10,
        lr=2e-3,
        min_lr_ratio=0.2,
        grad_clip=0.5,
    )
    ds = deepspeed_config(tc, total_steps=100)
    assert ds["zero_optimization"]["stage"] == zero
    assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["fp16"]["enabled"] is False
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 3)
    assert ds["gradient_clipping"] == 0.5 and ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["torch_adam"] is True  # CPU: no JIT-built fused Adam
    assert deepspeed_config(tc, 100, use_gpu=True)["optimizer"]["params"]["torch_adam"] is False
    sched = ds["scheduler"]["params"]
    assert (sched["total_num_steps"], sched["warmup_num_steps"], sched["cos_min_ratio"]) == (100, 10, 0.2)


def test_deepspeed_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="bf16"):
        deepspeed_config(TrainConfig(precision="fp16"), 10)
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(TrainConfig(zero_stage=4), 10)
    with pytest.raises(ValueError, match="offload"):
        deepspeed_config(TrainConfig(zero_stage=0, offload_optimizer=True), 10)
    offload = deepspeed_config(TrainConfig(zero_stage=2, offload_optimizer=True), 10)
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_loss_is_next_token_cross_entropy():
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama")).eval()
    rows = torch.randint(0, 96, (2, 9), dtype=torch.int32)
    inputs, targets = split_row_batch(rows)
    assert inputs.shape == targets.shape == (2, 8) and torch.equal(targets[:, :-1], inputs[:, 1:])
    with torch.no_grad():
        ours = lm_loss(model, rows)
        hf = model(input_ids=rows.long(), labels=rows.long()).loss  # HF shifts labels itself
    assert torch.allclose(ours, hf, atol=1e-5)
    with pytest.raises(ValueError, match="seq_len"):
        split_row_batch(torch.zeros(3, dtype=torch.int32))


def test_cp_init_is_a_copy_of_the_given_export_and_pt_init_is_derived(tmp_path, tiny_target):
    from fastdraft_ray.models.construct import prepare_init
    from fastdraft_ray.models.draft import load_draft
    from tests.train.conftest import tiny_run_config

    cfg = tiny_run_config(tiny_target, tmp_path)
    pt = load_draft(prepare_init(cfg, tmp_path / "pt_init", None))
    assert (pt.config.num_hidden_layers, pt.config.hidden_size, pt.config.vocab_size) == (2, 32, 96)
    cp = load_draft(prepare_init(cfg, tmp_path / "cp_init", str(tmp_path / "pt_init")))
    for (name, a), (_, b) in zip(pt.state_dict().items(), cp.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert (tmp_path / "cp_init" / "tokenizer.json").exists()


def test_train_config_overrides_reach_the_typed_section():
    cfg = load_config(None, ["train.zero_stage=3", "train.worker_resources={trainer: 1}"])
    assert cfg.train.zero_stage == 3 and cfg.train.worker_resources == {"trainer": 1}
