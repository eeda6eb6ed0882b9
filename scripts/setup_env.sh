#!/usr/bin/env bash
# Create .venv and install fastdraft-ray with its dev and cloud extras from this repo's own files (CPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
STAMP=.venv/.fastdraft-installed
WANT=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "environment up to date: $(pwd)/.venv"
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
# DeepSpeed ships only an sdist whose setup.py imports torch: build it against the torch above.
.venv/bin/python -m pip install -q setuptools wheel
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation "deepspeed>=0.19,<0.20"
.venv/bin/python -m pip install -q -e ".[dev,cloud]"
# Build the C++ ops now rather than inside the first run (where a kill mid-build used to leave a lock behind).
TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(pwd)/.venv/torch_extensions} .venv/bin/python scripts/build_jit_ops.py
echo "$WANT" > "$STAMP"
echo "environment ready: $(pwd)/.venv"
