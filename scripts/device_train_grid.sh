#!/usr/bin/env bash
# Train several mini-NLA variants side by side on one lent GPU inside one device call, then pack
# what finished into $OUT. The same call again resumes every variant: phase outputs and mid-phase
# checkpoints live under /root/nla_grid, which survives between calls while the machine is warm.
#
#   bash scripts/device_train_grid.sh train BUDGET_S VARIANTS_FILE   # collect,ar,av,eval per variant
#   bash scripts/device_train_grid.sh grpo  BUDGET_S VARIANTS_FILE   # GRPO on each family's best variant
#   bash scripts/device_train_grid.sh all   BUDGET_S VARIANTS_FILE   # train what is unfinished, then grpo
#                                                                   # with the time left (if >= 4 min)
#
# VARIANTS_FILE: one variant per line, "NAME FAMILY [train_mini_nla.py args ...]"; '#' starts a comment.
# Needs the base GGUFs staged in /root/nla_stage (DEVICE.md) and .whl2/ carried (transformers 5.23:
# the image's 5.17 turns the Gemma-3 GGUF tokenizer into one token per character).
# "Best" for grpo = the higher held-out FVE of the eval phase: chosen on the evaluation slice, which
# the summary states; GRPO then trains on the training slice only.
set -u
MODE=$1 BUDGET=$2 VARIANTS=$3
R=${NLA_GRID_DIR:-/root/nla_grid} PY=${PY:-python3}
mkdir -p "$R/logs"
if [ -d .whl2 ] && [ ! -d /tmp/site2 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl2/*.whl || exit 2
fi
export PYTHONPATH=/tmp/site2:$PWD NLA_RAY_GGUF_DIR=${NLA_RAY_GGUF_DIR:-/root/nla_stage}
export NLA_RAY_CACHE=${NLA_RAY_CACHE:-/root/nla_cache}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false

pack() {  # NAME: what a finished variant has, into $OUT (done as each finishes: a cut call keeps it)
  [ -n "${OUT:-}" ] && [ -f "$R/res/$1/summary.json" ] && tar czf "$OUT/$1.tgz" -C "$R" "pair/$1" "res/$1" "logs/$1.log"
  return 0
}

run_variant() {  # NAME FAMILY BUDGET_S ARGS...
  local name=$1 family=$2 budget=$3; shift 3
  # The hard stop is a last resort (a phase that overruns loses its work since its last checkpoint);
  # the budget makes phases pause in time, and the eval after a phase that just finished is short.
  # It stays inside HARD_S (default 560: a device call ends at 600 s) so packing still happens.
  local hard=$(( budget + 150 )); [ "$hard" -gt "${HARD_S:-560}" ] && hard=${HARD_S:-560}
  timeout --signal=TERM "$hard" "$PY" jobs/train_mini_nla.py --family "$family" --work "$R/work/$name" --pair-out "$R/pair/$name" \
    --out "$R/res/$name" --budget-s "$budget" "$@" < /dev/null >> "$R/logs/$name.log" 2>&1
  echo "[grid] $name exit $?" | tee -a "$R/logs/$name.log"
  pack "$name"
}

END=$(( $(date +%s) + ${BUDGET%.*} ))
left() { echo $(( END - $(date +%s) )); }

train_all() {
  while read -r name family args; do
    [ -z "${name:-}" ] || [ "${name:0:1}" = "#" ] && continue
    [ -f "$R/res/$name/summary.json" ] && { echo "[grid] $name: already evaluated"; continue; }
    # shellcheck disable=SC2086  # args are word lists on purpose
    run_variant "$name" "$family" "$(left)" $args &
  done < "$VARIANTS"
  wait
}

grpo_best() {
  declare -A BEST BEST_FVE BEST_ARGS
  while read -r name family args; do
    [ -z "${name:-}" ] || [ "${name:0:1}" = "#" ] && continue
    fve=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['heldout']['fve_own'])" \
          "$R/res/$name/summary.json" 2>/dev/null) || continue
    [ -f "$R/res/$name/grpo.json" ] && { echo "[grid] $family: GRPO already ran on $name"; BEST_FVE[$family]=done
                                         unset "BEST[$family]"; }
    [ "${BEST_FVE[$family]:-}" = done ] && continue
    if [ -z "${BEST_FVE[$family]:-}" ] || "$PY" -c "import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))" \
         "$fve" "${BEST_FVE[$family]}"; then
      BEST[$family]=$name BEST_FVE[$family]=$fve BEST_ARGS[$family]=$args
    fi
  done < "$VARIANTS"
  for family in "${!BEST[@]}"; do
    echo "[grid] grpo on ${BEST[$family]} (held-out FVE ${BEST_FVE[$family]}), $(left)s left"
    # shellcheck disable=SC2086
    run_variant "${BEST[$family]}" "$family" "$(left)" ${BEST_ARGS[$family]} --phases grpo --promote-grpo \
      ${GRPO_ARGS:-} &
  done
  wait
}

case "$MODE" in
  train) train_all ;;
  grpo) grpo_best ;;
  all) train_all; if [ "$(left)" -ge 240 ]; then grpo_best; else echo "[grid] $(left)s left: no time for grpo"; fi ;;
  *) echo "mode must be train, grpo or all" >&2; exit 2 ;;
esac
for f in "$R"/logs/*.log; do echo "== $f"; grep -E "^\[(ar|av|grpo)\] step|paused|resume|fve_own\"|grid|Error|error" "$f" | tail -4; done
if [ -n "${OUT:-}" ]; then
  for d in "$R"/res/*/; do pack "$(basename "$d")"; done
  tar czf "$OUT/logs.tgz" -C "$R" logs
fi
