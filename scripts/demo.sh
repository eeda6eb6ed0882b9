#!/usr/bin/env bash
# The main job end to end on the embedded default (real target, real data, CPU):
# creates .venv, starts a local Ray head with token authentication unless one is running, submits the job
# with `ray job submit`, follows its logs. Extra arguments are config overrides (key.sub=value).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate
export RAY_AUTH_MODE=token  # Ray 2.60 heads require the token in ~/.ray/auth_token
DASHBOARD=${RAY_DASHBOARD:-http://127.0.0.1:8265}
# Any HTTP answer (401 included: token auth is on) means a head is serving there.
dashboard_up() { curl -s -o /dev/null -m 3 "$DASHBOARD/api/version"; }
if ! dashboard_up; then
  echo "starting a local Ray head (dashboard: $DASHBOARD)"
  free_port() { python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
  gcs_port=6379
  if python -c 'import socket, sys; sys.exit(socket.socket().connect_ex(("127.0.0.1", 6379)) != 0)'; then
    gcs_port=$(free_port)  # another Ray instance on this machine holds the default port
  fi
  # The agent's default port 52365 may be taken by another Ray instance; a taken port disables job submission.
  ray start --head --port="$gcs_port" --num-cpus="${RAY_NUM_CPUS:-$(nproc)}" --dashboard-host=127.0.0.1 \
    --dashboard-agent-listen-port="$(free_port)" --disable-usage-stats
fi
STORAGE=${FASTDRAFT_STORAGE:-$(pwd)/runs}
RECIPE=${FASTDRAFT_RECIPE:-cpu_default}
ENTRY=${FASTDRAFT_JOB:-jobs/derive_draft.py}
# A fresh head needs a few seconds before its job agent accepts submissions: retry only that error.
for attempt in $(seq 1 30); do
  if out=$(ray job submit --address "$DASHBOARD" --working-dir . --no-wait -- \
      python "$ENTRY" --config "$RECIPE" storage="$STORAGE" "$@" 2>&1); then break; fi
  if ! grep -q "No available agent" <<<"$out" || [ "$attempt" = 30 ]; then echo "$out" >&2; exit 1; fi
  sleep 2
done
job_id=$(grep -o "raysubmit_[A-Za-z0-9]*" <<<"$out" | head -1)
echo "submitted $job_id ($ENTRY) — dashboard: $DASHBOARD"
ray job logs --address "$DASHBOARD" --follow "$job_id"
status=$(ray job status --address "$DASHBOARD" "$job_id" 2>&1)
if ! grep -qi "succeeded" <<<"$status"; then echo "$status" >&2; echo "job $job_id did not succeed" >&2; exit 1; fi
echo "run directory: $STORAGE/$RECIPE"
