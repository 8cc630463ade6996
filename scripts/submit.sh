#!/usr/bin/env bash
# Submit a job to a Ray cluster with the git commit attached (the working dir Ray uploads has no .git).
# Usage: bash scripts/submit.sh jobs/reproduce_fve.py --preset paper-gemma27b-L41 [--address http://HEAD:8265]
set -euo pipefail
cd "$(dirname "$0")/.."
ADDR=${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}
args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--address" ]; then ADDR=$2; shift 2; else args+=("$1"); shift; fi
done
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo +dirty)
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
exec ray job submit --address "$ADDR" --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"NLA_RAY_GIT_COMMIT\": \"$COMMIT\"}}" -- python "${args[@]}"
