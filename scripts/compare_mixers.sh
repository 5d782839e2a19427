#!/usr/bin/env bash
# Side-by-side val_bpb of USE_MIXER=none, hedge and learned: the demo model (scripts/run_demo.sh) on the
# sample corpus, trained to the same ITERATIONS (default the demo's 200). Three runs, ~4-5 minutes each on
# a 2-core CPU:
#   mix_learned  USE_MIXER=learned: trains with the oracle and the mixer head, evaluates with its cache
#   mix_none     USE_MIXER=none: trains and evaluates the model alone
#   mix_hedge    USE_MIXER=hedge, EVAL_ARTIFACT=artifacts/mix_none.pgqw: evaluation only. Hedge adds no
#                parameters, so the weights trained for mix_none serve it unchanged.
# Then prints one row per mode from logs/<RUN_ID>.txt: the final neural sliding-window val_bpb, the run's
# final val_bpb (its last val_bpb line: the mixture's, or the sliding window's with USE_MIXER=none), the
# sliding-window evaluation's time (neural pass and cache together) and the whole final evaluation's.
#   bash scripts/compare_mixers.sh
#   ITERATIONS=400 bash scripts/compare_mixers.sh
# Any other run_demo.sh setting passes through the environment too (RUN_ID and USE_MIXER are set here).
# MAX_WALLCLOCK_SECONDS defaults to 0 (no cap) here, so that every run trains to ITERATIONS however busy
# the machine is. On a CPU that other work keeps busy, LOCAL_WORLD_SIZE=2 gives train_gpt.py one thread
# per 2 cores; threads that wait on each other there can make a step ten times slower.
set -euo pipefail
cd "$(dirname "$0")/.."
export ITERATIONS="${ITERATIONS:-200}" MAX_WALLCLOCK_SECONDS="${MAX_WALLCLOCK_SECONDS:-0}"
mkdir -p logs

demo_run() {  # demo_run RUN_ID VAR=VALUE...: run_demo.sh with those settings, its output in logs/RUN_ID.out
  local run_id=$1
  shift
  echo "compare_mixers run:${run_id} $* ITERATIONS=${ITERATIONS} (log: logs/${run_id}.txt)"
  if ! env "$@" RUN_ID="$run_id" bash scripts/run_demo.sh > "logs/${run_id}.out" 2>&1; then
    tail -n 20 "logs/${run_id}.out" >&2
    echo "compare_mixers: run ${run_id} failed (output: logs/${run_id}.out)" >&2
    exit 1
  fi
}

log_value() {  # log_value LOG REGEX KEY: the KEY:value of the last line of LOG matching REGEX
  awk -v pattern="$2" -v key="$3:" '$0 ~ pattern {
    for (i = 1; i <= NF; i++) if (index($i, key) == 1) value = substr($i, length(key) + 1)
  } END { print value }' "$1"
}

seconds() {  # "14291ms" -> "14.3"
  awk -v ms="${1%ms}" 'BEGIN { printf "%.1f", ms / 1000 }'
}

demo_run mix_learned USE_MIXER=learned
demo_run mix_none USE_MIXER=none
demo_run mix_hedge USE_MIXER=hedge EVAL_ARTIFACT=artifacts/mix_none.pgqw

echo
echo "compare_mixers ITERATIONS=${ITERATIONS}: demo model on the sample corpus; none and hedge score the same weights"
row='%-8s  %-12s  %-16s  %-20s  %-20s  %-15s  %-12s\n'
printf "$row" mode run_id trained_steps neural_sliding_bpb final_bpb sliding_eval_s eval_total_s
for mode in none hedge learned; do
  log="logs/mix_${mode}.txt"
  steps="$(log_value "$log" '^train_done ' steps)"
  printf "$row" "$mode" "mix_${mode}" "${steps:-$(log_value logs/mix_none.txt '^train_done ' steps) (mix_none)}" \
    "$(log_value "$log" '^final_sliding_window_exact ' val_bpb)" \
    "$(log_value "$log" 'val_bpb:' val_bpb)" \
    "$(seconds "$(log_value "$log" '^final_sliding_window ' eval_time)")" \
    "$(seconds "$(log_value "$log" '^eval_done ' eval_time)")"
done
