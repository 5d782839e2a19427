"""Speed and memory of the n-gram experts: oracle prefill, the score-first eval cache per rank, and the cache's
cost next to the neural sliding-window evaluation.

    python3 scripts/bench_ngram.py --threads 1 --clock cpu             # the figures below (~15 min on a CPU)
    python3 scripts/bench_ngram.py --threads 1 --script OLD/train_gpt.py   # the same for another version
    python3 scripts/bench_ngram.py --quick                              # seconds: small sizes, a smoke test
    python3 scripts/bench_ngram.py --prefill-tokens 2000000 --cache-tokens 0   # one prefill, no cache scaling

Prints four kinds of line:
- prefill: --script's build_oracle counting every order NGRAM_MIN_ORDER..NGRAM_MAX_ORDER (2..7) over the
  first N training tokens, for each N of --prefill-tokens (shard read included, as in the run's
  `ngram_oracle` line), each in a fresh process so that its peak is its own: seconds, tokens/s, the tables'
  bytes per counted token (NgramModel.nbytes), per order the distinct contexts / distinct (context, token)
  pairs per counted token (each costs 12 B: an int64 key and an int32 count), the orders whose contexts are
  exact keys (the others hashed), and the peak memory growth per counted token (on the CPU the
  peak RSS, VmHWM, reset to the RSS just before; on CUDA torch.cuda.max_memory_allocated over the memory
  allocated before). The data is
  the sample corpus when it has N training tokens (data:sample), else synthetic text-like tokens
  (data:zipf_phrases, see text_like_tokens) in 4M-token shards.
- cache_rank: the score-first cache's counting for one rank of --ranks, over the first N validation tokens
  for each N of --cache-tokens (the sample's validation split when it has N tokens, data:sample; else
  synthetic text-like tokens, data:zipf_phrases), for rank 0 and the last rank, learned mixer (orders 2-7)
  and Hedge (1-3), at --chunk-tokens. Each rank scores one contiguous block of ~N/ranks targets (as the plain
  sliding pass splits them, up to its batch granularity). A version whose score_first_counts counts the
  split up to the rank's last target (no cache_items: main before the owner design) is timed doing exactly
  that; the owner design is simulated in one process: the rank's own side (cache_items, owners, the sort by
  owner) on its targets plus earlier_chunk_counts on the rows every rank would send it. Communication is
  not timed. counted: rows a rank sorts per order (before: every position up to its last target; after:
  the rows it owns). owner_load: per order, the most rows one rank owns over an even share (1/ranks) of
  that order's targets: how far frequent contexts unbalance the owners (1.00 = even).
- cache: --script's whole evaluate_sliding_mixed in one process over the sample validation split, with
  stand-in neural scores (uniform log-probabilities, zero mixer logits: the cache's work does not depend on
  their values).
- overhead: one evaluation of the demo model (random init: timing only) as the run splits it: neural_pass,
  then the cache (evaluate_sliding_mixed given those scores), and the plain sliding evaluation that
  USE_MIXER=none runs; cache_over_neural is the cost the cache adds (goal: at most 0.20). cache_rank lines
  compare the rank's counting time with the neural pass over the rank's targets at this line's per-token
  neural cost (neural cost per token does not depend on the split's size; the demo model on a CPU).
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
import importlib.util
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402  (main() swaps in --script's version)
from make_sample_data import write_shard  # noqa: E402

DEMO_SCRIPT = REPO / "scripts" / "run_demo.sh"
SHARD_TOKENS = 4_000_000  # synthetic shards this long: a prefix read over-reads at most one shard


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location("train_gpt_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


def proc_status_bytes(field: str) -> int | None:
    """A memory figure of this process from Linux's /proc/self/status (VmRSS: now, VmHWM: peak), else None."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((1024 * int(line.split()[1]) for line in lines if line.startswith(field + ":")), None)


def peak_memory_bytes(rt: tg.Runtime) -> int:
    if rt.device.type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device)
    peak = proc_status_bytes("VmHWM")  # not ru_maxrss: Linux carries that over fork and exec from the parent
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else 1024 * peak  # Linux reports KiB, macOS bytes


def memory_with_peak_reset(rt: tg.Runtime) -> int:
    """The memory in use now, with the peak set back to it where the platform allows (else the peak so far,
    so that a growth over it is a lower bound)."""
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
        return torch.cuda.memory_allocated(rt.device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM back to VmRSS
        return proc_status_bytes("VmRSS")
    except OSError:
        return peak_memory_bytes(rt)


CLOCK = time.perf_counter  # main() sets time.process_time for --clock cpu


def timed(rt: tg.Runtime, fn):
    """(fn(), seconds), the device synchronized on both sides."""
    rt.synchronize()
    start = CLOCK()
    result = fn()
    rt.synchronize()
    return result, CLOCK() - start


# --- synthetic text -----------------------------------------------------------------------------------------

def zipf_ids(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """`size` ids in 0..count-1, id i drawn with probability proportional to 1 / (i + 1)."""
    cdf = np.cumsum(1.0 / np.arange(1, count + 1))
    return np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1]), count - 1)


def text_like_tokens(n: int, vocab: int, seed: int) -> np.ndarray:
    """n uint16 tokens with text's repetition: phrases (1-12 tokens, 4 on average, each token Zipf over the
    vocabulary) drawn Zipf from a dictionary of 2^20. At 8M tokens the distinct n-grams of orders 2..7 are
    4%/21%/40%/53%/64%/69% of the positions and the commonest token is 12% (the sample corpus at 2.5M:
    3%/15%/30%/41%/49%/54%, 3.4%): a harder case than that text for memory and for balancing owners."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.geometric(0.25, size=1 << 20), 12)
    starts = np.concatenate(([0], np.cumsum(lengths)))
    body = zipf_ids(rng, vocab, int(starts[-1]))
    phrases = zipf_ids(rng, lengths.size, int(n / lengths.mean() * 1.2) + 16)
    phrases = phrases[:np.searchsorted(np.cumsum(lengths[phrases]), n) + 1]
    out_start = np.concatenate(([0], np.cumsum(lengths[phrases])[:-1]))
    index = np.repeat(starts[phrases] - out_start, lengths[phrases]) + np.arange(int(lengths[phrases].sum()))
    return body[index[:n]].astype(np.uint16)


def write_synthetic_shards(folder: Path, n: int, vocab: int, seed: int) -> None:
    tokens = text_like_tokens(n, vocab, seed)
    for i in range(0, n, SHARD_TOKENS):
        write_shard(folder / f"fineweb_train_{i // SHARD_TOKENS:06d}.bin", tokens[i:i + SHARD_TOKENS])


# --- prefill ------------------------------------------------------------------------------------------------

def measure_prefill(cfg: tg.Hyperparameters, rt: tg.Runtime, tokens: int) -> dict:
    cfg = dataclasses.replace(cfg, use_mixer="learned", ngram_oracle_tokens=tokens)
    files = tg.shard_files(cfg.data_path, "train")
    before = memory_with_peak_reset(rt)
    oracle, seconds = timed(rt, lambda: tg.build_oracle(cfg, rt, files))
    growth = peak_memory_bytes(rt) - before
    counted = oracle.counted_tokens
    return dict(tokens=counted, orders=f"{min(oracle.orders)}..{max(oracle.orders)}", time_s=seconds,
                tokens_per_s=counted / seconds, table_bytes=oracle.nbytes(),
                table_bytes_per_token=oracle.nbytes() / counted, peak_growth_bytes=growth,
                peak_growth_bytes_per_token=growth / counted,
                peak_measure="cuda_max_memory_allocated" if rt.device.type == "cuda" else "VmHWM_over_VmRSS",
                vocab=cfg.vocab_size, exact_orders=",".join(str(t.order) for t in oracle.tables if exact_keys(t)),
                per_order=",".join(f"{t.order}:{t.ctx_keys.numel() / counted:.3f}/{t.pair_keys.numel() / counted:.3f}"
                                   for t in oracle.tables))


def exact_keys(table) -> bool:
    """Whether the table's contexts are exact keys (else hashed), by context_keys_from's rule."""
    return (table.order - 1) * max(1, (table.vocab_size - 1).bit_length()) <= 62


def prefill_in_child(args, tokens: int, data_path: Path) -> dict:
    """measure_prefill in a fresh process, so that what an earlier size left allocated or cached is not there."""
    command = [sys.executable, __file__, "--prefill-child", str(tokens), "--data", str(data_path),
               "--script", str(args.script), "--device", args.device, "--threads", str(args.threads),
               "--clock", args.clock]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"prefill of {tokens} tokens failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the cache, one rank of many ----------------------------------------------------------------------------

def rank_blocks(num_tokens: int, ranks: int) -> list[torch.Tensor]:
    """Each rank's targets: contiguous blocks of 1..num_tokens-1 in rank order."""
    return list(torch.arange(1, num_tokens).tensor_split(ranks))


def rank_cache_old(cfg: tg.Hyperparameters, val_tokens: torch.Tensor, blocks, rank: int) -> dict:
    """A version where each rank counts the split from position 1 to its last target, alone."""
    _, seconds = timed(tg.Runtime(0, 1, 0, val_tokens.device), lambda: tg.score_first_counts(
        val_tokens, cfg.ngram_orders, cfg.vocab_size, cfg.ngram_chunk_tokens, blocks[rank], []))
    return dict(time_s=seconds, counted=int(blocks[rank][-1]))


def owner_design_ranks(cfg: tg.Hyperparameters, val_tokens: torch.Tensor, blocks, ranks_timed) -> tuple[dict, list]:
    """{rank: figures} of the owner design's counting for ranks_timed, simulated in one process, and each
    order's owner load: the most rows one rank owns over an even share of the order's targets."""
    V, C, R = cfg.vocab_size, cfg.ngram_chunk_tokens, len(blocks)
    seconds, counted, loads = dict.fromkeys(ranks_timed, 0.0), dict.fromkeys(ranks_timed, 0), []
    for order in cfg.ngram_orders:
        sent = []
        for r, targets in enumerate(blocks):
            start = CLOCK()
            items, where = tg.cache_items(val_tokens, targets[targets >= order - 1], order, V, C)
            dest = tg.context_owners(items[:, 0], R)
            by_dest = torch.sort(dest, stable=True).indices
            items[by_dest]  # the gather owners_counts sends
            if r in seconds:
                seconds[r] += CLOCK() - start
            sent.append((items, dest))
        owned_rows = [sum(int((dest == r).sum()) for _, dest in sent) for r in range(R)]
        order_targets = sum(int(items[:, 3].sum()) for items, _ in sent)
        loads.append(max(owned_rows) / max(1.0, order_targets / R))
        for r in ranks_timed:
            owned = torch.cat([items[dest == r] for items, dest in sent])
            _, s = timed(tg.Runtime(0, 1, 0, val_tokens.device), lambda: tg.earlier_chunk_counts(owned, V))
            seconds[r] += s
            counted[r] += owned.size(0)
    K = len(cfg.ngram_orders)
    return {r: dict(time_s=seconds[r], counted=round(counted[r] / K)) for r in ranks_timed}, loads


def measure_rank_cache(cfg: tg.Hyperparameters, val_tokens: torch.Tensor, ranks: int,
                       neural_s_per_token: float) -> list[dict]:
    blocks = rank_blocks(val_tokens.numel(), ranks)
    timed_ranks = sorted({0, ranks - 1})
    if hasattr(tg, "cache_items"):
        figures, loads = owner_design_ranks(cfg, val_tokens, blocks, timed_ranks)
        load_text = ",".join(f"{n}:{x:.2f}" for n, x in zip(cfg.ngram_orders, loads))
    else:
        figures, load_text = {r: rank_cache_old(cfg, val_tokens, blocks, r) for r in timed_ranks}, "n/a"
    lines = []
    for r in timed_ranks:
        scored = blocks[r].numel()
        lines.append(dict(mixer=cfg.use_mixer, val_tokens=val_tokens.numel(), ranks=ranks, rank=r, scored=scored,
                          counted_per_order=figures[r]["counted"], time_s=figures[r]["time_s"],
                          us_per_scored_token=1e6 * figures[r]["time_s"] / scored,
                          cache_over_neural=figures[r]["time_s"] / (neural_s_per_token * scored),
                          owner_load=load_text))
    return lines


# --- the cache and the neural pass, one process -------------------------------------------------------------

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


def eval_outputs_as_run(model: tg.GPT, cfg: tg.Hyperparameters, rt: tg.Runtime, val_tokens, tables):
    """eval_outputs as run() makes it; a compiled one gets one untimed pass first."""
    if not cfg.compile:
        return model.eval_outputs
    eval_outputs = torch.compile(model.eval_outputs, dynamic=False)
    tg.neural_pass(eval_outputs, val_tokens, tables, cfg, rt, torch.zeros(0, dtype=torch.int64, device=rt.device))
    return eval_outputs


def measure_overhead(cfg: tg.Hyperparameters, rt: tg.Runtime, val_tokens, tables) -> dict:
    """The neural sliding pass (what USE_MIXER=none scores too) and the cache pass after it."""
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg).to(rt.device).eval()
    eval_outputs = eval_outputs_as_run(model, cfg, rt, val_tokens, tables)
    no_audit = torch.zeros(0, dtype=torch.int64, device=rt.device)
    scores, neural_s = timed(rt, lambda: tg.neural_pass(eval_outputs, val_tokens, tables, cfg, rt, no_audit))
    (neural, mixed), cache_s = time_cache(scores, val_tokens, tables, cfg, rt)
    return dict(mixer=cfg.use_mixer, val_tokens=val_tokens.numel(), neural_pass_s=neural_s,
                neural_us_per_token=1e6 * neural_s / (val_tokens.numel() - 1), cache_s=cache_s,
                cache_over_neural=cache_s / neural_s, neural_bpb=neural.val_bpb, mixed_bpb=mixed.val_bpb)


def figures_line(label: str, figures: dict) -> str:
    return f"bench_ngram {label} " + " ".join(
        f"{k}:{v:.4g}" if isinstance(v, float) else f"{k}:{v}" for k, v in figures.items())


def sizes(parser: argparse.ArgumentParser, name: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = [-1]
    if any(v < 2 for v in values) and values != [0]:
        parser.error(f"{name} {text!r}: comma-separated token counts, each at least 2 (or 0: none)")
    return [v for v in values if v]


def main(argv=None) -> int:
    global tg, CLOCK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--script", type=Path, default=REPO / "train_gpt.py", help="the train_gpt.py to measure")
    parser.add_argument("--prefill-tokens", default="8000000,16000000,50000000",
                        help="oracle sizes to count, comma-separated (default 8M,16M,50M)")
    parser.add_argument("--cache-tokens", default="1000000,4000000,16000000",
                        help="synthetic validation sizes for the per-rank cache figures (default 1M,4M,16M; 0: none)")
    parser.add_argument("--ranks", type=int, default=8, help="ranks the split is shared by (default 8)")
    parser.add_argument("--chunk-tokens", type=int, default=131072,
                        help="NGRAM_CHUNK_TOKENS of the cache (default 131072, the run's)")
    parser.add_argument("--val-tokens", type=int, default=0,
                        help="use only the first N sample validation tokens for cache/overhead (default all)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: --prefill-tokens 200000 --cache-tokens 65536 --val-tokens 16384")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed seconds; cpu: this process's CPU seconds (with --threads 1 on a CPU "
                             "that other work shares, what the work itself took)")
    parser.add_argument("--prefill-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.prefill_tokens, args.cache_tokens, args.val_tokens = "200000", "65536", 16_384
    prefill_sizes = sizes(parser, "--prefill-tokens", args.prefill_tokens)
    cache_sizes = sizes(parser, "--cache-tokens", args.cache_tokens)
    if args.ranks < 1 or args.chunk_tokens < 1 or args.val_tokens < 0 or args.val_tokens == 1:
        parser.error("--ranks and --chunk-tokens must be at least 1, --val-tokens 0 (all) or at least 2")
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu measures the host's work: use --clock wall with --device cuda")
    if not args.script.is_file():
        parser.error(f"--script {args.script}: no such file")
    tg = load_script(args.script.resolve())
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    rt = runtime_from_args(parser, args)
    try:
        cfg = dataclasses.replace(demo_config(rt.device), ngram_chunk_tokens=args.chunk_tokens,
                                  ngram_audit_positions=0)
        cfg.validate()
    except tg.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.prefill_child:
        figures = measure_prefill(dataclasses.replace(cfg, data_path=str(args.data)), rt, args.prefill_child)
        print(json.dumps(figures))
        return 0
    device = (torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda"
              else f"cpu({torch.get_num_threads()}_threads)")
    print(f"bench_ngram script:{args.script} device:{device.replace(' ', '_')} clock:{args.clock} compile:{int(cfg.compile)} "
          f"layers:{cfg.num_layers} dim:{cfg.model_dim} eval_seq_len:{cfg.eval_seq_len} "
          f"eval_stride:{cfg.eval_stride} val_batch_size:{cfg.val_batch_size} chunk_tokens:{cfg.ngram_chunk_tokens}")
    sample_train = sum(tg.shard_token_count(f) for f in tg.shard_files(cfg.data_path, "train"))
    with tempfile.TemporaryDirectory() as folder:
        if max(prefill_sizes, default=0) > sample_train:
            write_synthetic_shards(Path(folder), max(prefill_sizes), cfg.vocab_size, seed=1)
        for n in prefill_sizes:
            data = ("sample", cfg.data_path) if n <= sample_train else ("zipf_phrases", folder)
            print(figures_line("prefill", dict(data=data[0], **prefill_in_child(args, n, Path(data[1])))), flush=True)

    val_tokens = tg.load_validation_tokens(cfg.data_path, cfg.vocab_size)
    split_tokens = val_tokens  # cache_rank reads the whole split when it is long enough
    if args.val_tokens:
        val_tokens = val_tokens[:args.val_tokens]
    val_tokens = val_tokens.to(rt.device)
    tables = tg.token_byte_tables(tg.load_tokenizer(cfg.tokenizer_path), cfg.vocab_size).to(rt.device)
    modes = [dataclasses.replace(cfg, use_mixer=mixer) for mixer in ("learned", "hedge")]
    for mode in modes:
        print(figures_line("cache", measure_cache(mode, rt, val_tokens, tables)), flush=True)
    neural_s_per_token = {}
    for mode in modes:
        figures = measure_overhead(mode, rt, val_tokens, tables)
        neural_s_per_token[mode.use_mixer] = figures["neural_us_per_token"] / 1e6
        print(figures_line("overhead", figures), flush=True)
    if cache_sizes:
        synthetic_val = (torch.from_numpy(text_like_tokens(max(cache_sizes), cfg.vocab_size, seed=2).astype(np.int64))
                         if max(cache_sizes) > split_tokens.numel() else None)
        for n in cache_sizes:
            data = ("sample", split_tokens) if n <= split_tokens.numel() else ("zipf_phrases", synthetic_val)
            for mode in modes:
                for figures in measure_rank_cache(mode, data[1][:n].to(rt.device), args.ranks,
                                                  neural_s_per_token[mode.use_mixer]):
                    print(figures_line("cache_rank", dict(data=data[0], **figures)), flush=True)
    print("bench_ngram note: goal cache_over_neural <= 0.20 (the cache adding at most 20% to the neural "
          "sliding evaluation); the model is randomly initialised, so its bpb figures mean nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
