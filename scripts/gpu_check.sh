#!/usr/bin/env bash
# What only a GPU shows, in one command: the 11-layer default at one GPU's share of the 8-GPU batch (98,304
# tokens) through three preflights (scripts/preflight.py): sp1024 with the mixer and its oracle and without (the
# first evaluating a multi-million-token slice), and the sp8192 default (VOCAB_SIZE=8192, its recipe); then one
# table. About 8-11 minutes on one H100 or H200.
#   bash scripts/gpu_check.sh                    # no network needed; logs in logs/gpu_check_*_preflight.txt
#   GPU_CHECK_TINY=1 bash scripts/gpu_check.sh   # a tiny model on the CPU in a minute: the tests run this
# Data: DATA_PATH and TOKENIZER_PATH when set, else the sample corpus (scripts/make_sample_data.py). The
# evaluation slice is GPU_CHECK_EVAL_TOKENS tokens (default 4M) of the training shards written as a
# validation split under data/datasets/ of the current folder: right for timing, meaningless as a score
# (no score line is printed). The sp8192 column uses SP8192_DATA_PATH and SP8192_TOKENIZER_PATH when set, else
# the sample corpus with an 8192-piece tokenizer. Logs go to logs/ of the current folder.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python3 -c 'import importlib.util as u, sys
missing = [m for m in ("torch", "numpy", "sentencepiece", "zstandard", "brotli") if u.find_spec(m) is None]
sys.exit("error: gpu_check needs the Python packages " + ", ".join(missing) + ": pip install them" if missing else 0)'

tiny="${GPU_CHECK_TINY:-0}"
if [[ "$tiny" != 0 && "$tiny" != 1 ]]; then
  echo "error: GPU_CHECK_TINY=$tiny is not allowed: 0 or 1" >&2; exit 2
fi
if [[ -n "${GPU_CHECK_EVAL_TOKENS:-}" && ! "${GPU_CHECK_EVAL_TOKENS}" =~ ^[0-9]+$ || "${GPU_CHECK_EVAL_TOKENS:-2}" -lt 2 ]]; then
  echo "error: GPU_CHECK_EVAL_TOKENS=${GPU_CHECK_EVAL_TOKENS} is not allowed: a whole number of tokens, at least 2" >&2
  exit 2
fi
if [[ "$tiny" == 1 ]]; then
  eval_tokens="${GPU_CHECK_EVAL_TOKENS:-8000}"
  export NUM_LAYERS="${NUM_LAYERS:-2}" MODEL_DIM="${MODEL_DIM:-32}" NUM_HEADS="${NUM_HEADS:-2}"
  export NUM_KV_HEADS="${NUM_KV_HEADS:-1}" MLP_MULT="${MLP_MULT:-2}" ROPE_DIMS="${ROPE_DIMS:-8}"
  export BIGRAM_VOCAB_SIZE="${BIGRAM_VOCAB_SIZE:-64}" BIGRAM_DIM="${BIGRAM_DIM:-8}" VE_DIM="${VE_DIM:-8}"
  export TRAIN_SEQ_LEN="${TRAIN_SEQ_LEN:-32}" EVAL_SEQ_LEN="${EVAL_SEQ_LEN:-32}" EVAL_STRIDE="${EVAL_STRIDE:-8}"
  export TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-256}" VAL_BATCH_SIZE="${VAL_BATCH_SIZE:-2048}"
  export NGRAM_CHUNK_TOKENS="${NGRAM_CHUNK_TOKENS:-4096}" QUANT_MIN_NUMEL="${QUANT_MIN_NUMEL:-512}"
  export GPTQ_CALIB_SEQS="${GPTQ_CALIB_SEQS:-4}" GPTQ_CALIB_SEQ_LEN="${GPTQ_CALIB_SEQ_LEN:-32}"
  export TTT_BATCH_SIZE="${TTT_BATCH_SIZE:-8}" TTT_LORA_RANK="${TTT_LORA_RANK:-8}"
else
  eval_tokens="${GPU_CHECK_EVAL_TOKENS:-4000000}"
  export TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-98304}"
fi
export GRAD_ACCUM_STEPS="${GRAD_ACCUM_STEPS:-1}"
if [[ -z "${DATA_PATH:-}" ]]; then
  python3 "$root/scripts/make_sample_data.py"
  DATA_PATH="$root/data/datasets/sample_sp1024" TOKENIZER_PATH="$root/data/tokenizers/sample_1024_bpe.model"
fi
if [[ -z "${SP8192_DATA_PATH:-}" ]]; then  # tiny: a small corpus, enough text for 8192 pieces
  chars=$([[ "$tiny" == 1 ]] && echo "--max-train-chars 1500000 --max-val-chars 50000" || echo "")
  python3 "$root/scripts/make_sample_data.py" --vocab-size 8192 $chars --out data/datasets/gpu_check_sample_sp8192 \
    --tokenizer-out data/tokenizers/gpu_check_sample_8192_bpe.model
  SP8192_DATA_PATH=data/datasets/gpu_check_sample_sp8192
  SP8192_TOKENIZER_PATH=data/tokenizers/gpu_check_sample_8192_bpe.model
fi
slice_of() {  # SOURCE TARGET: the training shards linked, the first $eval_tokens of them as the validation split
python3 - "$root" "$1" "$2" "$eval_tokens" <<'EOF'
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [sys.argv[1], f"{sys.argv[1]}/scripts"]
from make_sample_data import write_shard  # noqa: E402
import train_gpt as tg  # noqa: E402

source, target, count = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
try:
    train = tg.shard_files(source, "train")
except tg.ShardError as err:
    sys.exit(f"error: {err}")
target.mkdir(parents=True, exist_ok=True)
for f in train:  # the same training shards, linked
    link = target / Path(f).name
    if not link.exists():
        link.symlink_to(Path(f).resolve())
tokens = tg.oracle_tokens_from_shards(train, 65536, count)  # the first `count` only: FineWeb has billions
write_shard(target / "fineweb_val_000000.bin", np.resize(tokens, count))
EOF
}
slice_of "$DATA_PATH" "data/datasets/gpu_check_$eval_tokens"
slice_of "$SP8192_DATA_PATH" "data/datasets/gpu_check_sp8192_$eval_tokens"

status=0
for mode in mixer none sp8192; do  # the later ones evaluate the preflight's default slice
  mixer=$([[ $mode == none ]] && echo none || echo learned)
  slice=$([[ $mode == mixer ]] && echo "--eval-tokens $eval_tokens" || echo "")
  vocab=$([[ $mode == sp8192 ]] && echo 8192 || echo "${VOCAB_SIZE:-1024}")
  data=$([[ $mode == sp8192 ]] && echo "data/datasets/gpu_check_sp8192_$eval_tokens" || echo "data/datasets/gpu_check_$eval_tokens")
  tok=$([[ $mode == sp8192 ]] && echo "$SP8192_TOKENIZER_PATH" || echo "$TOKENIZER_PATH")
  set +e
  VOCAB_SIZE="$vocab" DATA_PATH="$data" TOKENIZER_PATH="$tok" USE_MIXER="$mixer" RUN_ID="gpu_check_$mode" \
    python3 "$root/scripts/preflight.py" $slice
  rc=$?
  set -e
  if [[ $rc -ne 0 && $rc -ne 3 ]]; then echo "error: the $mode preflight failed (exit $rc)" >&2; exit $rc; fi
  [[ $rc -eq 3 ]] && status=3
done

python3 - logs/gpu_check_mixer_preflight.txt logs/gpu_check_none_preflight.txt logs/gpu_check_sp8192_preflight.txt <<'EOF'
import re
import sys

logs = [open(path).read() for path in sys.argv[1:]]


def field(log, pattern, scale=1.0, fmt="{:.1f}"):
    m = re.search(pattern, log, re.M)
    if not m:
        return "-"
    return fmt.format(m.group(1)) if fmt == "{}" else fmt.format(float(m.group(1)) * scale)


def eval_rate(log):
    m = re.search(r"^preflight_evaluation tokens:(\d+) .*neural:(\S+)s .*cache:(\S+)s", log, re.M)
    return (f"{int(m.group(1)) / max(float(m.group(2)), 1e-9):,.0f}", f"{m.group(3)} s") if m else ("-", "-")


rows = [
    ("hardware", [field(log, r" hardware:(\S+)", fmt="{}") for log in logs]),
    ("compile before training (s)", [field(log, r"^compile_warmup phase:train .* time:(\d+)ms", 1e-3) for log in logs]),
    ("compile before evaluation (s)", [field(log, r"^compile_warmup phase:eval .* time:(\d+)ms", 1e-3) for log in logs]),
    ("ms per step (TRAIN_BATCH_TOKENS)", [field(log, r"^preflight_steps step_avg:(\S+)ms", fmt="{:.2f}") for log in logs]),
    ("steps in the training budget", [field(log, r"^preflight_steps .* projected:(\d+) ", fmt="{:.0f}") for log in logs]),
    ("oracle prefill, projected (s)", [field(log, r"^preflight_oracle .* projected:(\S+)s ") for log in logs]),
    ("artifact build (s)", [field(log, r"^preflight_artifact .* projected:(\S+)s ") for log in logs]),
    ("peak memory, projected (GB)", [field(log, r"^preflight_(?:device|host)_memory .* projected:(\S+)GB ", fmt="{:.2f}")
                                     for log in logs]),
    ("evaluation slice (tokens)", [field(log, r"^preflight_evaluation tokens:(\d+) ", fmt="{:,.0f}") for log in logs]),
    ("neural pass, LoRA TTT's steps included (tokens/s)", [eval_rate(log)[0] for log in logs]),
    ("LoRA steps' padding (%)", [field(log, r"^ttt_done .* padding:(\S+)%", fmt="{}") for log in logs]),
    ("phases' global SGD on the slice (s)", [field(log, r"^ttt_done .* global_sgd:(\S+)s ", fmt="{}") for log in logs]),
    ("cache pass", [eval_rate(log)[1] for log in logs]),
    ("evaluation, projected to the split (s)", [field(log, r"^preflight_evaluation .* projected:(\S+)s ") for log in logs]),
    ("preflight verdict", [field(log, r"^preflight verdict:(\S+(?: over:\S+)?)", fmt="{}") for log in logs]),
]
print("\n| gpu_check | sp1024 USE_MIXER=learned | sp1024 USE_MIXER=none | sp8192 default |\n|---|---|---|---|")
for name, values in rows:
    print(f"| {name} | {' | '.join(values)} |")
EOF
exit $status
