#!/usr/bin/env bash
# The main job end to end on the embedded default (real target, real data, CPU):
# creates .venv, starts a local Ray head with token authentication unless one is running, then submits ONE Ray job
# with `ray job submit` and follows its logs: jobs/pipeline.py runs prepare -> PT -> generate KD data -> FT ->
# evaluate -> report (CP too when pipeline.stages lists it). FASTDRAFT_RECIPE=cpu_quick gives a first look (~9-25 min,
# see README). Extra arguments are config overrides (key.sub=value). Every stage skips work already done with the
# same settings, so a re-run resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate
export RAY_AUTH_MODE=token  # Ray 2.60 heads require the token in ~/.ray/auth_token
# DeepSpeed's JIT ops are built once per venv, not in the ~/.cache/torch_extensions every venv shares (where each
# venv's build replaces the other's, minutes each time). A head started below inherits it; the job passes it too.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(pwd)/.venv/torch_extensions}
DASHBOARD=${RAY_DASHBOARD:-http://127.0.0.1:8265}
# Any HTTP answer (401 included: token auth is on) means a head is serving there.
dashboard_up() { curl -s -o /dev/null -m 3 "$DASHBOARD/api/version"; }
if ! dashboard_up; then
  echo "starting a local Ray head (dashboard: $DASHBOARD)"
  # A fresh machine has no token yet: create ~/.ray/auth_token (kept if it exists; RAY_AUTH_TOKEN wins if set).
  [ -n "${RAY_AUTH_TOKEN:-}" ] || ray get-auth-token --generate > /dev/null
  free_port() { python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
  gcs_port=6379
  if python -c 'import socket, sys; sys.exit(socket.socket().connect_ex(("127.0.0.1", 6379)) != 0)'; then
    gcs_port=$(free_port)  # another Ray instance on this machine holds the default port
  fi
  # The agent's default port 52365 may be taken by another Ray instance; a taken port disables job submission.
  # One logical CPU more than the cores: Ray Data reads shards beside the training workers.
  # The dashboard listens where RAY_DASHBOARD says (default 8265), so a second demo can run beside a busy head.
  ray start --head --port="$gcs_port" --num-cpus="${RAY_NUM_CPUS:-$(( $(nproc) + 1 ))}" --dashboard-host=127.0.0.1 \
    --dashboard-port="${DASHBOARD##*:}" --dashboard-agent-listen-port="$(free_port)" --disable-usage-stats
fi
STORAGE=${FASTDRAFT_STORAGE:-$(pwd)/runs}
RECIPE=${FASTDRAFT_RECIPE:-cpu_default}
RUN_DIR=$STORAGE/$(python -c 'import sys; from fastdraft_ray.config import load_config
print(load_config(sys.argv[1]).run_name)' "$RECIPE")

OVERRIDES=("$@")
submit_pipeline() {  # submit the pipeline job and follow it; fail the script if the job fails
  local out job_id status
  # A fresh head needs a few seconds before its job agent accepts submissions: retry only that error.
  for attempt in $(seq 1 30); do
    if out=$(ray job submit --address "$DASHBOARD" --working-dir . --no-wait \
        --runtime-env-json "{\"env_vars\": {\"TORCH_EXTENSIONS_DIR\": \"$TORCH_EXTENSIONS_DIR\"}}" -- \
        python jobs/pipeline.py --config "$RECIPE" storage="$STORAGE" "${OVERRIDES[@]}" 2>&1); then break; fi
    if ! grep -q "No available agent" <<<"$out" || [ "$attempt" = 30 ]; then echo "$out" >&2; exit 1; fi
    sleep 2
  done
  job_id=$(grep -o "raysubmit_[A-Za-z0-9]*" <<<"$out" | head -1)
  echo "=== jobs/pipeline.py --config $RECIPE — $job_id (dashboard: $DASHBOARD)"
  ray job logs --address "$DASHBOARD" --follow "$job_id"
  status=$(ray job status --address "$DASHBOARD" "$job_id" 2>&1)
  if ! grep -qi "succeeded" <<<"$status"; then echo "$status" >&2; echo "job $job_id failed" >&2; exit 1; fi
}

started=$SECONDS
submit_pipeline
echo "run directory: $RUN_DIR ($(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s)"
if [ -f "$RUN_DIR/report/report.md" ]; then
  echo "report: $RUN_DIR/report/report.md (+ results.csv, acceptance.png, loss_curve.png); full evaluation: $RUN_DIR/eval/results.md"
fi
