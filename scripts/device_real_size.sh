#!/usr/bin/env bash
# Run scripts/real_size_pipeline.py (issue #14) on the GPU machine of this workplace's `device` tool, in
# one call: a random-weight Qwen2.5-7B pair built in /root/realsize (reused when a complete one is still
# there), then reproduce_fve and best_of_n through the three pools on one GPU. Results come back in $OUT.
#
# Before it, with back-to-back calls (the machine keeps /root while it stays warm):
#   - the Ray wheels: carry .stage/w0, then .stage/w1, then .stage/w2, each `bash .stage/wN/stage_in.sh`
#     (they reassemble /root/nla_stage/wheels.tar; or carry .whl directly when the tree leaves room);
#   - here, once: `python scripts/real_size_pipeline.py --export-tokenizer runs/realsize/tokenizer`.
# The call itself: carry ["runs/realsize/tokenizer", ".stage/corpus"], command
#   NLA_RAY_GIT_COMMIT=<sha[+dirty]> bash scripts/device_real_size.sh [more real_size_pipeline.py options]
set -uo pipefail
# The wheels: a staged tar (unpacked once), or .whl / .whl2 folders carried in the call; each installed once.
[ -f /root/nla_stage/wheels.tar ] && [ ! -d /root/nla_stage/.whl ] && tar xf /root/nla_stage/wheels.tar -C /root/nla_stage
for w in ${WHEEL_DIRS:-/root/nla_stage/.whl /root/nla_stage/.whl2 .whl .whl2}; do
  [ -d "$w" ] && [ ! -f "$w/.installed" ] && {
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /root/site "$w"/*.whl >/dev/null 2>&1 \
      || { echo "installing the wheels of $w failed"; exit 1; }
    touch "$w/.installed"; }
done
python3 -c "import ray" 2>/dev/null || PYTHONPATH=/root/site python3 -c "import ray" \
  || { echo "no Ray: stage the wheels first (.stage/w0..w2) or carry .whl"; exit 1; }
export PYTHONPATH=/root/site PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token TOKENIZERS_PARALLELISM=false
export NLA_RAY_CACHE=/root/nla_cache NLA_RAY_STORE=/root/nla_store
# The device's copy of the tree may carry another .git: the caller passes the commit, or provenance says so.
[ -n "${NLA_RAY_GIT_COMMIT:-}" ] || export NLA_RAY_GIT_COMMIT=unknown
args=(--work "${WORK:-/root/realsize}")
[ -d runs/realsize/tokenizer ] && args+=(--tokenizer runs/realsize/tokenizer) \
  || echo "warning: runs/realsize/tokenizer not carried: the tokenizer comes from the SmolLM2 package, if staged"
[ -f .stage/corpus/c4c.tgz ] && args+=(--docs-from .stage/corpus/c4c.tgz) \
  || echo "warning: .stage/corpus/c4c.tgz not carried: only the stand-ins' six built-in documents"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader; df -h /root | tail -1
python3 scripts/real_size_pipeline.py "${args[@]}" "$@"
