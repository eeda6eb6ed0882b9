"""The project's training loop on one GPU (``pytest -m gpu``; ``scripts/gpu_check.sh``): a bf16 DeepSpeed ZeRO-2 PT
stage through Ray Train for a ~50M and a ~150M draft of Llama-3.1-8B (its 128,256-token vocabulary, random
shards), with tokens/s and the model FLOPs utilisation. torch's fused AdamW: nothing is JIT-compiled."""

from __future__ import annotations

import pytest

from tests.gpu import H100_BF16_TFLOPS, LLAMA_31_8B, needs_cuda, report, save_target

pytestmark = needs_cuda
pytest.importorskip("ray")  # the project's dependencies: a bare CUDA image may lack them
pytest.importorskip("deepspeed")  # the project's dependencies: a bare CUDA image may lack them
SEQ, MICRO, STEPS = 2048, 8, 40


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("budget", [50e6, 150e6], ids=["50M", "150M"])
def test_bf16_zero2_training_step_on_one_gpu(tmp_path, ray_gpu, budget):
    from fastdraft_ray.config import load_config
    from fastdraft_ray.data.synthetic import write_shards
    from fastdraft_ray.models.draft import count_params, derive_draft_config, draft_for_budget
    from fastdraft_ray.models.target import load_target_config, load_tokenizer, tokenizer_fingerprint
    from fastdraft_ray.train.curves import read_scalars
    from fastdraft_ray.train.run import train_stage

    target = save_target(tmp_path / "target", LLAMA_31_8B, weights=False)  # a PT draft needs the config only
    data = write_shards(
        tmp_path / "data",
        tokenizer_hash=tokenizer_fingerprint(load_tokenizer(str(target))),
        vocab_size=LLAMA_31_8B["vocab_size"],
        seq_len=SEQ,
        train_rows=STEPS * MICRO,
        val_rows=MICRO,
        rows_per_shard=64,
    )
    cfg = load_config(
        None,
        [f"model.target={target}", f"storage={tmp_path / 'runs'}", f"draft.params_budget={budget}"]
        + ["draft.num_layers=0", "train.use_gpu=true", "train.num_workers=1", "train.cpus_per_worker=2"]
        + ["train.precision=bf16", "train.zero_stage=2", f"train.micro_batch_size={MICRO}", "train.warmup_steps=5"]
        + [f"train.token_budget={STEPS * MICRO * SEQ}", "train.log_every=10", "train.eval_every=1000"]
        + ["train.checkpoint_every=1000", "train.proxy_every=0", f"train.val_rows={MICRO}"],
    )
    record = train_stage(cfg, str(data))
    tokens_per_s = read_scalars(f"{tmp_path}/runs/default/pt/tb", ("train/tokens_per_s",))["train/tokens_per_s"]
    steady = tokens_per_s[-1][1]  # the last window: steps 31-40, after start-up
    shape = draft_for_budget(load_target_config(str(target)), budget)
    counts = count_params(derive_draft_config(load_target_config(str(target)), shape))
    head = LLAMA_31_8B["vocab_size"] * shape.hidden_size  # the output layer is compute too
    mfu = 6 * (counts.non_embedding + head) * steady / (H100_BF16_TFLOPS * 1e12)
    ok = record["metrics"]["train/loss"] < 12.0 and steady > 0
    report(
        f"bf16 ZeRO-2 training step, {budget / 1e6:.0f}M draft (1 GPU)",
        ok,
        f"{shape.num_layers} x {shape.hidden_size}, {counts.total / 1e6:.0f}M params: {steady:,.0f} tok/s, "
        f"MFU {100 * mfu:.1f}% of {H100_BF16_TFLOPS:.0f} TFLOP/s; final loss {record['metrics']['train/loss']:.2f}",
    )
    assert ok
