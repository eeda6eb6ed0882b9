"""The DeepSpeed config dict for one training stage, built from the typed ``TrainConfig``, and its LR schedule.

ZeRO stage 0-3, fp32 or bf16 (fp16 needs a GPU), micro-batch and gradient accumulation, gradient clipping, AdamW,
optional optimizer offload to CPU memory. The schedule (``lr_scheduler``, passed to ``deepspeed.initialize``):
linear warm-up, optimizer step ``n`` of ``W`` at ``n / W`` of the peak, then cosine decay to ``min_lr_ratio`` x the
peak at the last step.
"""

from __future__ import annotations

import functools
import math

import torch

from fastdraft_ray.config import TrainConfig


def deepspeed_config(train: TrainConfig, total_steps: int, use_gpu: bool | None = None) -> dict:
    """DeepSpeed config for ``total_steps`` optimizer steps of ``train`` (per-worker micro-batch sizes)."""
    use_gpu = train.use_gpu if use_gpu is None else use_gpu  # ``train`` checked itself (TrainConfig.validate)
    if total_steps < 1:
        raise ValueError(f"train.token_budget={train.token_budget} is less than one optimizer step of this batch")
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
                # torch's AdamW everywhere, fused on GPU: DeepSpeed's own FusedAdam / CPU Adam are JIT builds that
                # need a compiler (and on GPU an nvcc matching torch's CUDA) in every worker's image.
                "torch_adam": True,
                **({"fused": True} if use_gpu else {}),
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_ratio(completed_steps: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The fraction of the peak LR for optimizer step ``completed_steps + 1`` (see the module docstring)."""
    n, warmup = completed_steps + 1, max(1, min(warmup_steps, total_steps))
    if n <= warmup:
        return n / warmup
    progress = min(1.0, (n - warmup) / max(1, total_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(train: TrainConfig, total_steps: int):
    """``optimizer -> LambdaLR`` following ``lr_ratio``, for ``deepspeed.initialize(lr_scheduler=...)``.

    Not DeepSpeed's ``WarmupCosineLR``: that one runs the first two optimizer steps at LR 0 (its constructor sets 0,
    and its first ``step()`` computes 0 / warm-up), a quarter of an 8-step run, and more of a short trial.
    """
    ratio = functools.partial(
        lr_ratio, warmup_steps=train.warmup_steps, total_steps=total_steps, min_ratio=train.min_lr_ratio
    )
    return functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=ratio)
