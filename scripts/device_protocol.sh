#!/usr/bin/env bash
# Run analysis jobs at the paper's protocol size (1000 activations from 200 held-out documents) on
# the GPU machine of this workplace's `device` tool, after the packaged models were staged there
# (../shared/device/stage_models.sh chunks, one call each). Usage, inside a device call that carries
# .whl:  bash scripts/device_protocol.sh JOB[,JOB...] [PRESET[,PRESET...]]
# Each job writes results/<job>/<preset>/ (summary.json, table.md, figures); this script copies
# them into $OUT/<job>-<preset>/ and a log per job, so they come back with the call.
set -uo pipefail
# Wheels may come in several calls (one call carries at most 64 MiB), or staged as a tar of .whl and
# .whl2 (WHEEL_DIRS="/root/nla_stage/.whl /root/nla_stage/.whl2"): install whatever came, once.
[ -f /root/nla_stage/wheels.tar ] && [ ! -d /root/nla_stage/.whl ] && tar xf /root/nla_stage/wheels.tar -C /root/nla_stage
for w in ${WHEEL_DIRS:-.whl .whl2}; do
  [ -d "$w" ] && [ ! -f "$w/.installed" ] && {
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /root/site "$w"/*.whl >/dev/null 2>&1 || exit 1
    touch "$w/.installed"; }
done
export PYTHONPATH=/root/site NLA_RAY_GGUF_DIR=/root/nla_stage PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token
export NLA_RAY_CACHE=/root/nla_cache NLA_RAY_STORE=/root/nla_store TOKENIZERS_PARALLELISM=false
# The device's copy of the tree may carry another .git than the checkout it came from: pass the commit
# (the caller's `git rev-parse HEAD`, +dirty if so) as NLA_RAY_GIT_COMMIT, or provenance says "unknown".
[ -n "${NLA_RAY_GIT_COMMIT:-}" ] || export NLA_RAY_GIT_COMMIT=unknown
JOBS=${1:?jobs}; PRESETS=${2:-mini}
# The mini models are small: every pool shares the one GPU, fp32 (Gemma-3-270M in bf16 degenerates).
GPU_SETS=(--set pools.extract.num_gpus=0.1 --set pools.av.num_gpus=0.4 --set pools.ar.num_gpus=0.1
          --set pools.extract.batch_size=32 --set pools.av.batch_size=256 --set pools.ar.batch_size=128
          --set pools.extract.dtype=float32 --set pools.av.dtype=float32 --set pools.ar.dtype=float32
          --set av.backend=fast --set pools.av.num_cpus=2 --n ${N:-1000})
for job in ${JOBS//,/ }; do
  for preset in ${PRESETS//,/ }; do
    out=results/$job/$preset
    extra=(); [ -n "${JOB_ARGS:-}" ] && read -r -a extra <<< "$JOB_ARGS"
    echo "=== $job $preset $(date -u +%T)"
    python3 jobs/$job.py --preset "$preset" --out "$out" "${GPU_SETS[@]}" "${extra[@]}" > "$OUT/$job-$preset.log" 2>&1
    echo "exit $? $(date -u +%T)"; tail -5 "$OUT/$job-$preset.log"
    mkdir -p "$OUT/$job-$preset"
    cp "$out"/*.json "$out"/*.md "$out"/*.png "$OUT/$job-$preset/" 2>/dev/null
  done
done
