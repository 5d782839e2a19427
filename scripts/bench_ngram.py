"""Speed and memory of the n-gram experts: oracle prefill, the score-first eval cache, and the cache's cost
next to the neural sliding-window evaluation.

    python3 scripts/bench_ngram.py                       # the demo model and the sample corpus
    python3 scripts/bench_ngram.py --tokens 2500000 --device cpu
    python3 scripts/bench_ngram.py --quick               # seconds: 200k oracle tokens, 16k val tokens
    python3 scripts/bench_ngram.py --threads 1           # a CPU shared with other work (see below)

Prints three kinds of line:
- prefill: train_gpt.build_oracle counting every order NGRAM_MIN_ORDER..NGRAM_MAX_ORDER (2..7) over the
  first --tokens training tokens (shard read included, as in the run's `ngram_oracle` line); tokens/s,
  the tables' bytes per counted token (NgramModel.nbytes), and the peak memory growth per counted token:
  the process's peak RSS (resource.getrusage ru_maxrss) on the CPU, torch.cuda.max_memory_allocated on
  CUDA. Prefill is measured first, so that the peak it raises is its own.
- cache: the score-first cache alone (every position looked up, every chunk counted after it is scored)
  over the validation stream at --chunk-tokens, for the learned mixer's orders and for Hedge's. It runs
  train_gpt.evaluate_sliding_mixed with stand-in neural scores (uniform log-probabilities, zero mixer
  logits): the cache's work does not depend on their values.
- overhead: one evaluate_sliding_mixed-style evaluation of the demo model (random init: timing only) split
  as the run splits it: train_gpt.neural_pass, then the cache (evaluate_sliding_mixed given those
  scores); cache_time / neural_time is the cost the cache adds (the goal: at most 0.20). The plain
  sliding evaluation that USE_MIXER=none runs (train_gpt.evaluate_sliding) is timed as well, for the
  same ratio against it.
Settings are the demo's (read from scripts/run_demo.sh), overridden by the environment as in train_gpt.py;
the audit (NGRAM_AUDIT_POSITIONS) is off here, as it is a check and not part of the score's cost.
On a CPU that other processes keep busy, torch's threads wait on each other: the cache's many small
sort/unique/searchsorted calls then took ~50x longer at 2 threads than at 1 on a 2-core machine (22 s
against 0.4 s), the neural pass ~2.6x (67 s against 26 s). Compare figures only within one run, at one
--threads.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

DEMO_SCRIPT = REPO / "scripts" / "run_demo.sh"


def demo_env() -> dict[str, str]:
    """The defaults scripts/run_demo.sh exports (its `NAME="${NAME:-value}"` lines), read from the script
    so that a benchmark measures the demo as it is now."""
    return dict(re.findall(r'(\w+)="\$\{\1:-([^}]*)\}"', DEMO_SCRIPT.read_text()))


def demo_config(device: torch.device) -> tg.Hyperparameters:
    """The demo's settings, with the environment's on top; paths relative to the repository root."""
    env = demo_env()
    env.update(os.environ)
    for name in ("DATA_PATH", "TOKENIZER_PATH"):
        if not Path(env[name]).is_absolute():
            env[name] = str(REPO / env[name])
    return tg.hyperparameters_from_env(env, device.type == "cuda")


def runtime_from_args(parser: argparse.ArgumentParser, args) -> tg.Runtime:
    """One process on --device, with --threads torch threads when given (shared by the benchmarks)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    return tg.Runtime(0, 1, 0, torch.device(args.device))


def peak_memory_bytes(rt: tg.Runtime) -> int:
    if rt.device.type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else 1024 * peak  # Linux reports KiB, macOS bytes


def timed(rt: tg.Runtime, fn):
    """(fn(), seconds), the device synchronized on both sides."""
    rt.synchronize()
    start = time.perf_counter()
    result = fn()
    rt.synchronize()
    return result, time.perf_counter() - start


def measure_prefill(cfg: tg.Hyperparameters, rt: tg.Runtime, tokens: int) -> dict:
    cfg = dataclasses.replace(cfg, use_mixer="learned", ngram_oracle_tokens=tokens)
    files = tg.shard_files(cfg.data_path, "train")
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    before = peak_memory_bytes(rt)
    oracle, seconds = timed(rt, lambda: tg.build_oracle(cfg, rt, files))
    growth = peak_memory_bytes(rt) - before
    counted = oracle.counted_tokens
    return dict(tokens=counted, orders=f"{min(oracle.orders)}..{max(oracle.orders)}", time_s=seconds,
                tokens_per_s=counted / seconds, table_bytes=oracle.nbytes(),
                table_bytes_per_token=oracle.nbytes() / counted, peak_growth_bytes=growth,
                peak_growth_bytes_per_token=growth / counted,
                peak_measure="cuda_max_memory_allocated" if rt.device.type == "cuda" else "ru_maxrss")


def stand_in_scores(cfg: tg.Hyperparameters, val_tokens: torch.Tensor) -> tg.NeuralScores:
    """Neural scores of the right shapes for every target 1..N-1: uniform log-probabilities and, for the
    learned mixer, zero logits (weights from the head's mask alone)."""
    n, device = val_tokens.numel() - 1, val_tokens.device
    mixer = torch.zeros(n, 1 + len(cfg.ngram_orders), device=device) if cfg.use_mixer == "learned" else None
    return tg.NeuralScores(torch.arange(1, n + 1, device=device),
                           torch.full((n,), -math.log(cfg.vocab_size), dtype=torch.float64, device=device),
                           mixer, torch.ones(n, dtype=torch.int64, device=device), {})


def time_cache(scores: tg.NeuralScores, val_tokens, tables, cfg: tg.Hyperparameters, rt: tg.Runtime):
    """((neural, mixed) results, seconds) of evaluate_sliding_mixed given finished neural scores: the time
    of the cache pass and of the small reductions around it."""
    return timed(rt, lambda: tg.evaluate_sliding_mixed(None, val_tokens, tables, cfg, rt, lambda line: None,
                                                       neural_scores=lambda audit_targets: scores))


def measure_cache(cfg: tg.Hyperparameters, rt: tg.Runtime, val_tokens, tables) -> dict:
    _, seconds = time_cache(stand_in_scores(cfg, val_tokens), val_tokens, tables, cfg, rt)
    return dict(mixer=cfg.use_mixer, orders=",".join(map(str, cfg.ngram_orders)),
                chunk_tokens=cfg.ngram_chunk_tokens, val_tokens=val_tokens.numel(), time_s=seconds,
                tokens_per_s=(val_tokens.numel() - 1) / seconds)


def eval_functions(model: tg.GPT, cfg: tg.Hyperparameters, rt: tg.Runtime, val_tokens, tables):
    """(eval_outputs, token_nll) as run() makes them; compiled ones get one untimed pass first."""
    if not cfg.compile:
        return model.eval_outputs, model.token_nll
    eval_outputs = torch.compile(model.eval_outputs, dynamic=False)
    token_nll = torch.compile(model.token_nll, dynamic=False)
    tg.neural_pass(eval_outputs, val_tokens, tables, cfg, rt, torch.zeros(0, dtype=torch.int64, device=rt.device))
    tg.evaluate_sliding(token_nll, val_tokens, tables, cfg.eval_seq_len, cfg.eval_stride, cfg.val_batch_size, rt)
    return eval_outputs, token_nll


def measure_overhead(cfg: tg.Hyperparameters, rt: tg.Runtime, val_tokens, tables) -> dict:
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg).to(rt.device).eval()
    eval_outputs, token_nll = eval_functions(model, cfg, rt, val_tokens, tables)
    no_audit = torch.zeros(0, dtype=torch.int64, device=rt.device)
    scores, neural_s = timed(rt, lambda: tg.neural_pass(eval_outputs, val_tokens, tables, cfg, rt, no_audit))
    (neural, mixed), cache_s = time_cache(scores, val_tokens, tables, cfg, rt)
    _, plain_sliding_s = timed(rt, lambda: tg.evaluate_sliding(token_nll, val_tokens, tables, cfg.eval_seq_len,
                                                               cfg.eval_stride, cfg.val_batch_size, rt))
    return dict(mixer=cfg.use_mixer, val_tokens=val_tokens.numel(), neural_pass_s=neural_s, cache_s=cache_s,
                cache_over_neural=cache_s / neural_s, sliding_none_s=plain_sliding_s,
                cache_over_sliding_none=cache_s / plain_sliding_s, neural_bpb=neural.val_bpb, mixed_bpb=mixed.val_bpb)


def figures_line(label: str, figures: dict) -> str:
    return f"bench_ngram {label} " + " ".join(
        f"{k}:{v:.4g}" if isinstance(v, float) else f"{k}:{v}" for k, v in figures.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="training tokens the oracle counts (default 2M)")
    parser.add_argument("--chunk-tokens", type=int, default=8192, help="NGRAM_CHUNK_TOKENS of the cache (default 8192)")
    parser.add_argument("--val-tokens", type=int, default=0,
                        help="use only the first N validation tokens (default all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: --tokens 200000 --val-tokens 16384")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.val_tokens = 200_000, 16_384
    if args.tokens < 2 or args.chunk_tokens < 1 or args.val_tokens < 0 or args.val_tokens == 1:
        parser.error("--tokens must be at least 2, --chunk-tokens at least 1, --val-tokens 0 (all) or at least 2")
    rt = runtime_from_args(parser, args)
    try:
        cfg = dataclasses.replace(demo_config(rt.device), ngram_chunk_tokens=args.chunk_tokens,
                                  ngram_audit_positions=0)
        cfg.validate()
    except tg.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = (torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda"
              else f"cpu({torch.get_num_threads()}_threads)")
    print(f"bench_ngram device:{device.replace(' ', '_')} compile:{int(cfg.compile)} layers:{cfg.num_layers} "
          f"dim:{cfg.model_dim} eval_seq_len:{cfg.eval_seq_len} eval_stride:{cfg.eval_stride} "
          f"val_batch_size:{cfg.val_batch_size} data:{Path(cfg.data_path).name}")
    print(figures_line("prefill", measure_prefill(cfg, rt, args.tokens)), flush=True)

    val_tokens = tg.load_validation_tokens(cfg.data_path, cfg.vocab_size)
    if args.val_tokens:
        val_tokens = val_tokens[:args.val_tokens]
    val_tokens = val_tokens.to(rt.device)
    tables = tg.token_byte_tables(tg.load_tokenizer(cfg.tokenizer_path), cfg.vocab_size).to(rt.device)
    modes = [dataclasses.replace(cfg, use_mixer=mixer) for mixer in ("learned", "hedge")]
    for mode in modes:
        print(figures_line("cache", measure_cache(mode, rt, val_tokens, tables)), flush=True)
    for mode in modes:
        print(figures_line("overhead", measure_overhead(mode, rt, val_tokens, tables)), flush=True)
    print("bench_ngram note: goal cache_over_neural <= 0.20 (the cache adding at most 20% to the neural "
          "sliding evaluation); the model is randomly initialised, so its bpb figures mean nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
