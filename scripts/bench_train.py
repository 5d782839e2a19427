"""Training throughput of a train_gpt.py configuration: ms per optimizer step and tokens per second.

    python3 scripts/bench_train.py --preset demo            # the README's CPU demo model
    python3 scripts/bench_train.py --preset full            # the 11-layer model, one GPU's share of 8
    NUM_LAYERS=6 MODEL_DIM=256 python3 scripts/bench_train.py --steps 20

Settings come from the same environment variables as train_gpt.py (a preset only fills in the ones not
set). Steps run the script's own `train_step` (forward, backward, Muon and AdamW) on random tokens: the
speed of a step does not depend on the token values, and no data files are needed. The first
--warmup steps (compilation, allocator warm-up) are not timed.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

PRESETS = {
    # The README's CPU demo (scripts/run_demo.sh).
    "demo": dict(NUM_LAYERS="4", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="3",
                 TRAIN_SEQ_LEN="256", TRAIN_BATCH_TOKENS="8192", GRAD_ACCUM_STEPS="1", BIGRAM_VOCAB_SIZE="2048",
                 BIGRAM_DIM="64", VE_DIM="64", VE_LAYERS="2,3", XSA_LAST_N="2"),
    # The 11-layer defaults at one GPU's share of the 786,432-token global batch on 8 GPUs.
    "full": dict(TRAIN_SEQ_LEN="2048", TRAIN_BATCH_TOKENS="98304", GRAD_ACCUM_STEPS="1"),
}


class RandomBatches:
    """Stands in for DistributedBatchLoader: uniform random token ids of the right shape. The mixer
    head's oracle lookups are not part of this benchmark (scripts/bench_ngram.py measures them)."""

    def __init__(self, vocab_size: int, seed: int):
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def step_batches(self, batch_tokens: int, accum: int, seq_len: int, device: torch.device) -> list:
        shape = (batch_tokens // (accum * seq_len), seq_len + 1)
        tokens = [torch.randint(0, self.vocab_size, shape, generator=self.generator).to(device) for _ in range(accum)]
        return [tg.Batch(t[:, :-1], t[:, 1:], None) for t in tokens]


def measure_steps(cfg: tg.Hyperparameters, rt: tg.Runtime, steps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg).to(rt.device)
    train_model = torch.compile(model, dynamic=False) if cfg.compile else model
    optimizers = tg.build_optimizers(model, cfg, rt.rank, rt.world_size)
    batches = RandomBatches(cfg.vocab_size, cfg.seed)
    accum = tg.grad_accum_steps_for(cfg, rt.world_size)
    for _ in range(warmup):
        tg.train_step(train_model, optimizers, batches, cfg, rt, accum, 1.0, cfg.muon_momentum)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    rt.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        tg.train_step(train_model, optimizers, batches, cfg, rt, accum, 1.0, cfg.muon_momentum)
    rt.synchronize()
    seconds = time.perf_counter() - start
    figures = dict(params=sum(p.numel() for p in model.parameters()), tokens_per_step=cfg.train_batch_tokens,
                   ms_per_step=1000 * seconds / steps, tokens_per_s=cfg.train_batch_tokens * steps / seconds)
    if rt.device.type == "cuda":
        figures["peak_mem_mib"] = torch.cuda.max_memory_allocated(rt.device) / 2**20
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="fill in unset settings from a preset")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    env = dict(PRESETS.get(args.preset, {}))
    env.update(os.environ)
    cuda = torch.cuda.is_available()
    rt = tg.Runtime(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    try:
        cfg = tg.Hyperparameters.from_env(env, cuda)
        tg.grad_accum_steps_for(cfg, 1)
        rt = dataclasses.replace(rt, bf16=cfg.bf16)
    except tg.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if cuda else f"cpu({torch.get_num_threads()} threads)"
    figures = measure_steps(cfg, rt, args.steps, args.warmup)
    print(f"bench_train preset:{args.preset or 'none'} device:{device.replace(' ', '_')} compile:{int(cfg.compile)} "
          f"layers:{cfg.num_layers} dim:{cfg.model_dim} seq_len:{cfg.train_seq_len} "
          + " ".join(f"{k}:{v:.1f}" if isinstance(v, float) else f"{k}:{v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
