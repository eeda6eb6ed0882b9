"""Build every C++ op a run compiles on first use, once, at install time (``scripts/setup_env.sh`` runs this):
the small-batch linear kernel (``decode.linear_kernel=auto``) and, on a CPU machine, DeepSpeed's shared-memory
communication op. A stale build lock left by a killed build is cleared first (``fastdraft_ray.jit_ops``).

    TORCH_EXTENSIONS_DIR=.venv/torch_extensions python scripts/build_jit_ops.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fastdraft_ray.jit_ops import clear_stale_locks, extensions_root  # noqa: E402
from fastdraft_ray.specdec.kernels import small_batch_linear_op  # noqa: E402


def main() -> int:
    start = time.perf_counter()
    clear_stale_locks()
    built = ["fastdraft_small_batch_linear"] if small_batch_linear_op() is not None else []
    if not torch.cuda.is_available():  # DeepSpeed builds its shared-memory communication op for CPU training
        from deepspeed.comm.torch import build_shm_op

        if build_shm_op() is not None:
            built.append("deepspeed_shm_comm")
    print(
        f"C++ ops ready in {extensions_root()}: {', '.join(built) or 'none'} ({time.perf_counter() - start:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
