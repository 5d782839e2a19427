#!/usr/bin/env bash
# Held-out check of the neural stack's defaults against the stack before them: the demo's settings
# (scripts/run_demo.sh) at NUM_LAYERS=11 and width 128, so that layer-indexed defaults mean what they mean at
# full size (XSA on all 11, lanes from layer 7, layers 4-5 looped), one run per stack and seed:
#   new  the defaults
#   off  every technique of docs/frontier.md off: PARALLEL_RESIDUAL=0 NUM_LOOPS=0 XSA_LAST_N=4
#        QK_GAIN_INIT=1.5 MUON_ROW_NORMALIZE=0 MUON_MOMENTUM=0.99 SMEAR_GATE=0 GATE_ATTN_OUT=0 LN_SCALE=0
#        DISABLE_LAYER0_ATTN=0 SKIP_GATES_ENABLED=0
# USE_MIXER=none: the check is of the neural model (the mixer's worth is docs/measurements.md's ladder).
# Prints one row per run (steps, ms per step, the final sliding-window val_bpb of the artifact) and each
# stack's mean with its seed spread (max - min). A 0.002 bpb gain is far below what this scale resolves:
# the check catches breakage, not the published gains.
#   DATA_PATH=data/datasets/prose_sp1024 TOKENIZER_PATH=data/tokenizers/prose_1024_bpe.model \
#       bash scripts/compare_stacks.sh
# SEEDS (default "1337 42"), STACKS (default "new off"), TAG (run ids ${TAG}_<stack>_<seed>, default
# "stack"), ITERATIONS (default 300) and any other run_demo.sh setting pass through the environment;
# TABLE_ONLY=1 prints the table from the logs of earlier runs (e.g. of STACKS=new and STACKS=off run side
# by side with LOCAL_WORLD_SIZE=2, one thread each).
set -euo pipefail
export TTT_ENABLED="${TTT_ENABLED:-0}"  # the stream's sliding window: the scores compared below
cd "$(dirname "$0")/.."
export ITERATIONS="${ITERATIONS:-300}" MAX_WALLCLOCK_SECONDS="${MAX_WALLCLOCK_SECONDS:-0}"
export WARMDOWN_ITERS="${WARMDOWN_ITERS:-$((ITERATIONS * 3 / 10))}" NUM_LAYERS="${NUM_LAYERS:-11}"
export USE_MIXER=none VAL_LOSS_EVERY="${VAL_LOSS_EVERY:-0}"
TAG="${TAG:-stack}" SEEDS="${SEEDS:-1337 42}" STACKS="${STACKS:-new off}"
OFF=(PARALLEL_RESIDUAL=0 NUM_LOOPS=0 XSA_LAST_N=4 QK_GAIN_INIT=1.5 MUON_ROW_NORMALIZE=0 MUON_MOMENTUM=0.99
     SMEAR_GATE=0 GATE_ATTN_OUT=0 LN_SCALE=0 DISABLE_LAYER0_ATTN=0 SKIP_GATES_ENABLED=0)
for stack in $STACKS; do
  case "$stack" in new|off) ;; *) echo "compare_stacks: STACKS has '$stack': allowed are new, off" >&2; exit 2 ;; esac
done
mkdir -p logs

log_value() {  # log_value LOG REGEX KEY: the KEY:value of the last line of LOG matching REGEX
  awk -v pattern="$2" -v key="$3:" '$0 ~ pattern {
    for (i = 1; i <= NF; i++) if (index($i, key) == 1) value = substr($i, length(key) + 1)
  } END { print value }' "$1"
}

for stack in $STACKS; do
  for seed in $SEEDS; do
    [ "${TABLE_ONLY:-0}" = 1 ] && continue
    run_id="${TAG}_${stack}_${seed}"
    settings=(SEED="$seed")
    [ "$stack" = off ] && settings+=("${OFF[@]}")
    echo "compare_stacks run:${run_id} ${settings[*]} (log: logs/${run_id}.txt)"
    if ! env "${settings[@]}" RUN_ID="$run_id" bash scripts/run_demo.sh > "logs/${run_id}.out" 2>&1; then
      tail -n 20 "logs/${run_id}.out" >&2
      echo "compare_stacks: run ${run_id} failed (output: logs/${run_id}.out)" >&2
      exit 1
    fi
  done
done

echo
printf '| stack | seed | steps | ms/step | final sliding val_bpb |\n|---|---|---|---|---|\n'
for stack in $STACKS; do
  scores=()
  for seed in $SEEDS; do
    log="logs/${TAG}_${stack}_${seed}.txt"
    bpb=$(log_value "$log" '^final_sliding_window_exact ' val_bpb)
    scores+=("$bpb")
    printf '| %s | %s | %s | %s | %s |\n' "$stack" "$seed" "$(log_value "$log" '^train_done' steps)" \
      "$(log_value "$log" '^train_done' step_avg | tr -d 'ms')" "$bpb"
  done
  printf '%s\n' "${scores[@]}" | awk -v stack="$stack" '{ s += $1; if (NR == 1 || $1 < lo) lo = $1;
    if (NR == 1 || $1 > hi) hi = $1 } END { printf "| %s | mean of %d | | | %.5f (spread %.5f) |\n", stack, NR,
    s / NR, hi - lo }'
done
