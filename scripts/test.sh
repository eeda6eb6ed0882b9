#!/usr/bin/env bash
# The test command (README and CI): install from this repo's files, then the default (fast, CPU) test selection.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed's JIT ops (on CPU: deepspeed_shm_comm) are built once per venv: a shared ~/.cache/torch_extensions
# would be rebuilt (minutes) each time a process of another venv loads them. Local Ray workers inherit this.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(pwd)/.venv/torch_extensions}
exec .venv/bin/python -m pytest -q --durations=15 "$@"
