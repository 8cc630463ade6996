#!/usr/bin/env bash
# The decode measurements of issue #14 on the GPU machine of this workplace's `device` tool, one model
# per call (each fits the 10-minute limit of a call). Run in the repo root of the call's working tree;
# the bench needs torch and transformers only (no Ray wheels). Results come back under $OUT/<model>/.
#
#   NLA_RAY_GIT_COMMIT=<sha> bash scripts/device_speed.sh gemma3-27b
#   NLA_RAY_GIT_COMMIT=<sha> bash scripts/device_speed.sh qwen2.5-7b
#
# What each call measures (jobs/bench.py): ceilings in the model's own process; extraction and AR;
# the AV decode at batch 128 and 256, 200 new tokens, for HF generate (3 reps, spread reported),
# fused-flash (FlashAttention-2's step) and fused-triton (the Triton step, auto's first choice),
# each greedy and sampled at T = 1 with per-row seeds; the teacher-forced logits check of each fast
# backend; a kernel-time profile of both fused backends at batch 256. Then the whole pipeline at a
# real size: scripts/device_real_size.sh with the Qwen summary as --bench.
set -uo pipefail
model=${1:?model: gemma3-27b or qwen2.5-7b}
[ -n "${NLA_RAY_GIT_COMMIT:-}" ] || export NLA_RAY_GIT_COMMIT=unknown
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}/$model
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
timeout 570 python3 jobs/bench.py --model "$model" --backends hf,fused-flash,fused-triton --batch-sizes 128,256 \
  --reps 3 --hf-reps 3 --sample-temperature 1.0 --profile --out "$out" --budget-s "${BUDGET_S:-470}" \
  > "$out/run.log" 2>&1
echo "bench exit $?"
tail -60 "$out/run.log"
