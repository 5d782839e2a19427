"""Evaluation cost per token: train_gpt.py's plain and sliding-window passes against the parameter-golf
baseline's evaluation of a model of the same shape, on the CPU.

    python3 scripts/bench_eval.py --threads 1                      # this checkout's train_gpt.py
    python3 scripts/bench_eval.py --script OLD/train_gpt.py        # another version of it, to compare
    python3 scripts/bench_eval.py --profile ours_off               # where one contender's time goes
    NUM_LAYERS=6 python3 scripts/bench_eval.py                     # another shape (same variables as the script)

The shape is the baseline's at 4 layers: width 256, 8 heads, 4 KV heads, MLP 3x, vocabulary 1024,
1,024-token windows, 64 windows per batch (environment variables override it). Contenders:
- `baseline`: written for this benchmark, not copied: a re-implementation of openai/parameter-golf's
  root train_gpt.py model forward (RMSNorm, full-head RoPE with cached tables, QK-norm and gain, GQA
  attention, relu^2 MLP, resid_mix with x0, U-Net skips, tied softcapped logits, mean cross-entropy) and
  of its eval_val loop (contiguous sequences, the loss summed in float64, bytes from its int16 tables).
  Its sliding pass is the same loop over the same windows as ours (first window scores all its targets,
  the others their last EVAL_STRIDE), scored with a mask: the baseline has no sliding evaluation.
- `ours_off`: train_gpt's GPT with the extras the baseline lacks turned off where settings allow
  (BigramHash, value embeddings, XSA, value residual, partial RoPE, mixer head); the MLP keeps its
  LeakyReLU(0.5)^2 and the blocks have no resid_mix.
- `ours_on`: the script's defaults for these extras (VE_LAYERS on the last two layers), as users run it.
  Our sliding passes are `neural_pass` (full log-probabilities, and the mixer head where there is one),
  the pass every run makes; a script from before that had a separate `evaluate_sliding` is timed with it.
Splits are synthetic tokens (the cost does not depend on token values): the plain split is whole batches
and the sliding split fills train_gpt's batches exactly, so neither pads. Each round times every
contender back to back and the ratios are taken inside a round, which keeps other load on the machine
out of them as far as possible. Weights are random (every matrix non-zero). Each pass also runs once
under torch.profiler to count its host syncs (item/float/int of a tensor, boolean indexing): on a GPU
each one stalls the queue until the work before it is done.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from bench_ngram import load_script  # noqa: E402  (scripts/ is on sys.path when a script runs)

ROOT = Path(__file__).resolve().parents[1]

SHAPE = dict(NUM_LAYERS="4", MODEL_DIM="256", NUM_HEADS="8", NUM_KV_HEADS="4", MLP_MULT="3", VOCAB_SIZE="1024",
             EVAL_SEQ_LEN="1024", TRAIN_SEQ_LEN="1024", VAL_BATCH_SIZE="65536", EVAL_STRIDE="64",
             GRAD_ACCUM_STEPS="1")  # one process: VAL_BATCH_SIZE / (1 x 1) tokens per batch
# reading a value (item, float(), int()) or a value-dependent shape (boolean indexing): each stalls a GPU's queue
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique")
EXTRAS_OFF = dict(BIGRAM_VOCAB_SIZE="0", VE_ENABLED="0", XSA_LAST_N="0", VALUE_RESIDUAL="0", ROPE_DIMS="0",
                  USE_MIXER="none")


# --- the baseline, re-implemented -------------------------------------------------------------------


class BaselineAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, rope_base: float, qk_gain: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.c_v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((heads,), qk_gain))
        self.register_buffer("inv_freq", 1.0 / rope_base ** (torch.arange(0, self.head_dim, 2) / self.head_dim),
                             persistent=False)
        self.tables = None  # (T, cos, sin), rebuilt when T changes, as the baseline's Rotary does

    def rotary(self, x: torch.Tensor) -> torch.Tensor:
        T = x.size(2)
        if self.tables is None or self.tables[0] != T:
            freqs = torch.outer(torch.arange(T, dtype=torch.float32, device=x.device), self.inv_freq)
            self.tables = (T, freqs.cos()[None, None], freqs.sin()[None, None])
        cos, sin = self.tables[1].to(x.dtype), self.tables[2].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self.c_q(x).reshape(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q = self.rotary(F.rms_norm(q, (self.head_dim,)))
        k = self.rotary(F.rms_norm(k, (self.head_dim,)))
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.proj(y.transpose(1, 2).contiguous().reshape(B, T, D))


class BaselineBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, mlp_mult: int, rope_base: float, qk_gain: float):
        super().__init__()
        self.attn = BaselineAttention(dim, heads, kv_heads, rope_base, qk_gain)
        self.fc = nn.Linear(dim, mlp_mult * dim, bias=False)
        self.mlp_proj = nn.Linear(mlp_mult * dim, dim, bias=False)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
        x = x + self.attn_scale.to(x.dtype)[None, None, :] * self.attn(F.rms_norm(x, (x.size(-1),)))
        h = torch.relu(self.fc(F.rms_norm(x, (x.size(-1),))))
        return x + self.mlp_scale.to(x.dtype)[None, None, :] * self.mlp_proj(h.square())


class BaselineGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.softcap = cfg.logit_softcap
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.encoder_layers = cfg.num_layers // 2
        self.skip_weights = nn.Parameter(torch.ones(cfg.num_layers - self.encoder_layers, cfg.model_dim))
        self.blocks = nn.ModuleList(
            BaselineBlock(cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, int(cfg.mlp_mult), cfg.rope_base,
                          cfg.qk_gain_init) for _ in range(cfg.num_layers))

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(self.tok_emb(tokens), (self.tok_emb.embedding_dim,))
        x0, skips = x, []
        for i, block in enumerate(self.blocks):
            if i >= self.encoder_layers and skips:
                x = x + self.skip_weights[i - self.encoder_layers].to(x.dtype)[None, None, :] * skips.pop()
            x = block(x, x0)
            if i < self.encoder_layers:
                skips.append(x)
        x = F.rms_norm(x, (x.size(-1),))
        return self.softcap * torch.tanh(F.linear(x, self.tok_emb.weight) / self.softcap)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(tokens).float().flatten(0, 1), targets.flatten())

    def token_nll(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nll = F.cross_entropy(self.logits(tokens).float().flatten(0, 1), targets.flatten(), reduction="none")
        return nll.view_as(targets)


@torch.inference_mode()
def baseline_plain(loss_fn, val_tokens: torch.Tensor, luts, seq_len: int, rows: int) -> tuple[float, int]:
    """The baseline's eval_val on one process: (sum of -ln q, bytes) over whole sequences."""
    base_bytes, has_space, is_boundary = luts
    loss_sum = torch.zeros((), dtype=torch.float64)
    byte_sum = torch.zeros((), dtype=torch.float64)
    total_seqs = (val_tokens.numel() - 1) // seq_len
    for first in range(0, total_seqs, rows):
        last = min(first + rows, total_seqs)
        local = val_tokens[first * seq_len:last * seq_len + 1].to(torch.int64)
        x, y = local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)
        loss_sum += loss_fn(x, y).to(torch.float64) * y.numel()
        nbytes = base_bytes[y.reshape(-1)].to(torch.int16)
        nbytes += (has_space[y.reshape(-1)] & ~is_boundary[x.reshape(-1)]).to(torch.int16)
        byte_sum += nbytes.to(torch.float64).sum()
    return float(loss_sum), int(byte_sum)


@torch.inference_mode()
def baseline_sliding(token_nll, val_tokens: torch.Tensor, luts, seq_len: int, stride: int,
                     rows: int) -> tuple[float, int]:
    """The same windows as train_gpt's sliding pass, in the baseline's style: full windows of seq_len
    starting every `stride` tokens, the first scoring all its targets and the others their last `stride`."""
    base_bytes, has_space, is_boundary = luts
    loss_sum = torch.zeros((), dtype=torch.float64)
    byte_sum = torch.zeros((), dtype=torch.float64)
    starts = torch.arange(0, val_tokens.numel() - seq_len, stride)
    offsets = torch.arange(seq_len + 1)
    for first in range(0, starts.numel(), rows):
        ws = starts[first:first + rows]
        window = val_tokens[ws[:, None] + offsets[None, :]]
        x, y = window[:, :-1], window[:, 1:]
        scored = (offsets[None, :-1] >= seq_len - stride) | (ws[:, None] == 0)
        loss_sum += token_nll(x, y)[scored].to(torch.float64).sum()
        nbytes = base_bytes[y[scored]].to(torch.int16) + (has_space[y[scored]] & ~is_boundary[x[scored]]).to(torch.int16)
        byte_sum += nbytes.to(torch.float64).sum()
    return float(loss_sum), int(byte_sum)


# --- the contenders ---------------------------------------------------------------------------------


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """model in eval mode with 0.02 x N(0, 1) added to every weight: no zero-initialised matrix left."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return model.eval()


def synthetic_tables(tg, vocab_size: int):
    """Byte tables of a made-up tokenizer: 1-5 bytes, every other piece with a leading space, 3 boundaries."""
    ids = torch.arange(vocab_size)
    return tg.TokenByteTables(ids % 5 + 1, ids % 2 == 0, ids < 3)


def contender_configs(tg, env: dict[str, str]) -> dict:
    """The train_gpt configurations: extras off, and the defaults with VE on the last two layers."""
    base = {**SHAPE, **env}
    layers = int(base["NUM_LAYERS"])
    ve_layers = ",".join(str(i) for i in range(max(0, layers - 2), layers))
    off = tg.Hyperparameters.from_env({**base, "VE_LAYERS": ve_layers, **EXTRAS_OFF}, False)
    on = tg.Hyperparameters.from_env({"VE_LAYERS": ve_layers, **base}, False)
    return {"ours_off": off, "ours_on": on}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def model_functions(models: dict, compile_them: bool) -> dict:
    """The functions each pass calls, compiled (one shape each, as train_gpt compiles them) or not."""
    functions = {"baseline": models["baseline"], "baseline token_nll": models["baseline"].token_nll}
    for name in ("ours_off", "ours_on"):
        functions[f"{name} token_nll"] = models[name].token_nll
        functions[f"{name} eval_outputs"] = models[name].eval_outputs
    if compile_them:
        functions = {name: torch.compile(fn, dynamic=False) for name, fn in functions.items()}
    return functions


def passes(tg, functions: dict, cfg, on_cfg, rt, tokens: dict, tables, luts) -> dict:
    """name -> (callable running one pass, tokens it scores)."""
    rows, seq_len, stride = cfg.val_batch_size // cfg.eval_seq_len, cfg.eval_seq_len, cfg.eval_stride
    plain, sliding = tokens["plain"], tokens["sliding"]
    out = {"baseline plain": (lambda: baseline_plain(functions["baseline"], plain, luts, seq_len, rows),
                              plain.numel() - 1),
           "baseline sliding": (lambda: baseline_sliding(functions["baseline token_nll"], sliding, luts, seq_len,
                                                         stride, rows), sliding.numel() - 1)}
    no_audit = torch.zeros(0, dtype=torch.int64)
    for name, c in (("ours_off", cfg), ("ours_on", on_cfg)):
        token_nll, eval_outputs = functions[f"{name} token_nll"], functions[f"{name} eval_outputs"]
        out[f"{name} plain"] = (lambda f=token_nll: tg.evaluate_plain(f, plain, tables, seq_len, cfg.val_batch_size,
                                                                      rt), plain.numel() - 1)
        if hasattr(tg, "evaluate_sliding"):  # a script from before the sliding pass was neural_pass alone
            out[f"{name} sliding"] = (lambda f=token_nll: tg.evaluate_sliding(f, sliding, tables, seq_len, stride,
                                                                              cfg.val_batch_size, rt), sliding.numel() - 1)
        else:
            out[f"{name} sliding"] = (lambda f=eval_outputs, c=c: tg.neural_pass(f, sliding, tables, c, rt, no_audit),
                                      sliding.numel() - 1)
    out["ours_on neural_pass"] = (lambda: tg.neural_pass(functions["ours_on eval_outputs"], sliding, tables, on_cfg,
                                                         rt, no_audit), sliding.numel() - 1)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", type=Path, default=ROOT / "train_gpt.py", help="the train_gpt.py to measure")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of every pass (default 3)")
    parser.add_argument("--plain-batches", type=int, default=1, help="batches in the plain split (default 1)")
    parser.add_argument("--sliding-batches", type=int, default=4, help="batches of windows in the sliding split "
                        "(default 4: the first window's extra rows, EVAL_SEQ_LEN / EVAL_STRIDE - 1, weigh little)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model function first "
                        "(untimed), as COMPILE=1 does")
    parser.add_argument("--only", default="", help="comma-separated pass names to time (default: all)")
    parser.add_argument("--profile", default="", help="profile one plain and one sliding pass of this contender "
                        "(baseline, ours_off or ours_on) with torch.profiler and print the top ops")
    args = parser.parse_args(argv)
    if not args.script.is_file() or args.rounds < 1 or args.plain_batches < 1 or args.sliding_batches < 1:
        parser.error("--script must be a file; --rounds, --plain-batches and --sliding-batches at least 1")
    if args.profile not in ("", "baseline", "ours_off", "ours_on"):
        parser.error(f"--profile={args.profile!r}: use baseline, ours_off or ours_on")
    if args.threads:
        torch.set_num_threads(args.threads)
    tg = load_script(args.script)
    try:
        configs = contender_configs(tg, dict(os.environ))
    except tg.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = configs["ours_off"]
    if cfg.val_batch_size % cfg.eval_seq_len:
        print(f"error: VAL_BATCH_SIZE={cfg.val_batch_size} is not allowed here: a multiple of EVAL_SEQ_LEN "
              f"({cfg.eval_seq_len}), so that no contender pads", file=sys.stderr)
        return 2
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"))
    rows, seq_len = cfg.val_batch_size // cfg.eval_seq_len, cfg.eval_seq_len
    generator = torch.Generator().manual_seed(0)
    # train_gpt's sliding pass gives the stream's first window, which scores all its targets, one row per
    # EVAL_STRIDE of them: with this many windows its rows fill the batches exactly (a script from before
    # that pads its last batch instead, to the same number of rows)
    windows = max(1, args.sliding_batches * rows - (-(-seq_len // cfg.eval_stride) - 1))
    tokens = {"plain": torch.randint(0, cfg.vocab_size, (args.plain_batches * rows * seq_len + 1,), generator=generator),
              "sliding": torch.randint(0, cfg.vocab_size, (seq_len + 1 + (windows - 1) * cfg.eval_stride,),
                                       generator=generator)}
    tables = synthetic_tables(tg, cfg.vocab_size)
    luts = (tables.base_bytes.to(torch.int16), tables.has_leading_space, tables.is_boundary)
    torch.manual_seed(0)
    models = {"baseline": perturbed(BaselineGPT(cfg), 1)}
    models.update({name: perturbed(tg.GPT(c), 1) for name, c in configs.items()})
    runs = passes(tg, model_functions(models, args.compile), cfg, configs["ours_on"], rt, tokens, tables, luts)
    print(f"bench_eval script:{args.script} threads:{torch.get_num_threads()} layers:{cfg.num_layers} "
          f"dim:{cfg.model_dim} seq_len:{seq_len} rows:{rows} stride:{cfg.eval_stride} "
          f"compile:{int(args.compile)} plain_tokens:{tokens['plain'].numel() - 1} sliding_tokens:{tokens['sliding'].numel() - 1}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for kind in ("plain", "sliding"):
            fn = runs[f"{args.profile} {kind}"][0]
            fn()  # allocator warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"profile {args.profile} {kind}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return 0
    names = [n for n in runs if not args.only or n in args.only.split(",")]
    scored_bytes, syncs = {}, {}
    for name in names:  # one untimed pass each (allocator warm-up, compiling), profiled for its host syncs,
        if args.compile:  # which also checks that all score the same bytes
            runs[name][0]()  # compiling under the profiler would count the compiler's own syncs
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = runs[name][0]()
        syncs[name] = sum(event.name in SYNC_OPS for event in prof.events())
        scored_bytes[name] = (out[1] if isinstance(out, tuple) else out.scored_bytes if hasattr(out, "scored_bytes")
                              else int(out.nbytes.sum()))
    for name in names:
        kind = "plain" if name.endswith("plain") else "sliding"
        if scored_bytes[name] != scored_bytes.get(f"baseline {kind}", scored_bytes[name]):
            print(f"error: {name} scored {scored_bytes[name]} bytes, the baseline {scored_bytes[f'baseline {kind}']}",
                  file=sys.stderr)
            return 1
    seconds = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            seconds[name].append(timed(runs[name][0])[0])
    for name in names:
        us = [1e6 * s / runs[name][1] for s in seconds[name]]
        kind = name.split()[-1]
        reference = f"baseline {'sliding' if kind == 'neural_pass' else kind}"
        ratio = ""
        if reference in seconds and name != reference:
            # the median of the rounds' ratios, and the ratio of the fastest passes (other load only adds time)
            ratio = (f" ratio_to_baseline:{statistics.median(a / b for a, b in zip(seconds[name], seconds[reference])):.3f}"
                     f" ratio_of_mins:{min(seconds[name]) / min(seconds[reference]):.3f}")
        batches = args.plain_batches if kind == "plain" else args.sliding_batches
        print(f"bench_eval pass:{name.replace(' ', '_')} us_per_token:{statistics.median(us):.2f} "
              f"min:{min(us):.2f} max:{max(us):.2f}{ratio} batches:{batches} host_syncs:{syncs[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
