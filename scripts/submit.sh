#!/usr/bin/env bash
# Submit a job to a Ray cluster with the git commit attached (the working dir Ray uploads has no .git).
# Usage: bash scripts/submit.sh jobs/reproduce_fve.py --preset paper-gemma27b-L41 --out /abs/dir [--address http://HEAD:8265]
# The job's `python` is the head's: start the head from a shell with the project's environment active
# (README, "On a Ray cluster").
set -euo pipefail
cd "$(dirname "$0")/.."
ADDR=${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}
args=()
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --address) ADDR=$2; shift 2 ;;
    --out) out=$2; args+=("$1" "$2"); shift 2 ;;
    --out=*) out=${1#--out=}; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ ${#args[@]} -eq 0 ]; then
  echo "usage: bash scripts/submit.sh jobs/JOB.py --preset P --out /abs/dir [--address http://HEAD:8265]" >&2
  exit 2
fi
case "$out" in
  /*) ;;
  "") echo "[submit] note: no --out; the job writes runs/... inside Ray's copy of the working dir on the head" >&2 ;;
  *) echo "[submit] note: --out $out is relative to Ray's copy of the working dir on the head; give an absolute path" >&2 ;;
esac
# This checkout's own Ray CLI when there is one: the same version as the project's, whatever the PATH.
RAY=ray
[ -x .venv/bin/ray ] && RAY=.venv/bin/ray
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo +dirty)
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
exec "$RAY" job submit --address "$ADDR" --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"NLA_RAY_GIT_COMMIT\": \"$COMMIT\"}}" -- python "${args[@]}"
