"""Training throughput of a train_gpt.py configuration: ms per optimizer step and tokens per second; and, with
--techniques, what each technique of the stack costs a training step.

    python3 scripts/bench_train.py --preset demo            # the README's CPU demo model
    python3 scripts/bench_train.py --preset full            # the 11-layer model, one GPU's share of 8
    NUM_LAYERS=6 MODEL_DIM=256 python3 scripts/bench_train.py --steps 20
    python3 scripts/bench_train.py --preset full --techniques --steps 2 --warmup 1

Settings come from the same environment variables as train_gpt.py (a preset only fills in the ones not
set). Steps run the script's own `train_step` (forward, backward, Muon and AdamW) on random tokens: the
speed of a step does not depend on the token values, and no data files are needed. The first
--warmup steps (compilation, allocator warm-up) are not timed.

--techniques prints a Markdown table, one row per entry of technique_rows (each technique alone on the old
stack ALL_OFF, then all of them: the defaults, with depth recurrence off and on), every row measured in this
one process so that the rows compare as ratios. Rows run USE_MIXER=none; the mixer has a table of its own.
  - FLOPs per optimizer step at the preset's shape, counted by torch.utils.flop_counter.FlopCounterMode on a
    CPU. Forward and backward are counted on one sequence and multiplied by the sequences in
    TRAIN_BATCH_TOKENS (their FLOPs are linear in the batch); the optimizer's (Muon's Newton-Schulz, the same at
    any batch) are counted once, by a train_step given no micro-batch, on the gradients the counted forward
    and backward left: all matrices (a rank of 8 orthogonalizes about 1/8 of them). Matmuls and attention
    only: elementwise work (norms, gates, XSA's projection, MuonEq-R's row norms) costs time but no FLOPs
    here. Attention counts the scores a causal kernel computes: (T + 1) / 2T of the T x T.
  - ms per step of train_step at --cpu-batch-tokens (default two sequences: a full-size step on a small CPU
    takes minutes), and its ratio to the all-off row.
  - The learned mixer (USE_MIXER=learned) on the all-defaults, recurrence-off model: the oracle lookup alone
    (oracle_probs_for_batch, one per micro-batch, on an oracle over --oracle-tokens synthetic tokens with
    text's repetition), and the step with lookup and mixture loss against USE_MIXER=none.
  - Projections to an H100, never measurements: the published step time PUBLISHED_STEP_MS taken as the all-off
    row's, times each row's FLOP ratio; the lookup and the mixer head from their counted kernel ops and bytes
    (see TrafficCounter and the constants beside it); and the steps that fit in MAX_WALLCLOCK_SECONDS less
    GPTQ_RESERVE_SECONDS at that pace.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils import flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402
from bench_ngram import text_like_tokens  # noqa: E402  (scripts/ is on sys.path when this script runs)
from bench_quant import US_PER_KERNEL_OP, US_PER_VIEW_OP, OpCounter  # noqa: E402

PRESETS = {
    # The README's CPU demo (scripts/run_demo.sh).
    "demo": dict(NUM_LAYERS="4", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="3",
                 TRAIN_SEQ_LEN="256", TRAIN_BATCH_TOKENS="8192", GRAD_ACCUM_STEPS="1", BIGRAM_VOCAB_SIZE="2048",
                 BIGRAM_DIM="64", VE_DIM="64"),
    # The 11-layer defaults at one GPU's share of the 786,432-token global batch on 8 GPUs.
    "full": dict(TRAIN_SEQ_LEN="2048", TRAIN_BATCH_TOKENS="98304", GRAD_ACCUM_STEPS="1"),
}

# The old stack: every technique of technique_rows off, the values before them.
ALL_OFF = dict(PARALLEL_RESIDUAL="0", NUM_LOOPS="0", XSA_LAST_N="4", QK_GAIN_INIT="1.5", MUON_ROW_NORMALIZE="0",
               MUON_MOMENTUM="0.99", SMEAR_GATE="0", GATE_ATTN_OUT="0", LN_SCALE="0", DISABLE_LAYER0_ATTN="0",
               SKIP_GATES_ENABLED="0")

# Projections to one H100 of 8, from stated assumptions (change them here), never measurements. The neural step:
# the published record whose stack ours follows, taken as the all-off row's step and scaled by FLOPs.
PUBLISHED_STEP_MS = 96.1
PUBLISHED_STEP_SOURCE = "parameter-golf PR #1204, 8xH100, 98,304 tokens per GPU, mean of 3 seeds"
# The lookup and the mixer head: bench_quant's US_PER_KERNEL_OP and US_PER_VIEW_OP per op as eager PyTorch
# launches them (compiled, as training runs them, they fuse into fewer kernels: an upper bound), plus the bytes they
# move at HBM speed (H100 SXM HBM3: 3.35 TB/s peak). A random read costs a 32-byte sector, at the same rate:
# optimistic for scattered reads, pessimistic for a binary search's first levels, which stay in the 50 MB L2.
GPU_HBM_BYTES_PER_S = 3.0e12
SECTOR_BYTES = 32


def technique_rows(num_layers: int) -> dict[str, tuple[dict[str, str], bool]]:
    """Row name -> (settings over the preset's and the environment's, model.looping): each technique alone on
    ALL_OFF, then the defaults (all on) with depth recurrence off and on. The values are the 11-layer stack's."""
    alone = {
        "recurrence": (dict(NUM_LOOPS="1", LOOP_START="4", LOOP_END="5"), True),
        "parallel residual": (dict(PARALLEL_RESIDUAL="1", PARALLEL_START_LAYER="7"), False),
        "xsa all layers": (dict(XSA_LAST_N=str(num_layers)), False),
        "qk gain 5.0": (dict(QK_GAIN_INIT="5.0"), False),
        "muon row normalize": (dict(MUON_ROW_NORMALIZE="1"), False),
        "muon momentum 0.97": (dict(MUON_MOMENTUM="0.97"), False),
        "smear gate": (dict(SMEAR_GATE="1"), False),
        "gate attn out": (dict(GATE_ATTN_OUT="1"), False),
        "ln scale": (dict(LN_SCALE="1"), False),
        "layer 0 attn off": (dict(DISABLE_LAYER0_ATTN="1"), False),
        "skip gates": (dict(SKIP_GATES_ENABLED="1"), False),
    }
    rows = {"all off": (ALL_OFF, False)}
    rows.update({name: ({**ALL_OFF, **env}, looping) for name, (env, looping) in alone.items()})
    rows["all (recurrence off)"] = ({}, False)
    rows["all (recurrence on)"] = ({}, True)
    return rows


class RandomBatches:
    """Stands in for DistributedBatchLoader: uniform random token ids of the right shape; with `oracle_run`, a
    zero oracle_run (no leave-one-out: the lookup's work is the same)."""

    def __init__(self, vocab_size: int, seed: int, oracle_run: bool = False):
        self.vocab_size, self.oracle_run = vocab_size, oracle_run
        self.generator = torch.Generator().manual_seed(seed)

    def step_batches(self, batch_tokens: int, accum: int, seq_len: int, device: torch.device) -> list:
        shape = (batch_tokens // (accum * seq_len), seq_len + 1)
        tokens = [torch.randint(0, self.vocab_size, shape, generator=self.generator).to(device) for _ in range(accum)]
        return [tg.Batch(t[:, :-1], t[:, 1:], torch.zeros_like(t[:, 1:]) if self.oracle_run else None) for t in tokens]


def built_model(cfg: tg.Hyperparameters, rt: tg.Runtime, looping: bool | None = None) -> tg.GPT:
    """GPT(cfg) from the seed; `looping` (depth recurrence on or off) set after building, as training sets it."""
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg).to(rt.device)
    if looping is not None:
        model.looping = looping
    return model


def measure_steps(cfg: tg.Hyperparameters, rt: tg.Runtime, steps: int, warmup: int, looping: bool | None = None,
                  oracle_lookup=None) -> dict[str, float]:
    model = built_model(cfg, rt, looping)
    train_model = torch.compile(model, dynamic=False) if cfg.compile else model
    optimizers = tg.build_optimizers(model, cfg, rt.rank, rt.world_size)
    batches = RandomBatches(cfg.vocab_size, cfg.seed, oracle_run=oracle_lookup is not None)
    accum = tg.grad_accum_steps_for(cfg, rt.world_size)
    for _ in range(warmup):
        tg.train_step(train_model, optimizers, batches, cfg, rt, accum, 1.0, cfg.muon_momentum, oracle_lookup)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    rt.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        tg.train_step(train_model, optimizers, batches, cfg, rt, accum, 1.0, cfg.muon_momentum, oracle_lookup)
    rt.synchronize()
    seconds = time.perf_counter() - start
    figures = dict(params=sum(p.numel() for p in model.parameters()), tokens_per_step=cfg.train_batch_tokens,
                   ms_per_step=1000 * seconds / steps, tokens_per_s=cfg.train_batch_tokens * steps / seconds)
    if rt.device.type == "cuda":
        figures["peak_mem_mib"] = torch.cuda.max_memory_allocated(rt.device) / 2**20
    return figures


def causal_attention_flops(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    """The CPU's fused attention, which FlopCounterMode does not know: the scores a causal kernel computes."""
    flops = flop_counter.sdpa_flop_count(query, key, value)
    return flops * (query[2] + 1) // (2 * query[2]) if is_causal else flops


def causal_attention_backward_flops(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False,
                                    *args, out_shape=None, **kwargs) -> int:
    flops = flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)
    return flops * (query[2] + 1) // (2 * query[2]) if is_causal else flops


CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: causal_attention_flops,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                           causal_attention_backward_flops}


def counted_flops(fn) -> int:
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


class NoBatches:
    """A loader with no micro-batch in a step: train_step then clips and steps the optimizers on the gradients
    already there, its optimizer part alone."""

    def step_batches(self, *args) -> list:
        return []


def step_flops(cfg: tg.Hyperparameters, looping: bool) -> tuple[float, float]:
    """(forward and backward FLOPs of an optimizer step at TRAIN_BATCH_TOKENS, the optimizer's FLOPs), counted
    on a CPU (every device then counts the same attention kernel) with one sequence: see the module docstring."""
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"))
    one = dataclasses.replace(cfg, train_batch_tokens=cfg.train_seq_len, grad_accum_steps=1, compile=False, bf16=False)
    model = built_model(one, rt, looping)
    optimizers = tg.build_optimizers(model, one, 0, 1)
    batch = RandomBatches(one.vocab_size, one.seed).step_batches(one.train_batch_tokens, 1, one.train_seq_len,
                                                                 rt.device)[0]
    forward_backward = counted_flops(lambda: tg.micro_step(model, batch, None, None, rt, 1, True))
    optimizer = counted_flops(lambda: tg.train_step(model, optimizers, NoBatches(), one, rt, 1, 1.0, one.muon_momentum))
    return forward_backward * (cfg.train_batch_tokens // cfg.train_seq_len), optimizer


class TrafficCounter(OpCounter):
    """bench_quant's OpCounter, also counting the bytes each kernel op moves as an unfused kernel would: its
    tensors in and out, except a read into a larger table (searchsorted, indexing), which costs one SECTOR_BYTES
    sector per probe: ceil(log2 n) + `extra_depth` probes a query for a binary search over n entries."""

    def __init__(self, extra_depth: float = 0.0):
        super().__init__()
        self.extra_depth, self.bytes = extra_depth, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if not (func.is_view or func is torch.ops.aten._unsafe_view.default):
            self.bytes += self.traffic(func, args, kwargs or {}, out)
        return out

    def traffic(self, func, args, kwargs, out) -> float:
        tensors_out = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        moved = sum(t.nbytes for t in tensors_out)
        if func is torch.ops.aten.searchsorted.Tensor:
            table, queries = args[0], args[1]
            depth = math.ceil(math.log2(table.numel() + 1)) + self.extra_depth
            return moved + queries.nbytes + queries.numel() * depth * SECTOR_BYTES
        if func is torch.ops.aten.index.Tensor:
            table, indices = args[0], [i for i in args[1] if i is not None]
            reads = min(table.nbytes, tensors_out[0].numel() * SECTOR_BYTES)
            return moved + sum(i.nbytes for i in indices) + reads
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        return moved + sum(t.nbytes for t in inputs if isinstance(t, torch.Tensor))

    def gpu_ms(self, launches: float, bytes_scale: float) -> float:
        """Projected ms on an H100: `launches` times these ops, and `bytes_scale` times these bytes."""
        launch_s = launches * (self.kernels * US_PER_KERNEL_OP + self.views * US_PER_VIEW_OP) / 1e6
        return 1000 * (launch_s + self.bytes * bytes_scale / GPU_HBM_BYTES_PER_S)


def synthetic_oracle(cfg: tg.Hyperparameters, rt: tg.Runtime, tokens: int) -> tuple[tg.NgramModel, float]:
    """The oracle build_oracle counts, over `tokens` synthetic tokens with text's repetition (bench_ngram's
    text_like_tokens, so that its tables are about as large as text's); and the ms its counting took."""
    stream = torch.from_numpy(text_like_tokens(tokens, cfg.vocab_size, cfg.seed).astype(np.int32)).to(rt.device)
    rt.synchronize()
    start = time.perf_counter()
    oracle = tg.NgramModel(cfg.ngram_orders, cfg.vocab_size, rt.device)
    oracle.add_stream(stream, 1, stream.numel())
    oracle.counted_tokens = stream.numel()
    rt.synchronize()
    return oracle, 1000 * (time.perf_counter() - start)


def measure_lookup(lookup, cfg: tg.Hyperparameters, rt: tg.Runtime, steps: int, warmup: int) -> float:
    """ms per optimizer step of the oracle lookups alone: one a micro-batch, as micro_step makes them."""
    batches = RandomBatches(cfg.vocab_size, cfg.seed, oracle_run=True)
    accum = tg.grad_accum_steps_for(cfg, rt.world_size)
    for i in range(warmup + steps):
        if i == warmup:
            rt.synchronize()
            start = time.perf_counter()
        for batch in batches.step_batches(cfg.train_batch_tokens, accum, cfg.train_seq_len, rt.device):
            lookup(batch)
    rt.synchronize()
    return 1000 * (time.perf_counter() - start) / steps


def mixer_traffic(cfg: tg.Hyperparameters, rt: tg.Runtime,
                  oracle: tg.NgramModel) -> tuple[TrafficCounter, TrafficCounter]:
    """Kernel ops and bytes of one micro-batch at cfg's shape: (the oracle lookup, eager; the mixer head and the
    mixture loss in forward and backward, as the difference between micro_step with and without experts)."""
    accum = tg.grad_accum_steps_for(cfg, rt.world_size)
    batch = RandomBatches(cfg.vocab_size, cfg.seed, oracle_run=True).step_batches(
        cfg.train_batch_tokens, accum, cfg.train_seq_len, rt.device)[0]
    deeper = max(0.0, math.log2(cfg.ngram_oracle_tokens / oracle.counted_tokens))  # the real oracle's searches
    with TrafficCounter(deeper) as lookup:
        experts = tg.oracle_probs_for_batch(oracle, batch.inputs, batch.targets, batch.oracle_run,
                                            cfg.ngram_prior_beta)
    model = built_model(cfg, rt, looping=False)
    with TrafficCounter() as plain:
        tg.micro_step(model, batch, None, None, rt, 1, True)
    model.zero_grad(set_to_none=True)  # else the second backward accumulates into the first's gradients
    with TrafficCounter() as mixed:
        tg.micro_step(model, batch, lambda _: experts, None, rt, 1, True)
    head = TrafficCounter()
    head.kernels, head.views, head.bytes = mixed.kernels - plain.kernels, mixed.views - plain.views, \
        mixed.bytes - plain.bytes
    return lookup, head


def measure_mixer(cfg: tg.Hyperparameters, cpu_cfg: tg.Hyperparameters, rt: tg.Runtime, args) -> dict:
    """USE_MIXER=learned's costs at cpu_cfg's batch (cfg and cpu_cfg: the learned mixer on) and the traffic
    projected to cfg's: the figures mixer_report prints."""
    oracle, build_ms = synthetic_oracle(cfg, rt, args.oracle_tokens)
    lookup = torch.compile(tg.oracle_probs_for_batch, dynamic=False) if cfg.compile else tg.oracle_probs_for_batch
    as_trained = lambda b: lookup(oracle, b.inputs, b.targets, b.oracle_run, cfg.ngram_prior_beta)  # noqa: E731
    lookup_ms = measure_lookup(as_trained, cpu_cfg, rt, args.steps, args.warmup)
    learned_ms = measure_steps(cpu_cfg, rt, args.steps, args.warmup, False, as_trained)["ms_per_step"]
    lookup_ops, head_ops = mixer_traffic(cpu_cfg, rt, oracle)
    micro_tokens = cpu_cfg.train_batch_tokens // tg.grad_accum_steps_for(cpu_cfg, rt.world_size)
    calls, bytes_scale = tg.grad_accum_steps_for(cfg, 1), cfg.train_batch_tokens / micro_tokens
    return dict(oracle_tokens=oracle.counted_tokens, oracle_build_ms=build_ms, lookup_ms=lookup_ms,
                learned_ms=learned_ms, lookup_ops=lookup_ops, head_ops=head_ops, calls=calls,
                lookup_gbytes=lookup_ops.bytes * bytes_scale / 1e9, head_gbytes=head_ops.bytes * bytes_scale / 1e9,
                lookup_gpu_ms=lookup_ops.gpu_ms(calls, bytes_scale), head_gpu_ms=head_ops.gpu_ms(calls, bytes_scale),
                search_depth_added=lookup_ops.extra_depth)


def technique_configs(base_env: dict, cuda: bool, num_layers: int, cpu_batch_tokens: int) -> dict[str, tuple]:
    """Row name -> (config at the preset's shape, the same at cpu_batch_tokens, looping), USE_MIXER=none; raises
    ConfigError for a row that cannot run."""
    rows = technique_rows(num_layers)
    known = {field.name.upper() for field in dataclasses.fields(tg.Hyperparameters)}
    missing = sorted({name for overrides, _ in rows.values() for name in overrides} - known)
    if missing:
        raise tg.ConfigError(f"train_gpt.py has no setting {', '.join(missing)}: --techniques needs the stack's "
                             "settings (see technique_rows)")
    configs = {}
    for name, (overrides, looping) in rows.items():
        cfg = tg.Hyperparameters.from_env({**base_env, **overrides, "USE_MIXER": "none"}, cuda)
        cpu_cfg = dataclasses.replace(cfg, train_batch_tokens=cpu_batch_tokens)
        tg.grad_accum_steps_for(cfg, 1)
        tg.grad_accum_steps_for(cpu_cfg, 1)
        configs[name] = (cfg, cpu_cfg, looping)
    return configs


def slug(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


def measure_techniques(configs: dict[str, tuple], rt: tg.Runtime, args, budget_s: float) -> dict[str, dict]:
    """Each row's FLOPs, ms per step at the reduced batch, and projections; a key:value line as each is done."""
    results = {}
    for name, (cfg, cpu_cfg, looping) in configs.items():
        forward_backward, optimizer = step_flops(cfg, looping)
        ms = measure_steps(cpu_cfg, rt, args.steps, args.warmup, looping)["ms_per_step"]
        row = dict(fwd_bwd_gflops=forward_backward / 1e9, optimizer_gflops=optimizer / 1e9, ms=ms)
        first = next(iter(results.values()), row)  # the all-off row
        all_off_gflops = first["fwd_bwd_gflops"] + first["optimizer_gflops"]
        row["flop_ratio"] = (forward_backward + optimizer) / 1e9 / all_off_gflops
        row["ms_ratio"] = ms / first["ms"]
        row["gpu_ms"] = PUBLISHED_STEP_MS * row["flop_ratio"]
        row["steps"] = 1000 * budget_s / row["gpu_ms"]
        results[name] = row
        print(f"bench_train technique:{slug(name)} looping:{int(looping)} fwd_bwd_gflops:{row['fwd_bwd_gflops']:.2f} "
              f"optimizer_gflops:{row['optimizer_gflops']:.2f} flop_ratio:{row['flop_ratio']:.4f} "
              f"{rt.device.type}_ms:{ms:.1f} {rt.device.type}_batch_tokens:{cpu_cfg.train_batch_tokens} "
              f"{rt.device.type}_ratio:{row['ms_ratio']:.3f} h100_ms_projected:{row['gpu_ms']:.1f} "
              f"steps_projected:{row['steps']:.0f}", flush=True)
    return results


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def technique_table(results: dict[str, dict], device: str, batch_tokens: int, budget_s: float) -> str:
    header = ["technique", "fwd+bwd GFLOPs/step", "optimizer GFLOPs", "FLOP ratio",
              f"{device} ms/step at {batch_tokens:,} tokens", f"{device} ratio", "H100 ms/step, projected",
              f"steps in {budget_s:g} s, projected"]
    return markdown_table(header, [[name, f"{r['fwd_bwd_gflops']:,.1f}", f"{r['optimizer_gflops']:,.1f}",
                                    f"{r['flop_ratio']:.4f}", f"{r['ms']:,.1f}", f"{r['ms_ratio']:.3f}",
                                    f"{r['gpu_ms']:.1f}", f"{r['steps']:,.0f}"] for name, r in results.items()])


def mixer_report(mixer: dict, none_row: dict, device: str, batch_tokens: int, budget_s: float) -> str:
    """The mixer's table, its projection's assumptions, and its key:value line."""
    none_ms, learned_ms, lookup_ms = none_row["ms"], mixer["learned_ms"], mixer["lookup_ms"]
    neural_gpu_ms = none_row["gpu_ms"]
    learned_gpu_ms = neural_gpu_ms + mixer["lookup_gpu_ms"] + mixer["head_gpu_ms"]
    header = ["mixer, all (recurrence off)", f"{device} ms/step at {batch_tokens:,} tokens", "ratio to USE_MIXER=none",
              "H100 ms/step, projected", f"steps in {budget_s:g} s, projected"]
    table = markdown_table(header, [
        ["USE_MIXER=none", f"{none_ms:,.1f}", "1.000", f"{neural_gpu_ms:.1f}",
         f"{1000 * budget_s / neural_gpu_ms:,.0f}"],
        ["oracle lookup alone", f"{lookup_ms:,.1f}", f"{lookup_ms / none_ms:.3f}", f"{mixer['lookup_gpu_ms']:.2f}",
         "-"],
        ["USE_MIXER=learned (lookup + mixer loss)", f"{learned_ms:,.1f}", f"{learned_ms / none_ms:.3f}",
         f"{learned_gpu_ms:.1f}", f"{1000 * budget_s / learned_gpu_ms:,.0f}"]])
    lookup, head = mixer["lookup_ops"], mixer["head_ops"]
    notes = [
        f"- lookup: oracle over {mixer['oracle_tokens']:,} synthetic tokens (counted in "
        f"{mixer['oracle_build_ms']:,.0f} ms here: training time in train(), not in these steps); each binary "
        f"search {mixer['search_depth_added']:.1f} probes deeper for the real oracle's tables",
        f"- lookup on an H100: {lookup.kernels} kernel ops and {lookup.views} view ops x {mixer['calls']} "
        f"micro-batches at {US_PER_KERNEL_OP:g} / {US_PER_VIEW_OP:g} us (eager launches; compiled, as trained, "
        f"fewer), {mixer['lookup_gbytes']:.3f} GB at {GPU_HBM_BYTES_PER_S / 1e12:g} TB/s ({SECTOR_BYTES}-byte "
        "sector a random read)",
        f"- mixer head and loss on an H100: {head.kernels} more kernel ops, {head.views} more view ops and "
        f"{mixer['head_gbytes']:.3f} GB more in forward and backward, at the same rates",
    ]
    line = (f"bench_train mixer oracle_tokens:{mixer['oracle_tokens']} oracle_build_ms:{mixer['oracle_build_ms']:.1f} "
            f"{device}_batch_tokens:{batch_tokens} none_{device}_ms:{none_ms:.1f} lookup_{device}_ms:{lookup_ms:.1f} "
            f"learned_{device}_ms:{learned_ms:.1f} learned_ratio:{learned_ms / none_ms:.3f} "
            f"lookup_kernel_ops:{lookup.kernels} lookup_gbytes_per_step:{mixer['lookup_gbytes']:.4f} "
            f"lookup_h100_ms_projected:{mixer['lookup_gpu_ms']:.2f} head_h100_ms_projected:{mixer['head_gpu_ms']:.2f} "
            f"learned_h100_ms_projected:{learned_gpu_ms:.1f} "
            f"learned_steps_projected:{1000 * budget_s / learned_gpu_ms:.0f}")
    return "\n".join([table, "", *notes, "", line])


def run_techniques(args, base: tg.Hyperparameters, base_env: dict, cuda: bool, rt: tg.Runtime, device: str) -> int:
    cpu_batch_tokens = args.cpu_batch_tokens or 2 * base.train_seq_len
    try:
        configs = technique_configs(base_env, cuda, base.num_layers, cpu_batch_tokens)
        mixer_cfg = tg.Hyperparameters.from_env({**base_env, "USE_MIXER": "learned"}, cuda)
    except tg.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    budget_s = base.max_wallclock_seconds - base.gptq_reserve_seconds
    print(f"bench_train techniques preset:{args.preset or 'none'} device:{device.replace(' ', '_')} "
          f"layers:{base.num_layers} dim:{base.model_dim} seq_len:{base.train_seq_len} "
          f"batch_tokens:{base.train_batch_tokens} {rt.device.type}_batch_tokens:{cpu_batch_tokens} "
          f"steps:{args.steps} warmup:{args.warmup}", flush=True)
    results = measure_techniques(configs, rt, args, budget_s)
    mixer_cpu_cfg = dataclasses.replace(mixer_cfg, train_batch_tokens=cpu_batch_tokens)
    mixer = measure_mixer(mixer_cfg, mixer_cpu_cfg, rt, args)
    kind = rt.device.type
    print(f"\nTraining step per technique at TRAIN_BATCH_TOKENS={base.train_batch_tokens:,} "
          f"(TRAIN_SEQ_LEN={base.train_seq_len}); {kind} ms at {cpu_batch_tokens:,} tokens, not the full batch\n")
    print(technique_table(results, kind, cpu_batch_tokens, budget_s))
    print(f"\n{mixer_report(mixer, results['all (recurrence off)'], kind, cpu_batch_tokens, budget_s)}\n")
    print(f"Projections, not measurements: the neural step is {PUBLISHED_STEP_MS} ms ({PUBLISHED_STEP_SOURCE}), "
          "taken as the all-off row's and scaled by each row's FLOP ratio (FLOPs of matmuls and attention only; "
          "the record ran recurrence and parallel residuals itself). Steps: MAX_WALLCLOCK_SECONDS "
          f"{base.max_wallclock_seconds:g} s less GPTQ_RESERVE_SECONDS {base.gptq_reserve_seconds:g} s "
          "over the projected step.")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="fill in unset settings from a preset")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--techniques", action="store_true", help="the cost of each technique: see above")
    parser.add_argument("--cpu-batch-tokens", type=int, default=0,
                        help="with --techniques: tokens of a timed step (default 2 x TRAIN_SEQ_LEN)")
    parser.add_argument("--oracle-tokens", type=int, default=2_000_000,
                        help="with --techniques: tokens of the mixer's oracle (default 2,000,000)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if args.cpu_batch_tokens < 0 or args.oracle_tokens < 1 or args.threads < 0:
        parser.error("--cpu-batch-tokens and --threads must be at least 0 and --oracle-tokens at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
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
    if args.techniques:
        return run_techniques(args, cfg, env, cuda, rt, device)
    figures = measure_steps(cfg, rt, args.steps, args.warmup)
    print(f"bench_train preset:{args.preset or 'none'} device:{device.replace(' ', '_')} compile:{int(cfg.compile)} "
          f"layers:{cfg.num_layers} dim:{cfg.model_dim} seq_len:{cfg.train_seq_len} "
          + " ".join(f"{k}:{v:.1f}" if isinstance(v, float) else f"{k}:{v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
