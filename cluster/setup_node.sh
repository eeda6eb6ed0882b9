#!/usr/bin/env bash
# Install fastdraft-ray and its GPU dependencies into the Python of a rayproject/ray:2.60.0-py311-gpu container
# (used by cluster/Dockerfile and by the cluster-launcher YAMLs' setup_commands). Idempotent: a second run only
# checks. Usage: bash cluster/setup_node.sh [REPO_DIR]; WITH_VLLM=0 skips vLLM (then use generate.backend=hf).
set -euo pipefail
REPO=${1:-$(cd "$(dirname "$0")/.." && pwd)}
PIP=(python -m pip install -q)
# torch (PyPI's Linux wheel is the CUDA build) and vLLM in ONE resolve: ray[llm] 2.60 pins the vLLM its
# ray.data.llm is built for (0.29.0), which pins torch 2.13.0, the project's torch (a mismatch fails here, at set-up).
if [ "${WITH_VLLM:-1}" = 1 ]; then
  "${PIP[@]}" "torch==2.13.0" "ray[llm]>=2.60,<2.61"
else
  "${PIP[@]}" "torch==2.13.0"
fi
# DeepSpeed ships only an sdist whose setup.py imports torch: build it against the torch above, ops JIT-compiled.
"${PIP[@]}" setuptools wheel
DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation "deepspeed>=0.19,<0.20"
"${PIP[@]}" -e "$REPO[cloud]"   # s3fs/gcsfs: s3:// and gs:// data sources and shard folders
python - <<'PY'
import deepspeed, ray, torch
import fastdraft_ray
print(f"fastdraft-ray ready: ray {ray.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"deepspeed {deepspeed.__version__}, {torch.cuda.device_count()} GPU(s) visible")
PY
