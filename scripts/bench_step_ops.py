"""Eager ops and host syncs per training step of train_gpt.py's own training loop, with torch.compile on.

    python3 scripts/bench_step_ops.py                              # this checkout's train_gpt.py
    python3 scripts/bench_step_ops.py --script OLD/train_gpt.py    # another version of it, to compare

A GPU step is fastest when the host queues the whole step without waiting: every op outside the compiled
graph is a separate kernel launch (and Python dispatch), and every host sync (reading a value: item(),
float(), a data-dependent shape) stalls the queue. This runs the script's `train` twice on the CPU, for
FEW and MANY steps, under torch.profiler, and prints the difference divided by MANY - FEW: what one step
of the real loop costs, with the oracle's lookups, CROWN-Q, the EMA, the clock and the optimizers, and
without what happens once (the oracle's counting, compiling).

- eager ops: aten ops called from Python, outside any compiled region (an op an op calls is not counted).
- host syncs: aten::_local_scalar_dense (item, float(), int(), bool() of a tensor), ops whose output shape
  depends on values (nonzero, unique, masked_select), and Tensor.tolist calls; called from Python. Those
  an aten op makes inside its CPU kernel (the CPU's fused AdamW reads each step count with item(); the
  CUDA kernel reads it on the device) are counted apart, as syncs_in_cpu_kernels.

The model has the 11-layer model's number of tensors (what the EMA, CROWN-Q and optimizer op counts
depend on) at a width and length that compile in a minute on a CPU. Op counts do not depend on the
device; the syncs a CUDA run would add for copies to the host (tolist of a CUDA tensor) are the tolist
calls counted here.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_ngram import load_script  # noqa: E402  (scripts/ is on sys.path when a script runs)
from make_sample_data import write_shard

ROOT = Path(__file__).resolve().parents[1]
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique", "aten::_unique2",
            "aten::unique_consecutive", "aten::masked_select")
ENV = dict(NUM_LAYERS="11", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", VE_DIM="32", BIGRAM_DIM="32",
           BIGRAM_VOCAB_SIZE="512", TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", TRAIN_BATCH_TOKENS="512",
           GRAD_ACCUM_STEPS="1", VAL_BATCH_SIZE="512", USE_MIXER="learned", NGRAM_ORACLE_TOKENS="20000",
           CROWN_Q_LAMBDA="0.01", LR_WARMUP_STEPS="0", WARMDOWN_ITERS="100000", EMA_DECAY="0.997",
           TRAIN_LOG_EVERY="0", VAL_LOSS_EVERY="0", MAX_WALLCLOCK_SECONDS="3600", COMPILE="1", WARMUP_STEPS="2")


def compiled_region(event) -> bool:
    while event is not None:
        if "Compiled" in event.name or "compiled" in event.name:
            return True
        event = event.cpu_parent
    return False


def profiled_counts(tg, model, train_model, cfg, rt) -> collections.Counter:
    counts = collections.Counter()
    original_tolist = torch.Tensor.tolist

    def counted_tolist(self):
        counts["tolist"] += 1
        return original_tolist(self)

    torch.Tensor.tolist = counted_tolist
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            tg.train(model, train_model, cfg, rt, lambda line: None)
    finally:
        torch.Tensor.tolist = original_tolist
    for event in prof.events():
        if not event.name.startswith("aten::") or compiled_region(event):
            continue
        parent = event.cpu_parent
        from_python = parent is None or not parent.name.startswith("aten::")
        counts["eager_ops"] += from_python
        if event.name in SYNC_OPS:
            caller = parent.cpu_parent if parent is not None and parent.name == "aten::item" else parent
            # boolean indexing (nonzero under aten::index) is Python's own sync
            nested = caller is not None and caller.name.startswith("aten::") and caller.name != "aten::index"
            counts["syncs_in_cpu_kernels" if nested else "syncs"] += 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", type=Path, default=ROOT / "train_gpt.py", help="the train_gpt.py to measure")
    parser.add_argument("--few", type=int, default=10, help="steps of the shorter run (default 10)")
    parser.add_argument("--many", type=int, default=30, help="steps of the longer run (default 30)")
    args = parser.parse_args(argv)
    if not args.script.is_file() or not 1 <= args.few < args.many:
        parser.error("--script must be a file, and 1 <= --few < --many")
    tg = load_script(args.script)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as data:
        tokens = np.random.default_rng(0).integers(0, 1024, size=200_000)
        write_shard(Path(data) / "fineweb_train_000000.bin", tokens)
        runs = {}
        rt = tg.Runtime(0, 1, 0, torch.device("cpu"))
        model = train_model = None
        for steps in (args.few, args.few, args.many):  # the first run compiles; it is not counted
            cfg = tg.Hyperparameters.from_env(dict(ENV, DATA_PATH=data, ITERATIONS=str(steps)), False)
            if model is None:
                torch.manual_seed(0)
                model = tg.GPT(cfg)
                train_model = torch.compile(model, dynamic=False)
            runs[steps] = profiled_counts(tg, model, train_model, cfg, rt)
    per_step = {key: (runs[args.many][key] - runs[args.few][key]) / (args.many - args.few)
                for key in ("eager_ops", "syncs", "tolist", "syncs_in_cpu_kernels")}
    print(f"bench_step_ops script:{args.script} steps:{args.few},{args.many} "
          + " ".join(f"{key}_per_step:{value:.1f}" for key, value in per_step.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
