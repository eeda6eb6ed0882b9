"""Fast checks of the training building blocks: batch geometry, epoch plan, DeepSpeed config, losses, init."""

from __future__ import annotations

import pytest
import torch

from fastdraft_ray.config import TrainConfig, load_config
from fastdraft_ray.train.deepspeed import deepspeed_config
from fastdraft_ray.train.losses import lm_loss, split_row_batch
from fastdraft_ray.train.position import DataPosition, Geometry, epoch_plan


def test_geometry_counts_rows_and_steps():
    geo = Geometry(world_size=2, micro_batch_size=3, grad_accum_steps=2, seq_len=16)
    assert (geo.rows_per_micro_step, geo.rows_per_step, geo.tokens_per_step) == (6, 12, 192)
    assert geo.total_steps(192) == 1 and geo.total_steps(193) == 2
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
    gpu = deepspeed_config(tc, 100, use_gpu=True)["optimizer"]["params"]
    assert gpu["torch_adam"] is True and gpu["fused"] is True  # GPU: torch's fused AdamW, no nvcc in the image
    assert "scheduler" not in ds  # the schedule is lr_scheduler's (below)


def test_lr_schedule_trains_from_the_first_step_and_ends_at_the_floor():
    """Every optimizer step moves the weights (DeepSpeed's WarmupCosineLR ran steps 1 and 2 at LR 0), the warm-up
    is linear to the peak, the decay cosine to min_lr_ratio; a real DeepSpeed engine follows it."""
    import os

    import deepspeed

    from fastdraft_ray.train.deepspeed import lr_ratio, lr_scheduler

    tc = TrainConfig(warmup_steps=4, lr=1e-2, min_lr_ratio=0.1, micro_batch_size=1, zero_stage=0)
    ratios = [lr_ratio(s, warmup_steps=4, total_steps=10, min_ratio=0.1) for s in range(10)]
    assert ratios[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a > b for a, b in zip(ratios[3:], ratios[4:], strict=False)) and ratios[-1] == pytest.approx(0.1)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    model = torch.nn.Linear(4, 1)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=deepspeed_config(tc, 10),
        lr_scheduler=lr_scheduler(tc, 10),
    )
    used = []
    try:
        for _ in range(10):
            used.append(optimizer.param_groups[0]["lr"] / tc.lr)
            before = model.weight.detach().clone()
            engine.backward(engine(torch.ones(1, 4)).sum())
            engine.step()
            assert not torch.equal(before, model.weight.detach())
    finally:
        torch.distributed.destroy_process_group()  # this pytest process is not a training worker
    assert used == pytest.approx(ratios)


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
