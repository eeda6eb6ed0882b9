#!/usr/bin/env bash
# The GPU path's checks, one line each (pass / fail, with its figure), in under 10 minutes on one H100 / H200:
#   CPU side (runs anywhere): every tensor the decoding code makes names its device; the vLLM backend's rows, seeds,
#   stop tokens, streaming writes and resume (HF stand-in); the preflight, and `--check` of the 8-GPU recipe.
#   GPU side (a CUDA device): speculative decoding on CUDA (greedy identity with a real-size random target, the
#   chi-square smoke test, tokens/s and v(k)); a bf16 DeepSpeed ZeRO-2 training step of the project's loop for a
#   50M and a 150M draft (tokens/s, MFU); HF KD generation on the GPU. Models are random, of real sizes: nothing
#   larger than the repository is needed. On a GPU the figures go to benchmarks/results/gpu_check_<date>.md.
# Usage: bash scripts/gpu_check.sh   (the project installed with CUDA torch: pip install -e ".[dev,gpu]")
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then sed -n '2,9p' "$0"; exit 0; fi
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export GPU_CHECK_OUT=${GPU_CHECK_OUT:-$(mktemp)}
status=0

echo "== CPU side"
cpu_side() { $PY -m pytest -q -p no:cacheprovider tests/specdec/test_devices.py tests/distill/test_vllm_backend.py \
  tests/test_preflight.py; }
if cpu_side; then ok=true; else ok=false; status=1; fi
echo "{\"check\": \"CPU side of the GPU path (device-less tensors, vLLM backend logic, preflight)\", \"ok\": $ok, \"figure\": \"\"}" >> "$GPU_CHECK_OUT"

if $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "== GPU side ($($PY -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)'))"
  $PY -m pytest -m gpu -q -s -rfEs -p no:cacheprovider tests/specdec/test_cuda.py tests/train/test_cuda_step.py \
    tests/distill/test_cuda_generate.py || status=1
  $PY - "$GPU_CHECK_OUT" <<'PY'
import datetime, json, subprocess, sys
import torch
rows = [json.loads(line) for line in open(sys.argv[1])]
gpu = f"{torch.cuda.get_device_name(0)}; torch {torch.__version__} (CUDA {torch.version.cuda})"
lines = [f"# GPU checks, {datetime.datetime.now():%Y-%m-%d %H:%M}", "", f"`bash scripts/gpu_check.sh` on {gpu}.", "",
         "| check | result | figure |", "|---|---|---|"]
lines += [f"| {r['check']} | {'pass' if r['ok'] else '**fail**'} | {r['figure']} |" for r in rows]
path = f"benchmarks/results/gpu_check_{datetime.date.today().isoformat()}.md"
open(path, "w").write("\n".join(lines) + "\n")
print(f"written to {path}")
PY
else
  echo "GPU-CHECK GPU side: skipped (no CUDA device on this machine)"
fi
echo "== summary"
$PY - "$GPU_CHECK_OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"  GPU-CHECK {r['check']}: {'pass' if r['ok'] else 'fail'} {r['figure']}")
PY
exit $status
