#!/usr/bin/env bash
# Issue 22's check on prose at this machine's scale: sp1024 against sp8192 (tokenizers trained on the prose's
# training part), 11 layers at width 128 (4 heads, 2 KV heads, MLP 3x for both vocabularies), the held-out
# check's settings (scripts/compare_stacks.sh through scripts/run_demo.sh), USE_MIXER=none, two seeds.
# The rest of each vocabulary's recipe is its default (VOCAB_RECIPES); the demo's small BigramHash
# (2048 x 64) and value-embedding width 64 are kept for sp1024, where the recipe has them on.
# Two runs at a time, one thread each (LOCAL_WORLD_SIZE=2); longest first.
#   ITERATIONS=80 bash scripts/prose_vocab.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export ITERATIONS="${ITERATIONS:-120}"
TAG="${TAG:-prose}" SEEDS="${SEEDS:-1337 42}"
mkdir -p logs
run_one() {  # run_one VOCAB SEED
  local v=$1 seed=$2 extra=()
  [ "$v" = 1024 ] && extra=(BIGRAM_VOCAB_SIZE=2048)
  env "${extra[@]}" VOCAB_SIZE="$v" SEED="$seed" RUN_ID="${TAG}_sp${v}_${seed}" \
    DATA_PATH="data/datasets/prose_sp${v}" TOKENIZER_PATH="data/tokenizers/prose_${v}_bpe.model" \
    NUM_LAYERS=11 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=3 BIGRAM_DIM=64 VE_DIM=64 \
    TRAIN_SEQ_LEN=256 EVAL_SEQ_LEN=256 EVAL_STRIDE=64 TRAIN_BATCH_TOKENS=4096 GRAD_ACCUM_STEPS=1 \
    VAL_BATCH_SIZE=32768 LR_WARMUP_STEPS=10 WARMDOWN_ITERS=$((ITERATIONS * 3 / 10)) \
    MUON_MOMENTUM_WARMUP_STEPS=50 MAX_WALLCLOCK_SECONDS=0 TRAIN_LOG_EVERY=20 VAL_LOSS_EVERY=0 \
    USE_MIXER=none TTT_ENABLED=0 QUANT_MIN_NUMEL=4096 GPTQ_CALIB_SEQS=16 GPTQ_CALIB_SEQ_LEN=256 COMPILE=0 LOCAL_WORLD_SIZE=2 \
    python3 train_gpt.py > "logs/${TAG}_sp${v}_${seed}.out" 2>&1 \
    || echo "prose_vocab: run ${TAG}_sp${v}_${seed} failed (logs/${TAG}_sp${v}_${seed}.out)" >&2
}
export -f run_one; export TAG
if [ "${TABLE_ONLY:-0}" != 1 ]; then
  for seed in $SEEDS; do printf '8192 %s\n1024 %s\n' "$seed" "$seed"; done | xargs -P 2 -L 1 bash -c 'run_one "$@"' _
fi
val() { awk -v p="$2" -v k="$3:" '$0 ~ p { for (i = 1; i <= NF; i++) if (index($i, k) == 1) x = substr($i, length(k) + 1) } END { print x }' "$1"; }
printf '| vocab | seed | steps | ms/step | final_plain val_bpb | final_sliding val_bpb | scored_bytes | total bytes |\n|---|---|---|---|---|---|---|---|\n'
for v in 1024 8192; do
  for seed in $SEEDS; do
    log="logs/${TAG}_sp${v}_${seed}.txt"; [ -f "$log" ] || continue
    printf '| sp%s | %s | %s | %s | %s | %s | %s | %s |\n' "$v" "$seed" "$(val "$log" '^train_done' steps)" \
      "$(val "$log" '^train_done' step_avg | tr -d ms)" "$(val "$log" '^final_plain_exact' val_bpb)" \
      "$(val "$log" '^final_sliding_window_exact' val_bpb)" "$(val "$log" '^final_sliding_window ' scored_bytes)" \
      "$(awk '/^Total submission size/ { print $5 }' "$log")"
  done
done
