"""Quantization side by side on the demo model: round-to-nearest, GPTQ, and GPTQ on a CROWN-Q-trained model;
and (--full) the time the default 11-layer model's artifact takes to build, stage by stage.

    python3 scripts/bench_quant.py                  # 120 training steps per run: a few minutes on a CPU
    python3 scripts/bench_quant.py --steps 200      # the demo's length
    python3 scripts/bench_quant.py --threads 1      # a CPU shared with other work: see scripts/bench_ngram.py
    python3 scripts/bench_quant.py --quick          # seconds: 10 steps, 4 calibration sequences, 16k val tokens
    python3 scripts/bench_quant.py --full --threads 1 [--project] [--before OLD_TRAIN_GPT.py]

Two models are trained with train_gpt.train on the sample corpus, the same seed, data and schedule:
one with CROWN_Q_LAMBDA=0 (quantized by round-to-nearest, GPTQ=0, and by GPTQ) and one with
CROWN_Q_LAMBDA=0.01 (quantized by GPTQ): CROWN-Q acts in training, adding its penalty during the
warm-down, so it needs its own run. Each model is quantized as save_artifact does on the first
size-fitting try (the demo's artifact fits at once): self-generated calibration (GPTQ_CALIB=selfgen,
the demo's GPTQ_CALIB_SEQS x GPTQ_CALIB_SEQ_LEN), Hessians, quantize_state, prune_smallest at
PRUNE_FRACTION, pack_artifact at zstd 22; then unpacked, dequantized into a copy of the model and
scored with evaluate_plain on the sample val split.
The quantization penalty is that val_bpb minus the same model's before quantization. A line also says
how far CROWN-Q moved the integer-stored matrices from the CROWN_Q_LAMBDA=0 run's (relative L2, max |dw|).

Settings are the demo's (read from scripts/run_demo.sh, overridden by the environment), with USE_MIXER=none
(no oracle: quicker, and the mixer head is not what is measured), COMPILE=0, QUANT_MIN_NUMEL=4096 (the demo's
matrices are all below the default threshold) and no wall-clock cap (both runs take the same schedule
whatever else the machine is doing).

--full builds the artifact of GPT(Hyperparameters()) (the 11-layer default, 33.3M parameters) as
save_artifact does: self-generated calibration (GPTQ_CALIB_SEQS x GPTQ_CALIB_SEQ_LEN, 64 x 512 unless
--calib-seqs/--calib-seq-len say otherwise), then fit_artifact (Hessians, GPTQ, size fitting at
TARGET_BYTES with the script's own code bytes, zstd at ZSTD_LEVEL), printing the run's own log lines
with the seconds since the start. The weights are random, shaped like trained ones (no training
happens): every matrix is Student-t (--tail-df degrees of freedom; 0: Gaussian) scaled to std
1/sqrt(fan_in), times a log-normal factor per row (sigma 0.3); embedding tables std 0.05; gains and
scales 1 + N(0, 0.1^2). zstd uses --threads threads too (train_gpt uses every CPU it may).
--before PATH does the same with another train_gpt.py (e.g. `git show 81cc7ab:train_gpt.py`, the
format-1 script): its calibration, which reran the prefix for every token, is timed at
--before-calib SEQSxLEN and extrapolated to the full size by the number of positions it runs
(seqs x L(L-1)/2), and its size fitting is stopped after --before-tries tries (each one is printed).
--project adds what one GPU rank would spend on the first schedule entry: calibration, Hessians and GPTQ
from the aten ops they dispatch (counted here) at assumed microseconds per op and their FLOPs at an
assumed fp32 rate (see US_PER_KERNEL_OP), plus the CPU side measured here on one thread (pruning, fast
packing, zstd at ZSTD_LEVEL spread over NODE_THREADS_PER_RANK threads, but never shorter than its
largest frame). A projection from stated assumptions, not a GPU measurement.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench_ngram import demo_config, runtime_from_args, timed  # scripts/ is on sys.path when this script runs
import train_gpt as tg  # noqa: E402  (bench_ngram put the repository root on sys.path)

CROWN_Q_LAMBDA = 0.01
PUBLISHED_ANCHOR = ("published figure, not ours: an 11-layer stack lost 0.004 bpb to int6 GPTQ "
                    "(val_bpb 1.1340 before, 1.1381 after, artifact 15.98 MB)")


def trained_model(cfg: tg.Hyperparameters, rt: tg.Runtime) -> tuple[tg.GPT, tg.TrainResult]:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = tg.GPT(cfg).to(rt.device)
    result = tg.train(model, model, cfg, rt, lambda line: print(f"  {line}", flush=True))
    return model.eval(), result


def plain_bpb(model: tg.GPT, cfg: tg.Hyperparameters, rt: tg.Runtime, val_tokens, tables) -> float:
    return tg.evaluate_plain(model.token_nll, val_tokens, tables, cfg.eval_seq_len, cfg.val_batch_size, rt).val_bpb


def quantize_and_score(model: tg.GPT, cfg: tg.Hyperparameters, rt: tg.Runtime, val_tokens, tables) -> dict:
    """The artifact of `model` at `cfg`'s settings (GPTQ or not), its size, and the val_bpb of its weights."""
    calib_s = hessians_s = 0.0
    hessians = {}
    if cfg.gptq:
        def calibrate():
            with rt.autocast():
                return tg.selfgen_calibration_tokens(model, cfg.gptq_calib_seqs, cfg.gptq_calib_seq_len, cfg.seed)
        calib, calib_s = timed(rt, calibrate)
        hessians, hessians_s = timed(rt, lambda: tg.collect_hessians(model, calib))
    quantized, quantize_s = timed(rt, lambda: tg.quantize_state(model, cfg, hessians))
    blob = tg.pack_artifact(tg.prune_smallest(quantized, cfg.prune_fraction), *tg.final_codec(cfg))
    restored = tg.dequantize_into(copy.deepcopy(model), tg.unpack_artifact(blob))
    params = sum(p.numel() for p in model.parameters())
    return dict(params=params, artifact_bytes=len(blob), bytes_per_param=len(blob) / params,
                int_matrices=sum(1 for q in quantized.values() if q.bits), gptq_matrices=len(hessians),
                post_bpb=plain_bpb(restored, cfg, rt, val_tokens, tables), calib_s=calib_s,
                hessians_s=hessians_s, quantize_s=quantize_s, gptq_s=hessians_s + quantize_s if cfg.gptq else 0.0)


def weight_change(base: tg.GPT, other: tg.GPT) -> str:
    """How far `other`'s integer-stored matrices are from `base`'s: what CROWN-Q changed."""
    diff = norm = max_abs = 0.0
    for (name, a), b in zip(base.state_dict().items(), other.state_dict().values()):
        if tg.tensor_class(name, a, base.cfg.quant_min_numel) != "raw":
            diff += float((a.float() - b.float()).square().sum())
            norm += float(a.float().square().sum())
            max_abs = max(max_abs, float((a.float() - b.float()).abs().max()))
    return f"relative_l2:{(diff / norm) ** 0.5:.3e} max_abs:{max_abs:.3e}"


def print_table(rows: list[dict]) -> None:
    columns = [("method", "{}"), ("crown_q_lambda", "{:g}"), ("artifact_bytes", "{}"), ("bytes_per_param", "{:.4f}"),
               ("pre_bpb", "{:.4f}"), ("post_bpb", "{:.4f}"), ("penalty_bpb", "{:+.4f}"), ("calib_s", "{:.1f}"),
               ("hessians_s", "{:.1f}"), ("quantize_s", "{:.1f}"), ("gptq_s", "{:.1f}")]
    cells = [[name] + [fmt.format(row[name]) for row in rows] for name, fmt in columns]
    widths = [max(len(c) for c in column) for column in cells]
    for r in range(len(rows) + 1):
        print("  ".join(column[r].rjust(w) for column, w in zip(cells, widths)))


def trained_like_gpt(cfg: tg.Hyperparameters, tail_df: float, seed: int = 0) -> tg.GPT:
    """GPT(cfg) with random weights shaped like trained ones (see the module docstring)."""
    torch.manual_seed(seed)
    model = tg.GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and name in tg.EMBED_TENSOR_NAMES:
                p.copy_(0.05 * torch.randn_like(p))
            elif p.ndim == 2:
                if tail_df:
                    w = torch.distributions.StudentT(tail_df).sample(p.shape) / math.sqrt(tail_df / (tail_df - 2))
                else:
                    w = torch.randn_like(p)
                p.copy_(w / math.sqrt(p.size(1)) * torch.exp(0.3 * torch.randn(p.size(0), 1)))
            else:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


class StopBench(Exception):
    pass


def stage_log(start: float, prefix: str, stop_after_tries: int = 0):
    """A `log` for fit_artifact that prints each line with the seconds since `start`; with stop_after_tries,
    it stops fit_artifact (StopBench) after that many artifact_try lines."""
    tries = []

    def log(line: str) -> None:
        print(f"{prefix} t:{time.perf_counter() - start:7.1f}s {line}", flush=True)
        if line.startswith("artifact_try"):
            tries.append(line)
            if stop_after_tries and len(tries) >= stop_after_tries:
                raise StopBench
    return log


def after_artifact(cfg: tg.Hyperparameters, model: tg.GPT, calib_seqs: int, calib_seq_len: int) -> bytes:
    """save_artifact's work: self-generated calibration, then fit_artifact; each line with its time."""
    code_bytes = tg.script_identity()[1]
    start = time.perf_counter()
    calib = tg.selfgen_calibration_tokens(model, calib_seqs, calib_seq_len, cfg.seed)
    calib_s = time.perf_counter() - start
    print(f"after t:{calib_s:7.1f}s gptq_calibration seqs:{calib_seqs} seq_len:{calib_seq_len} "
          f"time:{1000 * calib_s:.0f}ms per_token:{1000 * calib_s / calib.numel():.2f}ms", flush=True)
    blob, _ = tg.fit_artifact(model, cfg, code_bytes, stage_log(start, "after"), calib)
    total_s = time.perf_counter() - start
    restored = tg.unpack_artifact(blob)
    print(f"after total:{total_s:.1f}s calibration:{calib_s:.1f}s fit_artifact:{total_s - calib_s:.1f}s "
          f"artifact_bytes:{len(blob)} total_bytes:{code_bytes + len(blob)} "
          f"tensors_read_back:{len(restored)}", flush=True)
    return blob


def old_calibration_seconds(module, model, seqs: int, seq_len: int, full_seqs: int, full_len: int, seed: int) -> float:
    """Seconds `module`'s calibration takes at seqs x seq_len, and (printed) extrapolated to the full size
    by the positions a prefix-rerunning sampler runs: seqs x L(L-1)/2."""
    start = time.perf_counter()
    module.selfgen_calibration_tokens(model, seqs, seq_len, seed)
    seconds = time.perf_counter() - start
    positions = seqs * seq_len * (seq_len - 1) / 2
    full = seconds / positions * full_seqs * full_len * (full_len - 1) / 2
    print(f"before gptq_calibration measured seqs:{seqs} seq_len:{seq_len} time:{seconds:.1f}s "
          f"per_position:{1e6 * seconds / positions:.0f}us -> {full_seqs}x{full_len} extrapolated:{full:.0f}s", flush=True)
    return full


# A projection for one GPU, not a measurement: eager PyTorch launches a kernel per dispatched op from one
# Python thread, and at these shapes (64 tokens per decode step, one column per GPTQ step) the launches set
# the pace, not the GPU. Assumed costs (typical of eager CUDA; change them here): per kernel op and per
# view op (no kernel), and dense fp32 throughput (H100 SXM peak: 67 TFLOPS).
US_PER_KERNEL_OP, US_PER_VIEW_OP, GPU_FP32_FLOPS = 6.0, 1.5, 50e12
NODE_THREADS_PER_RANK = 26  # e.g. 208 hardware threads shared by 8 ranks, each packing the same artifact


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it: kernel ops and views."""

    def __init__(self):
        super().__init__()
        self.kernels = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view or func is torch.ops.aten._unsafe_view.default:
            self.views += 1
        else:
            self.kernels += 1
        return func(*args, **(kwargs or {}))

    def seconds(self, times: float = 1.0) -> float:
        return times * (self.kernels * US_PER_KERNEL_OP + self.views * US_PER_VIEW_OP) / 1e6


def counted(fn) -> OpCounter:
    with OpCounter() as counter:
        fn()
    return counter


def gpu_projection(cfg: tg.Hyperparameters, model: tg.GPT, seqs: int, seq_len: int) -> None:
    """Prints what one GPU rank would spend on calibration, Hessians and GPTQ (from counted ops and FLOPs),
    and the CPU side (pruning, fast packing, zstd at ZSTD_LEVEL) measured here, for the first entry."""
    batch = min(seqs, 64)  # selfgen_calibration_tokens' batch
    short, longer = (counted(lambda n=n: tg.selfgen_calibration_tokens(model, batch, n, 0)) for n in (3, 5))
    step = OpCounter()
    step.kernels, step.views = (longer.kernels - short.kernels) / 2, (longer.views - short.views) / 2
    calib_s = step.seconds((seq_len - 1) * math.ceil(seqs / batch))
    tokens = seqs * seq_len
    small_calib = torch.randint(0, cfg.vocab_size, (8, 16))
    forward = counted(lambda: tg.collect_hessians(model, small_calib))
    hessians = tg.collect_hessians(model, small_calib)
    distinct = {id(h): h.size(0) for h in hessians.values()}
    matrix_params = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and "emb" not in name)
    flops = tokens * (2 * sum(d * d for d in distinct.values()) + 2 * matrix_params)
    hessian_s = forward.seconds(math.ceil(seqs / 8)) + flops / GPU_FP32_FLOPS
    state = {}
    gptq = counted(lambda: state.update(tg.quantize_state(model, cfg, hessians)))
    print(f"gpu_projection calibration decode_steps:{(seq_len - 1) * math.ceil(seqs / batch)} "
          f"kernel_ops_per_step:{step.kernels:.0f} view_ops_per_step:{step.views:.0f} -> {calib_s:.1f}s", flush=True)
    print(f"gpu_projection hessians fp32_flops:{flops:.3g} -> {hessian_s:.2f}s", flush=True)
    print(f"gpu_projection gptq kernel_ops:{gptq.kernels} view_ops:{gptq.views} -> {gptq.seconds():.1f}s", flush=True)
    start = time.perf_counter()
    pruned = tg.prune_smallest(state, cfg.prune_fraction)
    prune_s = time.perf_counter() - start
    start = time.perf_counter()
    packing = tg.fast_packing(pruned)
    pack_s = time.perf_counter() - start
    largest = max(packing.records, key=len)
    start = time.perf_counter()
    tg.compressed_frames([largest], *tg.final_codec(cfg), workers=1)
    largest_s = time.perf_counter() - start
    start = time.perf_counter()
    tg.compressed_frames(packing.records, *tg.final_codec(cfg), workers=1)
    zstd_s = time.perf_counter() - start
    node_zstd_s = max(largest_s, zstd_s / NODE_THREADS_PER_RANK)
    print(f"gpu_projection cpu_side prune:{prune_s:.1f}s fast_pack:{pack_s:.1f}s {cfg.compressor}_one_thread:{zstd_s:.1f}s "
          f"largest_frame:{largest_s:.1f}s -> at {NODE_THREADS_PER_RANK} threads per rank:{node_zstd_s:.1f}s", flush=True)
    total = calib_s + hessian_s + gptq.seconds() + prune_s + pack_s + node_zstd_s
    print(f"gpu_projection total_first_entry_fits:{total:.1f}s (assumed {US_PER_KERNEL_OP:g}us per kernel op, "
          f"{US_PER_VIEW_OP:g}us per view op, {GPU_FP32_FLOPS / 1e12:g} fp32 TFLOPS; CPU side as measured here)", flush=True)


def full_model_bench(args) -> int:
    cfg = dataclasses.replace(tg.Hyperparameters(), compile=False, bf16=False)
    seqs, seq_len = args.calib_seqs or cfg.gptq_calib_seqs, args.calib_seq_len or cfg.gptq_calib_seq_len
    if args.threads:
        tg.compression_workers = lambda: args.threads  # zstd on as many threads as torch
    model = trained_like_gpt(cfg, args.tail_df)
    print(f"bench_quant_full device:cpu({torch.get_num_threads()}_threads) zstd_workers:{tg.compression_workers()} "
          f"params:{sum(p.numel() for p in model.parameters())} weights:student_t(df={args.tail_df:g}) "
          f"bits(matrix/embed):{cfg.matrix_bits}/{cfg.embed_bits} "
          f"prune_fraction:{cfg.prune_fraction} compressor:{cfg.compressor} target_bytes:{cfg.target_bytes} "
          f"calib:{seqs}x{seq_len}", flush=True)
    if args.before:
        spec = importlib.util.spec_from_file_location("train_gpt_before", args.before)
        old = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
        spec.loader.exec_module(old)
        old_cfg = old.Hyperparameters(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(old.Hyperparameters)})
        old_model = old.GPT(old_cfg).eval()
        old_model.load_state_dict(model.state_dict())
        before_seqs, before_len = (int(v) for v in args.before_calib.split("x"))
        old_calibration_seconds(old, old_model, before_seqs, before_len, seqs, seq_len, cfg.seed)
        # Its size fitting on the tokens the new sampler makes: a 64 x 512 run of the old one is hours.
        calib = tg.selfgen_calibration_tokens(model, seqs, seq_len, cfg.seed)
        start = time.perf_counter()
        try:
            old.fit_artifact(old_model, old_cfg, Path(old.__file__).stat().st_size,
                             stage_log(start, "before", args.before_tries), calib)
        except StopBench:
            print(f"before stopped after {args.before_tries} tries (--before-tries)", flush=True)
    after_artifact(cfg, model, seqs, seq_len)
    if args.project:
        gpu_projection(cfg, model, seqs, seq_len)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=120, help="training steps of each run (default 120)")
    parser.add_argument("--val-tokens", type=int, default=0,
                        help="score only the first N validation tokens (default all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 steps (warm-up 2, warm-down 5), "
                                                             "4 calibration sequences, 16,384 val tokens")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--full", action="store_true", help="the default 11-layer model's artifact, stage by stage")
    parser.add_argument("--calib-seqs", type=int, default=0, help="--full: calibration sequences (default 64)")
    parser.add_argument("--calib-seq-len", type=int, default=0, help="--full: calibration length (default 512)")
    parser.add_argument("--tail-df", type=float, default=4.0, help="--full: Student-t degrees of freedom of the "
                                                                     "weights (default 4; 0: Gaussian)")
    parser.add_argument("--project", action="store_true", help="--full: also project one GPU's time from "
                                                                "counted ops (see gpu_projection)")
    parser.add_argument("--before", default="", help="--full: another train_gpt.py to time the same way")
    parser.add_argument("--before-calib", default="8x64", help="--full: SEQSxLEN the --before calibration is "
                                                               "timed at (default 8x64)")
    parser.add_argument("--before-tries", type=int, default=1, help="--full: size-fitting tries of --before "
                                                                    "(default 1; 0: all)")
    args = parser.parse_args(argv)
    rt = runtime_from_args(parser, args)
    if args.full:
        if args.device != "cpu":
            parser.error("--full runs on the CPU")
        if args.tail_df and args.tail_df <= 2:
            parser.error(f"--tail-df {args.tail_df:g}: needs more than 2 (a finite variance), or 0")
        if min(args.calib_seqs, args.calib_seq_len, args.before_tries) < 0:
            parser.error("--calib-seqs, --calib-seq-len and --before-tries: 0 or more")
        if args.before and not Path(args.before).is_file():
            parser.error(f"--before {args.before}: no such file")
        if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", args.before_calib):
            parser.error(f"--before-calib {args.before_calib}: expected SEQSxLEN, e.g. 8x64")
        return full_model_bench(args)
    try:
        cfg = dataclasses.replace(demo_config(rt.device), use_mixer="none", compile=False, iterations=args.steps,
                                  quant_min_numel=4096, max_wallclock_seconds=0.0, train_log_every=0, zstd_level=22)
        if args.quick:
            cfg = dataclasses.replace(cfg, iterations=10, lr_warmup_steps=2, warmdown_iters=5, gptq_calib_seqs=4)
            args.val_tokens = 16_384
        cfg.validate()
        tg.grad_accum_steps_for(cfg, 1)
    except tg.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    val_tokens = tg.load_validation_tokens(cfg.data_path, cfg.vocab_size)
    val_tokens = (val_tokens[:args.val_tokens] if args.val_tokens else val_tokens).to(rt.device)
    tables = tg.token_byte_tables(tg.load_tokenizer(cfg.tokenizer_path), cfg.vocab_size).to(rt.device)
    device = (torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda"
              else f"cpu({torch.get_num_threads()}_threads)")
    print(f"bench_quant device:{device.replace(' ', '_')} layers:{cfg.num_layers} dim:{cfg.model_dim} "
          f"steps:{cfg.iterations} warmdown_iters:{cfg.warmdown_iters} bits(matrix/embed):{cfg.matrix_bits}/"
          f"{cfg.embed_bits} quant_min_numel:{cfg.quant_min_numel} "
          f"prune_fraction:{cfg.prune_fraction} compressor:{cfg.compressor} gptq_calib:selfgen "
          f"calib:{cfg.gptq_calib_seqs}x{cfg.gptq_calib_seq_len} val_tokens:{val_tokens.numel()}")
    rows, first_model = [], None
    runs = ((0.0, (("rtn", False), ("gptq", True))), (CROWN_Q_LAMBDA, (("gptq+crown_q", True),)))
    for crown_q_lambda, methods in runs:
        run_cfg = dataclasses.replace(cfg, crown_q_lambda=crown_q_lambda)
        print(f"training crown_q_lambda:{crown_q_lambda:g} (used by: {', '.join(m for m, _ in methods)})", flush=True)
        model, result = trained_model(run_cfg, rt)
        pre_bpb = plain_bpb(model, run_cfg, rt, val_tokens, tables)
        print(f"  trained steps:{result.steps} train_time:{result.train_time_ms / 1000:.1f}s pre_bpb:{pre_bpb:.4f}",
              flush=True)
        if first_model is None:
            first_model = model
        else:
            print(f"  weights vs the CROWN_Q_LAMBDA=0 run: {weight_change(first_model, model)}", flush=True)
        for method, gptq in methods:
            row = quantize_and_score(model, dataclasses.replace(run_cfg, gptq=gptq), rt, val_tokens, tables)
            row.update(method=method, crown_q_lambda=crown_q_lambda, pre_bpb=pre_bpb,
                       penalty_bpb=row["post_bpb"] - pre_bpb)
            print("  " + " ".join(f"{k}:{v:.6g}" if isinstance(v, float) else f"{k}:{v}" for k, v in row.items()),
                  flush=True)
            rows.append(row)
    print("quantization on the sample corpus (rtn and gptq: one model trained with CROWN_Q_LAMBDA=0; "
          f"gptq+crown_q: its own run with CROWN_Q_LAMBDA={CROWN_Q_LAMBDA:g}, the same seed, data and steps; "
          "penalty = val_bpb after dequantization - before, plain evaluation)")
    print_table(rows)
    print(PUBLISHED_ANCHOR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
