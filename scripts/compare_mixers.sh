#!/usr/bin/env bash
# Side-by-side val_bpb of the mixers: the demo model (scripts/run_demo.sh), trained to the same ITERATIONS
# (default the demo's 200), one run per mode in MODES (default "none hedge learned"), ~4-5 minutes each
# at 200 steps on a 2-core CPU:
#   none     USE_MIXER=none: trains and evaluates the model alone
#   hedge    USE_MIXER=hedge, EVAL_ARTIFACT=the none run's artifact: evaluation only. Hedge adds no
#            parameters, so the weights trained for `none` serve it unchanged (run `none` first)
#   learned  USE_MIXER=learned: trains with the oracle and the mixer head, evaluates with its cache
#   prior    learned with NGRAM_PRIOR_BETA=${PRIOR_BETA:-2} (experts smoothed towards the neural model)
# Run ids are ${TAG}_<mode> (TAG default "mix"), so a ladder of sizes or corpora keeps every log. Then
# prints one row per mode from logs/<RUN_ID>.txt: steps, the final neural sliding-window val_bpb, the
# final val_bpb (the mixture's, or the sliding window's with none), the gain of the final over the none
# run's (logs/${BASE_TAG:-$TAG}_none.txt: BASE_TAG compares with another TAG's none run, e.g. for
# NGRAM_ORACLE_TOKENS=200000 passed through the environment), and the evaluation's neural and cache
# milliseconds (eval_phases). scripts/plot_ladder.py tabulates and plots the logs of several TAGs.
#   bash scripts/compare_mixers.sh
#   TAG=prose800 MODES="none learned prior" ITERATIONS=800 DATA_PATH=data/datasets/prose_sp1024 \
#       TOKENIZER_PATH=data/tokenizers/prose_1024_bpe.model bash scripts/compare_mixers.sh
# Any other run_demo.sh setting passes through the environment too (RUN_ID and USE_MIXER are set here).
# MAX_WALLCLOCK_SECONDS defaults to 0 (no cap) here, so that every run trains to ITERATIONS however busy
# the machine is, and WARMDOWN_ITERS to 30% of ITERATIONS (the demo's 60 of 200). On a CPU that other
# work keeps busy, LOCAL_WORLD_SIZE=2 gives train_gpt.py one thread per 2 cores; threads that wait on
# each other there can make a step ten times slower.
set -euo pipefail
export TTT_ENABLED="${TTT_ENABLED:-0}"  # the stream's sliding window: the scores compared below
cd "$(dirname "$0")/.."
export ITERATIONS="${ITERATIONS:-200}" MAX_WALLCLOCK_SECONDS="${MAX_WALLCLOCK_SECONDS:-0}"
export WARMDOWN_ITERS="${WARMDOWN_ITERS:-$((ITERATIONS * 3 / 10))}"
TAG="${TAG:-mix}" MODES="${MODES:-none hedge learned}"
for mode in $MODES; do
  case "$mode" in none|hedge|learned|prior) ;; *)
    echo "compare_mixers: MODES has '$mode': allowed are none, hedge, learned, prior" >&2; exit 2 ;; esac
done
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

for mode in $MODES; do
  case "$mode" in
    none|learned) demo_run "${TAG}_${mode}" USE_MIXER="$mode" ;;
    hedge) demo_run "${TAG}_hedge" USE_MIXER=hedge EVAL_ARTIFACT="artifacts/${TAG}_none.pgqw" ;;
    prior) demo_run "${TAG}_prior" USE_MIXER=learned NGRAM_PRIOR_BETA="${PRIOR_BETA:-2}" ;;
  esac
done

echo
echo "compare_mixers TAG=${TAG} ITERATIONS=${ITERATIONS} DATA_PATH=${DATA_PATH:-the sample corpus}"
row='%-8s  %-20s  %-6s  %-12s  %-12s  %-9s  %-10s  %-9s\n'
printf "$row" mode run_id steps neural_bpb final_bpb gain neural_ms cache_ms
base="$(log_value "logs/${BASE_TAG:-$TAG}_none.txt" 'val_bpb:' val_bpb 2>/dev/null || true)"
for mode in $MODES; do
  log="logs/${TAG}_${mode}.txt"
  final="$(log_value "$log" 'val_bpb:' val_bpb)"
  gain="$(awk -v a="$base" -v b="$final" 'BEGIN { if (a != "") printf "%.4f", a - b; else print "-" }')"
  steps="$(log_value "$log" '^train_done ' steps)"
  printf "$row" "$mode" "${TAG}_${mode}" "${steps:-(none)}" "$(log_value "$log" '^final_sliding_window_exact ' val_bpb)" \
    "$final" "$gain" "$(log_value "$log" '^eval_phases ' neural)" "$(log_value "$log" '^eval_phases ' cache)"
done
