"""Deployment precision of the target and the draft: one function, ``prepare_for_inference``.

- ``fp32``: the model as loaded (float32 weights).
- ``bf16``: weights cast to bfloat16 (CPU or GPU). On a CPU without native bf16 instructions (AVX512-BF16 or
  AMX) bf16 matmuls are emulated and usually SLOWER than fp32: a warning says so.
- ``fp16``: weights cast to float16 (meant for GPUs; CPU fp16 kernels are slow).
- ``int8``: dynamic quantisation of every ``nn.Linear`` (``torch.ao.quantization.quantize_dynamic``, qint8
  weights per tensor, activations quantised on the fly), CPU only. It is applied to ``nn.Linear`` modules
  generically, so a tied LM head (the ``lm_head`` module gets its own int8 copy; the embedding stays fp32), an
  untied head and a custom head module holding an ``nn.Linear`` (e.g. a vocabulary-trimmed head) are all
  covered.

- ``linear_kernel='auto'`` (fp32 on a CPU): the linear layers run decode and verify steps on the batch-invariant
  small-batch kernel of ``specdec.kernels`` (the same parameters; prefill and training stay on torch's GEMM).

Speedups must always compare speculative decoding with the target alone AT THE SAME PRECISION; the evaluation
harness prepares both from the same settings. Note on losslessness: ``quantize_dynamic`` picks ONE activation
scale per input tensor, so scoring k tokens at once yields (slightly) different logits than decoding them one
by one, and greedy speculative output can then differ from the int8 target's own greedy output. Evaluations
report that check (``matches_target``) rather than assume it.
"""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from fastdraft_ray.specdec.kernels import LINEAR_KERNELS, use_small_batch_kernel, use_torch_linear

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
DTYPE_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # ModelConfig.dtype names


class PrecisionError(ValueError):
    """The requested precision is unknown or unsupported on this device; the message says what to do."""


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises AVX512-BF16 or AMX-BF16 (Linux ``/proc/cpuinfo``; False elsewhere)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_precision(precision: str) -> None:
    """Raise ``PrecisionError`` for a name outside ``PRECISIONS``."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def resolve_precision(precision: str, dtype: str = "float32") -> str:
    """``precision``, or when it is empty the precision of a ``ModelConfig.dtype`` name (float32 -> fp32, ...)."""
    if not precision:
        if dtype not in DTYPE_PRECISION:
            raise PrecisionError(f"model dtype {dtype!r} is not one of {', '.join(DTYPE_PRECISION)}")
        precision = DTYPE_PRECISION[dtype]
    check_precision(precision)
    return precision


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a parameterless module."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` holds dynamically quantised Linear layers (``prepare_for_inference(.., 'int8')``)."""
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


def prepare_for_inference(
    model: PreTrainedModel, precision: str = "fp32", inplace: bool = False, linear_kernel: str = "torch"
) -> nn.Module:
    """Return ``model`` in eval mode at ``precision`` (one of ``PRECISIONS``, see the module docstring), its
    linear layers on ``linear_kernel`` (``auto``: the small-batch kernel for fp32 on a CPU that has it).

    ``inplace=False`` (default) leaves the given model's weights untouched (the result is a copy for bf16/int8;
    fp32 returns the model itself, whose linear layers ``auto`` switches in place: same parameters, same
    results up to rounding), so one loaded fp32 model can be prepared at several precisions. Raises
    ``PrecisionError`` for an unknown name, int8 on a non-CPU device, or a model that is already quantised.
    """
    check_precision(precision)
    if linear_kernel not in LINEAR_KERNELS:
        raise PrecisionError(f"linear_kernel {linear_kernel!r} is not one of {', '.join(LINEAR_KERNELS)}")
    if is_quantized(model):
        raise PrecisionError("model is already int8-quantised; prepare it from the fp32/bf16 model instead")
    device = model_device(model)
    model = model if inplace or precision == "fp32" else copy.deepcopy(model)
    model.eval()
    if precision == "fp32":
        model = model.float() if any(p.dtype != torch.float32 for p in model.parameters()) else model
        if linear_kernel == "auto" and device.type == "cpu":
            use_small_batch_kernel(model)
        return model
    if precision == "bf16":
        if device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn(
                "bf16 on a CPU without AVX512-BF16/AMX: matmuls are emulated and usually slower than fp32",
                stacklevel=2,
            )
        return model.to(torch.bfloat16)
    if precision == "fp16":
        return model.to(torch.float16)
    if device.type != "cpu":
        raise PrecisionError(
            f"int8 (torch.ao dynamic quantisation) runs on CPU only, the model is on {device}: use bf16 on "
            "accelerators, or move the model to the CPU first"
        )
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise PrecisionError(f"{type(model).__name__} has no nn.Linear layer to quantise")
    if torch.backends.quantized.engine == "none":
        raise PrecisionError("this torch build has no quantized engine (fbgemm/x86/qnnpack): int8 unavailable")
    with warnings.catch_warnings():  # torch >= 2.10 flags torch.ao.quantization as deprecated (moving to torchao)
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        model.float()
        use_torch_linear(model)  # quantize_dynamic swaps plain nn.Linear modules only
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
