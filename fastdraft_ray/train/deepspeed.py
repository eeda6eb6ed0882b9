"""The DeepSpeed config dict for one training stage, built from the typed ``TrainConfig``.

ZeRO stage 0-3, fp32 or bf16 (fp16 needs a GPU), micro-batch and gradient accumulation, gradient clipping, AdamW,
linear warm-up then cosine decay to ``min_lr_ratio`` x the peak, optional optimizer offload to CPU memory.
"""

from __future__ import annotations

from fastdraft_ray.config import TrainConfig

PRECISIONS = ("fp32", "bf16")


def deepspeed_config(train: TrainConfig, total_steps: int, use_gpu: bool | None = None) -> dict:
    """DeepSpeed config for ``total_steps`` optimizer steps of ``train`` (per-worker micro-batch sizes)."""
    use_gpu = train.use_gpu if use_gpu is None else use_gpu
    if train.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, got {train.zero_stage}")
    if train.precision not in PRECISIONS:
        hint = " (fp16 needs a GPU and loss scaling; use bf16)" if train.precision == "fp16" else ""
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {train.precision!r}{hint}")
    if train.offload_optimizer and train.zero_stage < 1:
        raise ValueError("train.offload_optimizer needs ZeRO stage 1-3")
    if train.micro_batch_size < 1 or train.grad_accum_steps < 1 or total_steps < 1:
        raise ValueError("micro_batch_size, grad_accum_steps and the step count must be positive")
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                # On CPU, torch's AdamW: DeepSpeed's fused CPU Adam is a JIT C++ build (1-2 min per fresh venv).
                "torch_adam": not use_gpu,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_num_steps": max(1, min(train.warmup_steps, total_steps)),
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": train.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
