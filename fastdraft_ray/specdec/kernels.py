"""A batch-invariant small-batch linear kernel for CPU decoding (``decode.linear_kernel``).

Decoding and verification multiply a few token rows (1 to gamma + 1) by every weight matrix of the model, so
they are bound by reading the weights. On some CPUs MKL's sgemm (torch's fp32 ``linear``) costs about one pass
over the weight per row for 2..8 rows: scoring 4 tokens then costs ~1.8 decode steps, which prices speculative
decoding out. ``csrc/small_batch_linear.cpp`` reads each weight row once for all rows (AVX2 + FMA), and computes
every output element the same way whatever the row count, so a token scored inside a verify chunk gets the same
linear outputs, bit for bit, as the token decoded alone.

``use_small_batch_kernel(model)`` switches a model's ``nn.Linear`` layers to ``SmallBatchLinear``: the same
module with the same parameters (``state_dict`` and ``isinstance(m, nn.Linear)`` unchanged) whose forward sends
inputs of at most ``MAX_ROWS`` float32 rows, outside autograd, to the kernel and everything else (prefill,
training) to torch. The kernel is compiled once per environment with ``torch.utils.cpp_extension`` (~30 s,
cached in ``$TORCH_EXTENSIONS_DIR``; ``scripts/build_jit_ops.py`` builds it at install); on a CPU without AVX2/FMA, or when the build fails, ``auto`` keeps torch's
kernels and says so once.
"""

from __future__ import annotations

import functools
import logging
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastdraft_ray.jit_ops import clear_stale_locks

log = logging.getLogger(__name__)

LINEAR_KERNELS = ("auto", "torch")
MAX_ROWS = 8  # inputs with more rows (prefill, batched generation) are compute-bound: torch's GEMM is better
_SOURCE = Path(__file__).with_name("csrc") / "small_batch_linear.cpp"


def cpu_supports_kernel() -> bool:
    """True on an x86-64 CPU that advertises AVX2 and FMA (Linux ``/proc/cpuinfo``)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return {"avx2", "fma"} <= flags


@functools.cache
def small_batch_linear_op():
    """The compiled ``torch.ops.fastdraft.small_batch_linear`` (built on first use), or None when this CPU or
    toolchain cannot run it (a warning says why)."""
    if not cpu_supports_kernel():
        warnings.warn("decode.linear_kernel=auto: this CPU has no AVX2/FMA, using torch's linear", stacklevel=2)
        return None
    from torch.utils.cpp_extension import load

    clear_stale_locks()  # a build killed earlier would make this one wait forever
    try:
        load(
            name="fastdraft_small_batch_linear",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # a missing compiler or ninja must not stop decoding: torch's kernels still work
        warnings.warn(
            f"decode.linear_kernel=auto: building the small-batch linear kernel failed ({exc}); using torch's "
            "linear (install a C++ compiler and ninja, or set decode.linear_kernel=torch to silence this)",
            stacklevel=2,
        )
        return None
    return torch.ops.fastdraft.small_batch_linear


class SmallBatchLinear(nn.Linear):
    """``nn.Linear`` whose inference forward on at most ``MAX_ROWS`` fp32 CPU rows uses the small-batch kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (
            0 < rows <= MAX_ROWS
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            y = torch.ops.fastdraft.small_batch_linear(x.reshape(rows, x.shape[-1]), self.weight)
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_small_batch_kernel(model: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` (in place) to ``SmallBatchLinear``; the number switched, 0
    when the kernel is unavailable here (the model then keeps torch's linear)."""
    if small_batch_linear_op() is None:
        return 0
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SmallBatchLinear
            switched += 1
    return switched


def use_torch_linear(model: nn.Module) -> None:
    """Undo ``use_small_batch_kernel`` (in place): every ``SmallBatchLinear`` becomes a plain ``nn.Linear``."""
    for module in model.modules():
        if type(module) is SmallBatchLinear:
            module.__class__ = nn.Linear


def uses_small_batch_kernel(model: nn.Module) -> bool:
    """True when some linear layer of ``model`` runs on the small-batch kernel."""
    return any(isinstance(m, SmallBatchLinear) for m in model.modules())
