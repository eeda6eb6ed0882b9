#!/usr/bin/env bash
# The test command (README and CI): install from this repo's files, then the default (fast, CPU) test selection.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
