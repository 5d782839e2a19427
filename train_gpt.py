"""train_gpt.py: an 11-layer GPT for the parameter-golf challenge, in one file.

Trains on FineWeb shards, then reports bits per byte (val_bpb) on the whole validation split with a sliding window;
every scored q_t is a full, normalized distribution over the vocabulary that depends on x_<t only
(../shared/LEGALITY.md). Run: `torchrun --standalone --nproc_per_node=8 train_gpt.py` (8 GPUs) or `python3 train_gpt.py`
(one process; CPU if no CUDA). Settings are environment variables (Hyperparameters; the README's table).

Sources: Muon for the matrices, AdamW for the rest (modded-nanogpt); tied embeddings, logit softcap 30, RMSNorm, RoPE,
QK-norm with a learned per-head gain, zero-initialised output projections, U-Net skips (the parameter-golf baseline);
LeakyReLU(0.5)^2 MLP 3.5x wide, partial RoPE, XSA, BigramHash, shared value embeddings, value residual (ResFormer),
Muon weight decay, EMA, a warm-down ending with the wall clock (the 11-layer records); parallel residual lanes, depth
recurrence, layer 0 without attention, gated skips, LN scale, QK gain 5, MuonEq-R, smear and attention-output gates,
SDClip (later records; docs/frontier.md names each one's PR and published gain)."""

from __future__ import annotations

import base64, bisect, contextlib, dataclasses, difflib, functools, gc, glob, hashlib, importlib.util, lzma, math, os
import platform, re
import struct, sys, time, zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import zstandard

# =============================================================================
# HYPERPARAMETERS
# =============================================================================

MIXER_CHOICES = ("learned", "hedge", "none")
HEDGE_ORDERS = (1, 2, 3)  # Hedge mixes the neural model with the cache's unigram, bigram and trigram
HEDGE_ALPHA = 0.05
HEDGE_PRIOR_NEURAL = 0.9
TTT_OPTIMIZERS = ("adam", "sgd")
TTT_SEGMENTS = 8  # after the phases, points where the evaluation's pace is checked against its budget
COMPRESSORS = ("brotli", "zstd")
DEVICES = ("auto", "cuda", "cpu")


class ConfigError(ValueError):
    """A setting that cannot work; its message is the one line the run stops with."""


@dataclass(frozen=True)
class Hyperparameters:
    data_path: str = ""  # "": where data/cached_challenge_fineweb.py puts VOCAB_SIZE's data (default_data_paths)
    tokenizer_path: str = ""
    vocab_size: int = 1024
    caseops_enabled: bool = False  # bits per byte from the fineweb_val_bytes_* sidecar (CaseOps data, docs/caseops.md)
    run_id: str = "run"
    seed: int = 1337
    iterations: int = 20000
    warmup_steps: int = 3  # compile-priming steps before the clock, leaving no trace (the upstream meaning)
    lr_warmup_steps: int = 20
    warmdown_iters: int = 3500
    train_batch_tokens: int = 786_432
    train_seq_len: int = 2048
    grad_accum_steps: int = 0  # 0: 8 // WORLD_SIZE when that divides, else 1
    max_wallclock_seconds: float = 600.0
    gptq_reserve_seconds: float = 12.0  # of the wall clock, for EMA, GPTQ calibration, GPTQ and packing after the loop
    eval_seq_len: int = 2048
    eval_stride: int = 64
    val_loss_every: int = 0
    train_log_every: int = 100
    val_batch_size: int = 524_288  # all ranks together, as upstream: a rank's batch is this / (W x accum)
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int | None = None  # None (as every None below): the vocabulary's recipe, VOCAB_RECIPES
    mlp_mult: float | None = None
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    rope_dims: int = 16
    logit_softcap: float = 30.0
    qk_gain_init: float = 5.0  # #1413 (4 to 5: -0.0008)
    unet_skips: bool = True
    skip_gates_enabled: bool = True  # sigmoid-gated U-Net skips (#1179, #1204)
    xsa_last_n: int | None = None  # None: every layer (#1019)
    ln_scale: bool = True  # each block's norms scaled 1/sqrt(layer + 1) (records since 2026-03-21)
    disable_layer0_attn: bool = True  # layer 0 is an MLP alone (#1204)
    parallel_residual: bool = True  # attention and MLP on two lanes from PARALLEL_START_LAYER (#1204: -0.0022)
    parallel_start_layer: int | None = None  # kept after LOOP_END
    num_loops: int | None = None  # extra passes over LOOP_START..LOOP_END once ENABLE_LOOPING_AT of the budget is spent
    loop_start: int | None = None  # None: ending at the U-Net hinge (#1204: 4,5 of 11)
    loop_end: int | None = None
    enable_looping_at: float | None = None
    smear_gate: bool = True  # each token embedding takes a gated share of the previous one (#1667)
    gate_attn_out: bool = True  # per-head sigmoid gate on attention's output (#1667)
    bigram_vocab_size: int | None = None
    bigram_dim: int = 128
    ve_enabled: bool | None = None
    ve_dim: int = 128
    ve_layers: tuple[int, ...] | None = None  # None: the last two layers
    value_residual: bool = True
    use_mixer: str = "learned"
    mixer_eta: float = 0.001
    mixer_loss_weight: float = 0.5
    ngram_min_order: int = 2
    ngram_max_order: int = 7
    ngram_oracle_tokens: int = 50_000_000
    ngram_chunk_tokens: int = 131_072
    ngram_audit_positions: int = 0
    ngram_prior_beta: float = 0.0  # 0: off (see ngram_expert_probs)
    matrix_bits: int = 6  # all-int6 (#1285); the size fitter may spend spare bytes on a finer step (see fit_ladder)
    embed_bits: int | None = None
    quant_min_numel: int = 65_536
    matrix_clip_sigmas: float = 12.85  # SDClip (#1394): a row's step is this x its std / qmax; other matrices
    mlp_clip_sigmas: float = 12.0  # #1769
    attn_clip_sigmas: float = 13.0  # #1610
    embed_clip_sigmas: float | None = None
    gptq: bool = True
    gptq_calib_seqs: int = 64
    gptq_calib_seq_len: int = 512
    gptq_damp: float = 0.01
    crown_q_lambda: float = 0.01
    prune_fraction: float = 0.0  # pruning is the fitter's last resort, after its coarsest step
    compressor: str = "brotli"
    zstd_level: int = 22
    target_bytes: int = 16_000_000
    eval_artifact: str = ""  # a path: skip training and evaluate that artifact alone
    ttt_enabled: bool = True  # per-document LoRA TTT (#1530) in place of the stream's sliding window; names as #1855's
    ttt_lora_rank: int = 96
    ttt_lora_alpha: float = 144.0  # adapters scaled alpha / rank (#1767)
    ttt_lora_lr: float = 0.0001
    ttt_chunk_size: int | None = None  # None: 48 (#1530), or EVAL_SEQ_LEN if shorter; scored, then trained on
    ttt_batch_size: int = 64  # documents adapted side by side, each with its own adapters
    ttt_optimizer: str = "adam"
    ttt_beta1: float = 0.0
    ttt_beta2: float = 0.999
    ttt_weight_decay: float = 1.0
    ttt_warm_start_a: bool = False  # #1767's 1 (A kept across documents) would break rule 1 here: refused
    phased_ttt_num_phases: int = 1  # global SGD on the base weights after each 1/this of PHASED_TTT_PREFIX_DOCS
    phased_ttt_prefix_docs: int = 2000
    global_ttt_lr: float = 0.001
    global_ttt_momentum: float = 0.9
    global_ttt_epochs: int = 1
    global_ttt_chunk_tokens: int = 32768  # the learning rate decays by a cosine over chunks of this many tokens
    global_ttt_batch_seqs: int = 32
    global_ttt_grad_clip: float = 1.0
    eval_budget_seconds: float = 540.0
    matrix_lr: float = 0.026  # #1586 (MATRIX_LR and weight decays as tuned with QK gain 5, MuonEq-R, momentum 0.97)
    min_lr: float = 0.1  # the warm-down's floor, a fraction of each learning rate (#1787)
    scalar_lr: float = 0.025
    embed_lr: float = 0.6
    tied_embed_lr: float = 0.035
    head_lr: float = 0.008
    muon_momentum: float = 0.97  # #1514
    muon_row_normalize: bool = True  # MuonEq-R: update rows normalized before Newton-Schulz (#1285)
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_wd: float = 0.095  # compressed size tracks the weights' RMS (#1218, #1285)
    embed_wd: float = 0.085
    adam_wd: float = 0.02
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip_norm: float = 0.3
    ema_decay: float = 0.997
    compile: bool = True
    bf16: bool = True  # bf16 autocast; BF16=1 on a CPU runs what CUDA runs, to test that path there
    device: str = "auto"  # auto, cuda or cpu (see init_runtime)

    def __post_init__(self):
        paths = default_data_paths(self.vocab_size, self.caseops_enabled)
        for name, path in zip(("data_path", "tokenizer_path"), paths):
            if not getattr(self, name):
                object.__setattr__(self, name, path)
        recipe = dict(VOCAB_RECIPES[max(v for v in VOCAB_RECIPES if v <= self.vocab_size)])
        L = self.num_layers  # layer defaults follow NUM_LAYERS: a shallower model runs without setting them
        hinge, loop_length, lanes_from = min(L - 1, L // 2), recipe.pop("loop_length"), recipe.pop("lanes_from_of_11")
        first = int(self.disable_layer0_attn)  # the first layer with attention (and values)
        defaults = {name: (lambda value=value: value) for name, value in recipe.items()} | dict(
            xsa_last_n=lambda: L, ve_layers=lambda: tuple(range(max(first, L - 2), L)),
            loop_start=lambda: max(0, hinge + 1 - loop_length), loop_end=lambda: hinge,
            parallel_start_layer=lambda: max(L * lanes_from // 11, (self.loop_end + 1) * (self.num_loops > 0)),
            embed_clip_sigmas=lambda: 20.0 if self.embed_bits == 8 else 15.0,  # in order: later ones read earlier
            ttt_chunk_size=lambda: min(48, self.eval_seq_len))
        for name, default in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default())

    @property
    def ngram_orders(self) -> tuple[int, ...]:
        """Orders of the evaluation cache: the learned head's experts, or Hedge's, or none."""
        if self.use_mixer == "learned":
            return tuple(range(self.ngram_min_order, self.ngram_max_order + 1))
        return HEDGE_ORDERS if self.use_mixer == "hedge" else ()

    @classmethod
    def from_env(cls, env: Mapping[str, str], cuda: bool) -> "Hyperparameters":
        """Every setting from `env`, checked; COMPILE and BF16 default on with CUDA only (slower on a CPU)."""
        values = {"compile": cuda, "bf16": cuda}
        for field in dataclasses.fields(cls):
            if field.name.upper() in env:
                like = {"int": 0, "float": 0.0, "bool": False, "tuple[int, ...]": ()}.get(
                    field.type.split(" | ")[0], field.default)  # a None default parses as its annotated type
                values[field.name] = parse_setting(field.name.upper(), env[field.name.upper()].strip(), like)
        hp = cls(**values)
        hp.validate()
        return hp

    def validate(self) -> None:
        H, KV, L, first = self.num_heads, self.num_kv_heads, self.num_layers, int(self.disable_layer0_attn)
        head_dim = self.model_dim // max(H, 1)
        checks = [
            (2 <= self.vocab_size <= 65536, "VOCAB_SIZE", "2..65536 (token ids are uint16)"),
            (1 <= self.eval_stride <= self.eval_seq_len, "EVAL_STRIDE", f"1..EVAL_SEQ_LEN ({self.eval_seq_len})"),
            (self.val_batch_size >= max(self.eval_seq_len, self.train_seq_len), "VAL_BATCH_SIZE",
             "tokens per evaluation batch, at least one sequence"),
            (H >= 1 and self.model_dim % H == 0, "MODEL_DIM", f"a multiple of NUM_HEADS ({H})"),
            (head_dim % 2 == 0, "MODEL_DIM", "MODEL_DIM / NUM_HEADS must be even (rotary pairs)"),
            (1 <= KV <= H and H % KV == 0, "NUM_KV_HEADS", f"a divisor of NUM_HEADS ({H})"),
            (0 <= self.rope_dims <= head_dim and self.rope_dims % 2 == 0, "ROPE_DIMS",
             f"an even number from 0 to the head size ({head_dim}); 0 means the whole head"),
            (0 <= self.xsa_last_n <= L, "XSA_LAST_N", f"0..NUM_LAYERS ({L})"),
            (self.loop_start < 0 or self.loop_start <= self.loop_end < L, "LOOP_END",
             f"LOOP_START ({self.loop_start})..{L - 1}"),
            (not (self.parallel_residual and self.num_loops) or self.parallel_start_layer > self.loop_end,
             "PARALLEL_START_LAYER", f"after LOOP_END ({self.loop_end}) with NUM_LOOPS > 0: no lanes inside a loop"),
            (self.bigram_vocab_size != 1, "BIGRAM_VOCAB_SIZE", "0 (off) or at least 2"),
            (all(first <= i < L for i in self.ve_layers) and len(set(self.ve_layers)) == len(self.ve_layers),
             "VE_LAYERS", f"distinct indices of layers with attention, {first}..{L - 1}"),
            (self.use_mixer in MIXER_CHOICES, "USE_MIXER", " or ".join(MIXER_CHOICES)),
            (self.ngram_min_order <= self.ngram_max_order <= 16, "NGRAM_MAX_ORDER",
             f"NGRAM_MIN_ORDER ({self.ngram_min_order})..16"),
            (self.ngram_oracle_tokens >= (self.use_mixer == "learned"), "NGRAM_ORACLE_TOKENS",
             "at least 1 with USE_MIXER=learned (the head learns from the oracle)"),
            (self.ngram_prior_beta == 0 or (math.isfinite(self.ngram_prior_beta) and self.ngram_prior_beta > 0
                                            and self.use_mixer == "learned"), "NGRAM_PRIOR_BETA",
             "0 (off), or a finite number above 0 with USE_MIXER=learned (Hedge's experts are add-alpha smoothed)"),
            (self.prune_fraction < 1, "PRUNE_FRACTION", "in [0, 1)"),
            (self.zstd_level <= 22, "ZSTD_LEVEL", "1..22"),
            (self.compressor in COMPRESSORS, "COMPRESSOR", " or ".join(COMPRESSORS)),
            (self.compressor != "brotli" or importlib.util.find_spec("brotli"), "COMPRESSOR",
             "zstd, or brotli once its package is installed (pip install brotli)"),
            (self.ttt_chunk_size <= self.eval_seq_len, "TTT_CHUNK_SIZE", f"1..EVAL_SEQ_LEN ({self.eval_seq_len})"),
            (self.global_ttt_chunk_tokens >= self.eval_seq_len, "GLOBAL_TTT_CHUNK_TOKENS",
             f"at least EVAL_SEQ_LEN ({self.eval_seq_len}): global SGD trains on whole sequences of a chunk"),
            (self.ttt_optimizer in TTT_OPTIMIZERS, "TTT_OPTIMIZER", " or ".join(TTT_OPTIMIZERS)),
            (not self.ttt_warm_start_a, "TTT_WARM_START_A", "0: documents are adapted longest first, so A carried "
             "over would learn from documents later in the stream (LEGALITY.md rule 1)"),
            (not self.eval_artifact or Path(self.eval_artifact).is_file(), "EVAL_ARTIFACT",
             "empty (train, then evaluate the new artifact) or the path of an artifact file"),
            (self.device in DEVICES, "DEVICE", " or ".join(DEVICES)),
        ]
        checks += [(getattr(self, name.lower()) >= least, name, f"at least {least}")
                   for least, names in SETTING_MINIMUMS.items() for name in names]
        checks += [(2 <= getattr(self, name.lower()) <= 8, name, "2..8")
                   for name in ("MATRIX_BITS", "EMBED_BITS")]
        checks += [(0 <= getattr(self, name.lower()) < 1, name, "in [0, 1)") for name in SETTING_FRACTIONS]
        checks += [(getattr(self, name.lower()) > 0, name, "greater than 0") for name in SETTING_POSITIVE]
        for ok, name, allowed in checks:
            if not ok:
                raise ConfigError(f"{name}={setting_text(getattr(self, name.lower()))!r} is not allowed: {allowed}")

    def as_log_lines(self) -> list[str]:
        return [f"setting {field.name.upper()}={setting_text(getattr(self, field.name))}"
                for field in dataclasses.fields(self)]


# The recipe of the records that moved to each vocabulary, for settings left unset (docs/frontier.md: PRs, gains):
# sp1024 #1204's (layers 4-5 looped once from 50%, lanes from layer 7); from sp4096 #1218's 4 KV heads and MLP 4x
# without BigramHash or value embeddings, #1493's loop of layers 3-5 twice from 35%, lanes from layer 8; at sp8192
# #1586's int7 embedding. Layer indices are of 11 and follow NUM_LAYERS.
VOCAB_RECIPES = {
    2: dict(num_kv_heads=8, mlp_mult=3.5, bigram_vocab_size=6144, ve_enabled=True, num_loops=1, enable_looping_at=0.5,
            embed_bits=8, loop_length=2, lanes_from_of_11=7),
    4096: dict(num_kv_heads=4, mlp_mult=4.0, bigram_vocab_size=0, ve_enabled=False, num_loops=2, enable_looping_at=0.35,
               embed_bits=8, loop_length=3, lanes_from_of_11=8),
}
VOCAB_RECIPES[8192] = VOCAB_RECIPES[4096] | dict(embed_bits=7)


def default_data_paths(vocab_size: int, caseops: bool) -> tuple[str, str]:
    """(DATA_PATH, TOKENIZER_PATH) of the published data of this vocabulary (CaseOps: the records' export's names)."""
    suffix = CASEOPS_SUFFIX if caseops else ""
    return (f"./data/datasets/fineweb10B_sp{vocab_size}{suffix}",
            f"./data/tokenizers/fineweb_{vocab_size}_bpe{suffix}.model")


def setting_text(value):
    """A setting as it is written in the environment: 0/1 for a switch, comma-separated for a tuple."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else int(value) if isinstance(value, bool) else value


SETTING_MINIMUMS = {
    0: ("PARALLEL_START_LAYER", "NUM_LOOPS", "LOOP_START", "EMBED_WD",
        "WARMUP_STEPS", "LR_WARMUP_STEPS", "WARMDOWN_ITERS", "GRAD_ACCUM_STEPS", "MAX_WALLCLOCK_SECONDS",
        "GPTQ_RESERVE_SECONDS", "VAL_LOSS_EVERY", "TRAIN_LOG_EVERY", "LOGIT_SOFTCAP", "BIGRAM_VOCAB_SIZE",
        "MIXER_ETA", "MIXER_LOSS_WEIGHT", "NGRAM_AUDIT_POSITIONS", "QUANT_MIN_NUMEL", "CROWN_Q_LAMBDA",
        "PRUNE_FRACTION", "TTT_LORA_LR", "TTT_WEIGHT_DECAY", "PHASED_TTT_NUM_PHASES", "PHASED_TTT_PREFIX_DOCS",
        "GLOBAL_TTT_LR", "GLOBAL_TTT_EPOCHS", "GLOBAL_TTT_GRAD_CLIP",
        "MATRIX_LR", "SCALAR_LR", "EMBED_LR", "TIED_EMBED_LR", "HEAD_LR", "MUON_WD", "ADAM_WD", "GRAD_CLIP_NORM",
        "MUON_MOMENTUM_WARMUP_STEPS"),
    1: ("ITERATIONS", "NUM_LAYERS", "BIGRAM_DIM", "VE_DIM", "NGRAM_CHUNK_TOKENS", "GPTQ_CALIB_SEQS", "ZSTD_LEVEL",
        "TARGET_BYTES", "MUON_BACKEND_STEPS", "TTT_LORA_RANK", "TTT_CHUNK_SIZE", "TTT_BATCH_SIZE",
        "GLOBAL_TTT_BATCH_SEQS"),
    2: ("TRAIN_SEQ_LEN", "EVAL_SEQ_LEN", "NGRAM_MIN_ORDER", "GPTQ_CALIB_SEQ_LEN"),
}
SETTING_FRACTIONS = ("MUON_MOMENTUM", "MUON_MOMENTUM_WARMUP_START", "BETA1", "BETA2", "EMA_DECAY", "TTT_BETA1",
                     "TTT_BETA2", "GLOBAL_TTT_MOMENTUM",
                     "ENABLE_LOOPING_AT", "MIN_LR")
SETTING_POSITIVE = ("MLP_MULT", "ROPE_BASE", "GPTQ_DAMP", "EVAL_BUDGET_SECONDS", "MATRIX_CLIP_SIGMAS",
                    "MLP_CLIP_SIGMAS", "ATTN_CLIP_SIGMAS", "EMBED_CLIP_SIGMAS", "TTT_LORA_ALPHA")


def parse_setting(name: str, raw: str, like):
    """`raw` as the type of `like`: 0 or 1 for a switch, comma-separated integers for a tuple."""
    if isinstance(like, bool):
        if raw not in ("0", "1"):
            raise ConfigError(f"{name}={raw!r} is not allowed: use 0 or 1")
        return raw == "1"
    kind = {tuple: "comma-separated integers, e.g. 9,10", int: "an integer", float: "a number"}.get(type(like))
    try:
        if isinstance(like, tuple):
            return tuple(int(part) for part in raw.split(",") if part.strip())
        return type(like)(raw) if kind else raw
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not allowed: use {kind}") from None


FOREIGN_SETTINGS = {
    "PHASED_TTT_ENABLED": "PHASED_TTT_NUM_PHASES (0: off)", "TTT_EVAL_SEQ_LEN": "EVAL_SEQ_LEN",
    "TTT_GRAD_STEPS": "none: one step per chunk", "TTT_K_LORA": "none: every matrix is adapted",
    "TTT_O_LORA": "none: every matrix is adapted", "TTT_MLP_LORA": "none: every matrix is adapted",
    "GLOBAL_TTT_WARMUP_CHUNKS": "none: no warm-up", "GLOBAL_TTT_WARMUP_START_LR": "none: no warm-up",
    "GLOBAL_TTT_RESPECT_DOC_BOUNDARIES": "none: global SGD trains on the stream's sequences",
    "TTT_GRAD_CLIP": "GLOBAL_TTT_GRAD_CLIP", "USE_POLYAK": "none (no Polyak average)", "POLYAK_DECAY": "none",
    "TTT_ONLY": "EVAL_ARTIFACT", "EVAL_ONLY": "EVAL_ARTIFACT", "SLIDING_WINDOW_ENABLED": "EVAL_STRIDE",
    "SKIP_SLIDING": "TTT_ENABLED=0 (the stream's sliding window is the score)", "SKIP_SLIDING_EVAL": "TTT_ENABLED",
    "EMA_ENABLED": "EMA_DECAY (0: off)", "SWA_ENABLED": "EMA_DECAY", "SWA_EVERY": "EMA_DECAY",
    "LAWA_ENABLED": "EMA_DECAY", "VAL_BATCH_TOKENS": "VAL_BATCH_SIZE", "WARMDOWN_FRAC": "WARMDOWN_ITERS",
    "DATA_DIR": "DATA_PATH and TOKENIZER_PATH", "PRUNE_PCT": "PRUNE_FRACTION", "GPTQ_CALIB_BATCHES": "GPTQ_CALIB_SEQS",
    "GPTQ_CALIBRATION_BATCHES": "GPTQ_CALIB_SEQS", "USE_GPTQ": "GPTQ",
    "QAT_ENABLED": "CROWN_Q_LAMBDA", "LATE_QAT": "CROWN_Q_LAMBDA", "LATE_QAT_THRESHOLD": "CROWN_Q_LAMBDA",
    "USE_NGRAM_CACHE": "USE_MIXER", "NGRAM_ENABLED": "USE_MIXER", "USE_HEDGE_MIXER": "USE_MIXER=hedge",
    "NGRAM_EVAL_ORDER": "NGRAM_MAX_ORDER", "TARGET_MB": "TARGET_BYTES",
}
FULL_WEIGHT_TTT = "the full-weight TTT is gone: use TTT_ENABLED (per-document LoRA) and GLOBAL_TTT_*"
RENAMED_SETTINGS = {"COMPILE_WARMUP_STEPS": "use WARMUP_STEPS", "TTT_POLYAK": "TTT scores the weights it adapted",
                    **dict.fromkeys(("TTT_EPOCHS", "TTT_LR", "TTT_MOMENTUM", "TTT_CHUNK_TOKENS", "TTT_FREEZE_BLOCKS",
                                     "TTT_BATCH_SEQS", "TTT_PROJ_LR_MULT", "TTT_IN_LR_MULT"), FULL_WEIGHT_TTT),
                    "GPTQ_CALIB": "GPTQ's calibration is self-generated", "QUANT_MLP_BITS": "use MATRIX_BITS",
                    "QUANT_ATTN_BITS": "use MATRIX_BITS", "QUANT_EMBED_BITS": "use EMBED_BITS",
                    "TRAIN_RESERVE_SECONDS": "use GPTQ_RESERVE_SECONDS"}
SETTING_NAME = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+")


def unknown_setting_warnings(env: Mapping[str, str], cfg: Hyperparameters | None = None) -> list[str]:
    """A warning for each variable of `env` like a setting but not ours, and for WARMUP_STEPS with COMPILE=0."""
    known = [field.name.upper() for field in dataclasses.fields(Hyperparameters)]
    lines = []
    if cfg is not None and "WARMUP_STEPS" in env and not cfg.compile:
        lines.append("warning: WARMUP_STEPS primes the compiled graphs before the clock (as upstream) and does "
                     "nothing with COMPILE=0; the learning-rate warm-up is LR_WARMUP_STEPS")
    for name in sorted(name for name in env if name not in known and SETTING_NAME.fullmatch(name)):
        if name in RENAMED_SETTINGS:
            lines.append(f"warning: {name} is no longer a setting and changes nothing; {RENAMED_SETTINGS[name]}")
        elif name in FOREIGN_SETTINGS:
            lines.append(f"warning: {name} is a setting of other parameter-golf scripts, not of this one, and "
                         f"changes nothing here; use instead: {FOREIGN_SETTINGS[name]}")
        elif close := difflib.get_close_matches(name, known, n=1, cutoff=0.85):
            lines.append(f"warning: {name} is not a setting and changes nothing; did you mean {close[0]}?")
    return lines


def hyperparameters_from_env(env: Mapping[str, str], cuda: bool) -> Hyperparameters:
    """The run's settings, with the paths checked: a missing path stops the run here."""
    hp = Hyperparameters.from_env(env, cuda)
    if not Path(hp.data_path).is_dir():
        raise ConfigError(f"DATA_PATH={hp.data_path!r} is not a directory: {HOW_TO_GET_DATA}")
    if not Path(hp.tokenizer_path).is_file():
        raise ConfigError(f"TOKENIZER_PATH={hp.tokenizer_path!r} is not a file: it is written next to the data by "
                          "data/cached_challenge_fineweb.py or scripts/make_sample_data.py")
    return hp


# =============================================================================
# DATA
# =============================================================================
# A shard is 256 little-endian int32 (magic, version, token count, zeros), then that many little-endian uint16
# token ids: the published FineWeb shards' format, kept so that their files and tools work unchanged.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
HOW_TO_GET_DATA = ("download FineWeb with `python3 data/cached_challenge_fineweb.py --variant sp<VOCAB_SIZE> "
                   "--train-shards N`, or build the sample corpus with `python3 scripts/make_sample_data.py`")
CASEOPS_SUFFIX = "_lossless_caps_caseops_v1_reserved"  # the published CaseOps export's name (#1729)


class ShardError(ValueError):
    """A shard file that is not in the FineWeb format; the message names the file."""


def shard_token_count(path: str | Path) -> int:
    """The number of tokens the header of `path` declares, after checking the header and the file size."""
    path = Path(path)
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: magic number {header[0]} is not {SHARD_MAGIC}; not a FineWeb shard")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: shard version {header[1]} is not supported; only version {SHARD_VERSION} is")
    count = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise ShardError(f"{path}: header declares {count} tokens ({expected} bytes) but the file has {size} bytes")
    return count


def load_shard(path: str | Path, vocab_size: int) -> np.ndarray:
    """All token ids of one shard as uint16, refusing ids outside the vocabulary."""
    count = shard_token_count(path)
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=SHARD_HEADER_BYTES)
    if count and int(tokens.max()) >= vocab_size:
        where = int(np.argmax(tokens >= vocab_size))
        raise ShardError(f"{path}: token id {int(tokens[where])} at position {where} is not below "
                         f"VOCAB_SIZE={vocab_size}, the tokenizer's piece count: shards and tokenizer are of "
                         "different vocabularies")
    return tokens.astype(np.uint16, copy=False)


def shard_files(data_path: str | Path, split: str, required: bool = True) -> list[str]:
    """Sorted `fineweb_{split}_<digits>.bin` files under data_path (a `*` would take a val sidecar for tokens);
    none, when required, is an error that says how to get data."""
    name = re.compile(rf"fineweb_{split}_\d+\.bin")
    files = sorted(str(p) for p in Path(data_path).glob(f"fineweb_{split}_*.bin") if name.fullmatch(p.name))
    if required and not files:
        raise ShardError(f"DATA_PATH={str(data_path)!r} has no fineweb_{split}_*.bin shards: {HOW_TO_GET_DATA}")
    return files


def load_validation_tokens(data_path: str | Path, vocab_size: int) -> torch.Tensor:
    """The whole validation split (every fineweb_val_<digits> file, in name order) as one int64 tensor."""
    parts = [load_shard(f, vocab_size) for f in shard_files(data_path, "val")]
    tokens = torch.from_numpy(np.concatenate(parts).astype(np.int64))
    if tokens.numel() < 2:
        raise ShardError(f"DATA_PATH={str(data_path)!r}: the validation split has {tokens.numel()} tokens; "
                         "at least 2 are needed to score one")
    return tokens


def validation_byte_sidecar(data_path: str | Path, val_tokens: torch.Tensor, caseops: bool) -> torch.Tensor | None:
    """CaseOps' bytes of the original text per validation token (int32, 0 for BOS), from a fineweb_val_bytes_N.bin
    beside each fineweb_val_N.bin (the records' layout), checked against the split; None without CASEOPS_ENABLED."""
    where, sidecars = f"DATA_PATH={str(data_path)!r}", shard_files(data_path, "val_bytes", required=False)
    if bool(sidecars) != caseops:
        raise ConfigError(f"CASEOPS_ENABLED={int(caseops)} is not allowed with {where}: " + (
            "it has no fineweb_val_bytes_*.bin byte sidecar to charge the original text's bytes on; use CaseOps data "
            "or CASEOPS_ENABLED=0" if caseops else "its byte sidecars (fineweb_val_bytes_*.bin) say its tokens are "
            "not the text's bytes one to one; set CASEOPS_ENABLED=1 to charge bits per byte on them"))
    if not caseops:
        return None
    shards = shard_files(data_path, "val")
    if [Path(f).name for f in sidecars] != [Path(f).name.replace("val_", "val_bytes_") for f in shards]:
        raise ShardError(f"{where}: byte sidecars {[Path(f).name for f in sidecars]} do not pair with validation "
                         f"shards {[Path(f).name for f in shards]}: one fineweb_val_bytes_N.bin per fineweb_val_N.bin")
    for sidecar, shard in zip(sidecars, shards):
        if shard_token_count(sidecar) != shard_token_count(shard):
            raise ShardError(f"{sidecar}: {shard_token_count(sidecar)} byte counts, but {Path(shard).name} has "
                             f"{shard_token_count(shard)} tokens: a sidecar has one count per token of its shard")
    counts = torch.from_numpy(np.concatenate([load_shard(f, 1 << 16) for f in sidecars]).astype(np.int32))
    at_bos = (val_tokens == BOS_ID).nonzero().squeeze(1)
    if int(val_tokens[0]) != BOS_ID or counts[at_bos].any():  # a split without BOS broke one record's scoring (#1779)
        raise ShardError(f"{where}: every CaseOps validation document must start with BOS (id {BOS_ID}, 0 bytes in "
                         f"the sidecar); the split starts with id {int(val_tokens[0])} and the sidecar gives "
                         f"{int(counts[at_bos].sum())} bytes to BOS tokens")
    return counts


class TokenStream:
    """An endless stream over the training shards, each pass in a new order drawn from the seed."""
    def __init__(self, files: Sequence[str], vocab_size: int, seed: int):
        self.files, self.vocab_size = list(files), vocab_size
        self.rng = np.random.default_rng(seed)
        self.offsets = np.cumsum([0] + [shard_token_count(f) for f in self.files])
        self.order: list[int] = []
        self.tokens = np.zeros(0, dtype=np.uint16)
        self.shard = self.pos = 0

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n tokens and their positions in the shards read in name order (where the oracle's text is)."""
        parts, places, left = [], [], n
        while left > 0:
            if self.pos >= self.tokens.size:
                if not self.order:
                    self.order = list(self.rng.permutation(len(self.files)))
                self.shard = self.order.pop(0)
                self.tokens, self.pos = load_shard(self.files[self.shard], self.vocab_size), 0
            piece = self.tokens[self.pos:self.pos + left]
            parts.append(piece)
            places.append(self.offsets[self.shard] + self.pos + np.arange(piece.size, dtype=np.int64))
            self.pos += piece.size
            left -= piece.size
        return np.concatenate(parts), np.concatenate(places)


def oracle_run_lengths(places: np.ndarray, oracle_tokens: int) -> np.ndarray:
    """For each token, how many tokens up to it (inclusive) are consecutive in the oracle's text (the
    first `oracle_tokens` tokens in name order): an n-gram ending here was counted iff this is >= n."""
    inside = places < oracle_tokens
    chained = np.zeros(places.size, dtype=bool)
    chained[1:] = inside[1:] & inside[:-1] & (np.diff(places) == 1)
    index = np.arange(places.size)
    run_start = np.maximum.accumulate(np.where(chained, 0, index))
    return np.where(inside, index - run_start + 1, 0)


@dataclass
class Batch:
    inputs: torch.Tensor             # (B, T) int64
    targets: torch.Tensor            # (B, T) int64
    oracle_run: torch.Tensor | None  # (B, T) int64: oracle_run_lengths at each target, when an oracle is on


class DistributedBatchLoader:
    """Every rank reads the same stream: a step's TRAIN_BATCH_TOKENS + 1 tokens cut into WORLD_SIZE x accum pieces
    (one token of overlap each), rank r's micro-step m taking piece r * accum + m: the same sequences on 1 GPU or 8."""
    def __init__(self, files: Sequence[str], vocab_size: int, seed: int, rank: int, world_size: int,
                 oracle_tokens: int = 0):
        self.stream = TokenStream(files, vocab_size, seed)
        self.rank, self.world_size, self.oracle_tokens = rank, world_size, oracle_tokens

    def step_batches(self, batch_tokens: int, accum: int, seq_len: int, device: torch.device) -> list[Batch]:
        """This rank's `accum` micro-batches of the next step, each (rows, seq_len)."""
        chunk, places = self.stream.take(batch_tokens + 1)
        piece = batch_tokens // (self.world_size * accum)
        batches = []
        for m in range(accum):
            mine = slice((self.rank * accum + m) * piece, (self.rank * accum + m + 1) * piece + 1)
            local = to_device_async(torch.from_numpy(chunk[mine].astype(np.int64)), device)
            runs = oracle_run_lengths(places[mine], self.oracle_tokens) if self.oracle_tokens else None
            run = None if runs is None else to_device_async(torch.from_numpy(runs), device)[1:].view(-1, seq_len)
            batches.append(Batch(local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len), run))
        return batches


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy on `device` that does not block the host (a CUDA copy from pageable memory would: pin first)."""
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


# =============================================================================
# BITS PER BYTE
# =============================================================================
# val_bpb = sum(-ln q_t(x_t)) / (ln 2 * UTF-8 bytes of the scored tokens). A token's bytes are its piece's bytes
# without the leading-space marker, plus one for that space unless the previous token is a boundary (control or
# unknown) token, after which the decoder drops it. Byte-fallback pieces are one byte.


@dataclass(frozen=True)
class TokenByteTables:
    base_bytes: torch.Tensor          # (V,) int64: bytes of the piece, leading marker excluded
    has_leading_space: torch.Tensor   # (V,) bool: the piece starts with the marker
    is_boundary: torch.Tensor         # (V,) bool: control/unknown: no text, and no space after it
    sidecar: torch.Tensor | None = None  # (N,) int32 per validation position: CaseOps' bytes, used instead

    def to(self, device: torch.device) -> "TokenByteTables":
        return TokenByteTables(*(None if t is None else t.to(device) for t in dataclasses.astuple(self)))


def token_byte_tables(sp, vocab_size: int) -> TokenByteTables:
    """Byte tables for a SentencePiece processor of exactly vocab_size pieces (a larger model vocabulary would
    only hold ids no shard uses: the records refuse it too)."""
    if sp.vocab_size() != vocab_size:
        raise ConfigError(f"VOCAB_SIZE={vocab_size} is not allowed: the tokenizer has {sp.vocab_size()} pieces; "
                          "VOCAB_SIZE must equal that (TOKENIZER_PATH and DATA_PATH follow VOCAB_SIZE when unset)")
    base = torch.zeros(vocab_size, dtype=torch.int64)
    space = torch.zeros(vocab_size, dtype=torch.bool)
    boundary = torch.ones(vocab_size, dtype=torch.bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        piece = sp.id_to_piece(i)
        space[i] = not sp.is_byte(i) and piece.startswith("\u2581")
        # an inner marker (runs of spaces) is a space
        base[i] = 1 if sp.is_byte(i) else len(piece.removeprefix("\u2581").replace("\u2581", " ").encode("utf-8"))
    return TokenByteTables(base, space, boundary)


def target_byte_counts(prev_tokens: torch.Tensor, tokens: torch.Tensor, tables: TokenByteTables,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
    """UTF-8 bytes of each token of `tokens`, given the token before each and, for a sidecar, its position in the
    validation stream (same shape, int64)."""
    if tables.sidecar is not None:
        return tables.sidecar[positions].long()
    extra_space = tables.has_leading_space[tokens] & ~tables.is_boundary[prev_tokens]
    return tables.base_bytes[tokens] + extra_space.to(torch.int64)


def load_tokenizer(path: str):
    import sentencepiece as spm  # imported here so that the model code imports without it
    return spm.SentencePieceProcessor(model_file=path)


def validation_split(cfg: Hyperparameters) -> tuple[torch.Tensor, TokenByteTables]:
    """(validation tokens, the byte tables that score them), every check at start: tokenizer against VOCAB_SIZE,
    ids against the tokenizer, the CaseOps sidecar against its shards."""
    tables = token_byte_tables(load_tokenizer(cfg.tokenizer_path), cfg.vocab_size)
    val_tokens = load_validation_tokens(cfg.data_path, cfg.vocab_size)
    sidecar = validation_byte_sidecar(cfg.data_path, val_tokens, cfg.caseops_enabled)
    return val_tokens, dataclasses.replace(tables, sidecar=sidecar)


# =============================================================================
# MODEL
# =============================================================================
GATE_WIDTH = 12  # the smear and attention output gates read this many channels of their input (#1667)
BOS_ID = 1  # the tokenizer's document start: the smear gate never carries a token across it (#1851)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    # fp32 inside and x's dtype out on every device: CUDA's autocast would return fp32, the CPU's bf16.
    return F.rms_norm(x.float(), (x.size(-1),)).to(x.dtype)


class Rotary(nn.Module):
    """Partial RoPE: rotary embedding on the first `dims` channels of each head (record stacks: 16 of 64)."""
    def __init__(self, head_dim: int, dims: int, base: float):
        super().__init__()
        self.dims = dims or head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, self.dims, 2, dtype=torch.float32) / self.dims))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        # x: (B, H, T, hd) at positions offset .. offset + T - 1; no table cache: it would break torch.compile
        freqs = torch.outer(torch.arange(offset + x.size(2), device=x.device, dtype=torch.float32), self.inv_freq)
        cos, sin = freqs.cos()[offset:].to(x.dtype), freqs.sin()[offset:].to(x.dtype)
        (x1, x2), rest = x[..., :self.dims].chunk(2, dim=-1), x[..., self.dims:]
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return torch.cat((rotated, rest), dim=-1) if rest.size(-1) else rotated


def low_rank_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """x (B, T, in) through row b's adapter: x A_b^T B_b^T scale, with A (B, r, in) and B (B, out, r)."""
    return (x @ a.transpose(1, 2)) @ b.transpose(1, 2) * scale


class Linear(nn.Linear):
    """nn.Linear, plus TTT's per-document low-rank delta while `adapter` (A, B, scale) is set (DocAdapters)."""
    adapter = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.adapter is None else y + low_rank_delta(x, *self.adapter)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Hyperparameters, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = Linear(cfg.model_dim, cfg.model_dim, bias=False)
        self.c_k = Linear(cfg.model_dim, kv_dim, bias=False)
        self.c_v = Linear(cfg.model_dim, kv_dim, bias=False)
        self.proj = Linear(cfg.model_dim, cfg.model_dim, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.q_gain = nn.Parameter(torch.full((self.num_heads,), cfg.qk_gain_init))
        self.rotary = Rotary(self.head_dim, cfg.rope_dims, cfg.rope_base)
        self.xsa = layer >= cfg.num_layers - cfg.xsa_last_n
        self.mixes_first_value = cfg.value_residual and layer > int(cfg.disable_layer0_attn)
        if self.mixes_first_value:  # ResFormer: v = a * v + b * v_first, starting as the plain v
            self.value_mix = nn.Parameter(torch.tensor([1.0, 0.0]))
        if cfg.gate_attn_out:  # y_h x 2 sigmoid(W x[:GATE_WIDTH]): 1 at init (W = 0)
            self.out_gate = Linear(min(GATE_WIDTH, cfg.model_dim), cfg.num_heads, bias=False)
            nn.init.zeros_(self.out_gate.weight)

    def forward(self, x: torch.Tensor, value_embed: torch.Tensor | None, first_value: torch.Tensor | None,
                cache: DecodeCache | None = None, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, this layer's value before mixing) for x: (B, T, D); with `cache`, x continues its positions
        and its keys and values go to the cache's `slot` (the layer's place in the order it runs in)."""
        B, T, D = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)       # (B, H, T, hd)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)    # (B, Hkv, T, hd)
        v = self.c_v(x) if value_embed is None else self.c_v(x) + value_embed
        v = raw_v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)      # (B, Hkv, T, hd)
        if self.mixes_first_value and first_value is not None:
            v = self.value_mix[0] * v + self.value_mix[1] * first_value
        offset = 0 if cache is None else cache.length
        q, k = self.rotary(rms_norm(q), offset), self.rotary(rms_norm(k), offset)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        k_all, v_all = (k, v) if cache is None else cache.store(slot, k, v)
        mask = None if cache is None else torch.ones(T, offset + T, dtype=torch.bool, device=x.device).tril(offset)
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.num_kv_heads != self.num_heads)  # (B, H, T, hd)
        if self.xsa:  # XSA: drop the component along the token's own value, which rides the residual
            y = y.view(B, self.num_kv_heads, self.num_heads // self.num_kv_heads, T, self.head_dim)
            v_unit = F.normalize(v.float(), dim=-1).unsqueeze(2)  # (B, Hkv, 1, T, hd): fp32 on every device
            y = (y - (y * v_unit).sum(-1, keepdim=True) * v_unit).view(B, self.num_heads, T, self.head_dim)
        if hasattr(self, "out_gate"):
            y = y * (2 * torch.sigmoid(self.out_gate(x[..., :self.out_gate.in_features]))).transpose(1, 2)[..., None]
        return self.proj(y.transpose(1, 2).reshape(B, T, D)), raw_v


class MLP(nn.Module):
    def __init__(self, cfg: Hyperparameters):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = Linear(cfg.model_dim, hidden, bias=False)
        self.proj = Linear(hidden, cfg.model_dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.fc(x), 0.5)  # LeakyReLU(0.5)^2: a gradient for x < 0 (records: ~0.003 bpb)
        return self.proj(h * h)  # h * h: CUDA autocast's pow would copy to fp32


class Block(nn.Module):
    """Attention then MLP on one residual stream; or, from PARALLEL_START_LAYER, side by side on two lanes."""
    def __init__(self, cfg: Hyperparameters, layer: int):
        super().__init__()
        self.attn = None if cfg.disable_layer0_attn and layer == 0 else CausalSelfAttention(cfg, layer)
        self.mlp = MLP(cfg)
        self.attn_scale = None if self.attn is None else nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.norm_scale = 1 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0  # deeper layers' inputs scaled down
        self.parallel = cfg.parallel_residual and layer >= cfg.parallel_start_layer
        if self.parallel:  # lane_weights[i]: each lane's carry, then what attention and the MLP write into lane i
            self.lane_weights = nn.Parameter(torch.ones(2, 3))

    def forward(self, x, value_embed, first_value, cache=None, slot=0):
        """x: (B, T, D), or (2, B, T, D) in a parallel block: attention reads lane 0, the MLP lane 1."""
        attn_in, attn_out, raw_v = x[0] if self.parallel else x, 0.0, None
        if self.attn is not None:
            attn_out, raw_v = self.attn(rms_norm(attn_in) * self.norm_scale, value_embed, first_value, cache, slot)
            attn_out = self.attn_scale.to(x.dtype) * attn_out
        if not self.parallel:
            x = x + attn_out
            return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.norm_scale), raw_v
        mlp_out = self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x[1]) * self.norm_scale)
        w = self.lane_weights.to(x.dtype)[:, :, None, None, None]  # (2, 3, 1, 1, 1)
        return w[:, 0] * x + w[:, 1] * attn_out + w[:, 2] * mlp_out, raw_v


class BigramHashEmbedding(nn.Module):
    """Embedding of the hashed (previous, current) token pair: cheap local context (records: 6144 x 128)."""
    def __init__(self, cfg: Hyperparameters):
        super().__init__()
        self.buckets = cfg.bigram_vocab_size
        self.embed = nn.Embedding(cfg.bigram_vocab_size, cfg.bigram_dim)
        nn.init.zeros_(self.embed.weight)
        self.proj = Linear(cfg.bigram_dim, cfg.model_dim, bias=False)

    def forward(self, tokens: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> (B, T, D); `previous` (B, 1): the token before tokens[:, 0] (none: the last bucket)."""
        stream = tokens if previous is None else torch.cat((previous, tokens), dim=1)
        prev, cur = stream[:, :-1].to(torch.int64), stream[:, 1:].to(torch.int64)
        bucket = torch.bitwise_xor(prev * 36313, cur * 27191) % (self.buckets - 1)
        if previous is None:
            bucket = torch.cat((torch.full_like(tokens[:, :1], self.buckets - 1, dtype=torch.int64), bucket), dim=1)
        return self.proj(self.embed(bucket))


class DecodeCache:
    """Each layer's keys and values of the positions run so far: forward_hidden then runs new positions only."""
    def __init__(self, capacity: int):
        self.capacity, self.length, self.last_tokens = capacity, 0, None
        self.keys, self.values = {}, {}

    def store(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every key and value of `slot` so far, (B, Hkv, length + T, hd), the new ones (B, Hkv, T, hd) included."""
        if slot not in self.keys:  # buffers of the whole capacity: no copy of the past per token
            self.keys[slot] = k.new_empty(*k.shape[:2], self.capacity, k.size(3))
            self.values[slot] = v.new_empty(*v.shape[:2], self.capacity, v.size(3))
        end = self.length + k.size(2)  # past the capacity, the copies below fail
        self.keys[slot][:, :, self.length:end] = k
        self.values[slot][:, :, self.length:end] = v
        return self.keys[slot][:, :, :end], self.values[slot][:, :, :end]


class GPT(nn.Module):
    """The one model class: training, evaluation and quantization all use it."""
    head_adapter = None  # as Linear.adapter, on the output head
    def __init__(self, cfg: Hyperparameters):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=0.005 if cfg.tie_embeddings else 1.0)
        self.bigram = BigramHashEmbedding(cfg) if cfg.bigram_vocab_size else None
        self.ve_layers = tuple(cfg.ve_layers) if cfg.ve_enabled else ()
        if self.ve_layers:  # one table shared by the VE layers, each with its own scale
            self.value_embed = nn.Embedding(cfg.vocab_size, cfg.ve_dim)
            nn.init.normal_(self.value_embed.weight, std=0.01)
            self.value_embed_proj = Linear(cfg.ve_dim, cfg.model_dim // cfg.num_heads * cfg.num_kv_heads, bias=False)
            self.value_embed_scales = nn.Parameter(torch.ones(len(self.ve_layers)))
        if cfg.smear_gate:  # x_t + lambda sigmoid(W x_t[:GATE_WIDTH]) x_(t-1): the identity at init (lambda = W = 0)
            self.smear_gate = Linear(min(GATE_WIDTH, cfg.model_dim), 1, bias=False)
            nn.init.zeros_(self.smear_gate.weight)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.looping = cfg.num_loops > 0  # training turns it off until ENABLE_LOOPING_AT; evaluation runs looped
        self.num_skips = len(self.layer_order()) // 2 if cfg.unet_skips else 0  # pairs of the longer order
        if self.num_skips:
            self.skip_weights = nn.Parameter(torch.ones(self.num_skips, cfg.model_dim))
            if cfg.skip_gates_enabled:  # a skip's share sigmoid(g), 1/2 at init
                self.skip_gates = nn.Parameter(torch.zeros(self.num_skips, cfg.model_dim))
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.model_dim, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)
        self.mixer_head = None
        if cfg.use_mixer == "learned":  # weights over [neural, orders]; trusts the neural model first (bias 2 vs 0)
            self.mixer_head = nn.Linear(cfg.model_dim, 1 + len(cfg.ngram_orders))  # not adapted: TTT's loss is the CE
            nn.init.zeros_(self.mixer_head.weight)
            with torch.no_grad():
                self.mixer_head.bias.zero_()[0] = 2.0

    def layer_order(self) -> list[int]:
        """The blocks in the order they run: LOOP_START..LOOP_END NUM_LOOPS more times while `looping`."""
        cfg, layers = self.cfg, list(range(self.cfg.num_layers))
        loops = cfg.num_loops if self.looping else 0
        return layers[:cfg.loop_end + 1] + layers[cfg.loop_start:cfg.loop_end + 1] * loops + layers[cfg.loop_end + 1:]

    def smeared(self, x: torch.Tensor, tokens: torch.Tensor, cache: DecodeCache | None) -> torch.Tensor:
        """The smear gate on embeddings x (B, T, D); with `cache`, position 0 takes the cached last token's."""
        first = torch.zeros_like(x[:, :1]) if cache is None or cache.last_tokens is None else self.tok_emb(
            cache.last_tokens)
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :self.smear_gate.in_features]))
        return x + gate.masked_fill((tokens == BOS_ID)[..., None], 0.0) * torch.cat((first, x[:, :-1]), dim=1)

    def forward_hidden(self, tokens: torch.Tensor, cache: DecodeCache | None = None) -> torch.Tensor:
        """Final normalized hidden state (B, T, D) of tokens (B, T), causal; with `cache`, continuing its positions."""
        x = self.smeared(self.tok_emb(tokens), tokens, cache) if self.cfg.smear_gate else self.tok_emb(tokens)
        if self.bigram is not None:
            x = x + self.bigram(tokens, None if cache is None else cache.last_tokens)
        x = rms_norm(x)
        embed = self.value_embed_proj(self.value_embed(tokens)) if self.ve_layers else None
        value_embeds = {layer: self.value_embed_scales[i].to(x.dtype) * embed for i, layer in enumerate(self.ve_layers)}
        order, skips, first_value = self.layer_order(), [], None
        num_skips = len(order) // 2 if self.num_skips else 0
        for slot, i in enumerate(order):
            if slot >= len(order) - num_skips:  # U-Net: the first half's outputs, mirrored, into (lane 0 of) x
                pair = len(order) - 1 - slot
                skip, lane = self.skip_weights[pair].to(x.dtype) * skips.pop(), x[0] if x.dim() == 4 else x
                lane = lane + skip if not hasattr(self, "skip_gates") else torch.lerp(
                    skip, lane, torch.sigmoid(self.skip_gates[pair]).to(x.dtype))
                x = torch.stack((lane, x[1])) if x.dim() == 4 else lane
            if self.blocks[i].parallel and x.dim() == 3:
                x = torch.stack((x, x))  # the lanes part
            x, raw_v = self.blocks[i](x, value_embeds.get(i), first_value, cache, slot)
            first_value = raw_v if first_value is None else first_value
            if slot < num_skips:
                skips.append(x[0] if x.dim() == 4 else x)
        if cache is not None:
            cache.length += tokens.size(1)
            cache.last_tokens = tokens[:, -1:]
        return rms_norm(x.mean(0) if x.dim() == 4 else x)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight.to(hidden.dtype))
        if self.head_adapter is not None:  # the tied head's matrix is the embedding: adapted here, not as a Linear
            logits = logits + low_rank_delta(hidden, *self.head_adapter)
        logits = logits.float()
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def token_nll(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """-ln q(target), (B, T) float32, at every position of tokens (B, T)."""
        logits = self.logits_from_hidden(self.forward_hidden(tokens))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)

    def eval_outputs(self, tokens: torch.Tensor,
                     positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probabilities (B, S, V) float64, mixer logits (B, S, 1+K) or None) at `positions`, or everywhere. The
        softmax of the float32 logits is taken in float64: in float32 its sum is off by up to 1.6e-6 at V = 8,192."""
        hidden = self.forward_hidden(tokens)
        if positions is not None:  # (B, S): the head need not run where nothing is scored
            hidden = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.size(-1)))
        logprobs = torch.log_softmax(self.logits_from_hidden(hidden).double(), -1)
        return logprobs, None if self.mixer_head is None else self.mixer_head(hidden).float()

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, expert_probs: torch.Tensor | None = None,
                expert_valid: torch.Tensor | None = None, expert_prior: torch.Tensor | None = None,
                penalty_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss: mean cross-entropy (-100 targets: padding), + MIXER_LOSS_WEIGHT x the mixture's loss on
        the oracle's (B, T, K) experts, + penalty_scale (0-dim, 0 outside the warm-down) x CROWN-Q's penalty."""
        hidden = self.forward_hidden(tokens)
        logits = self.logits_from_hidden(hidden)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        loss = nll.mean()
        if expert_probs is not None and self.mixer_head is not None:
            weights = mixer_weights(self.mixer_head(hidden), expert_valid)
            mixed = mixture_nll(-nll, weights, expert_probs, expert_prior)  # p_nn not detached: q_t's own gradient
            loss = loss + self.cfg.mixer_loss_weight * mixed.mean()
        if penalty_scale is not None:
            loss = loss + penalty_scale * crown_q_penalty(self, self.cfg)
        return loss


# =============================================================================
# N-GRAM EXPERTS AND MIXER
# =============================================================================
# An order-n expert c(ctx, v) / T(ctx), T(ctx) the exact sum of its row, or NGRAM_PRIOR_BETA's (c + beta p_nn(v)) /
# (T + beta), is normalized by construction (../shared/LEGALITY.md, rule 2). A context is an exact int64 key when
# it fits in 62 bits (orders up to 7 at vocabulary 1,024, up to 5 at 8,192), else hashed: colliding contexts merge.

NEURAL_WEIGHT_FLOOR = 1e-6  # the least weight the mixer leaves the neural model (see mixer_weights)


def context_keys_from(preceding, like: torch.Tensor, order: int, vocab_size: int) -> torch.Tensor:
    """Context keys (int64, `like`'s shape) from `preceding(k)`, tokens k + 1 back; in place: 400 MB a copy at 50M."""
    keys = torch.zeros(like.shape, dtype=torch.int64, device=like.device)
    exact = (order - 1) * max(1, (vocab_size - 1).bit_length()) <= 62
    for k in range(order - 1):
        older = preceding(k).to(torch.int64)
        if exact:
            keys.mul_(vocab_size).add_(older)
        else:  # multiply-xor mixing; int64 products wrap, which is all a hash needs
            keys.mul_(0x100000001B3).bitwise_xor_(older + 0x9E3779B97F4A7C15 % (1 << 62))
    return keys.bitwise_and_((1 << 62) - 1)


def run_starts(sorted_values: torch.Tensor) -> torch.Tensor:
    """Where each run of equal values begins in a sorted tensor (bool)."""
    starts = torch.ones_like(sorted_values, dtype=torch.bool)
    starts[1:] = sorted_values[1:] != sorted_values[:-1]
    return starts


class NgramCounts:
    """One order: sorted context keys with row totals, sorted (row * V + token) pair keys with counts: 12 B an entry."""
    def __init__(self, order: int, vocab_size: int, device: torch.device):
        self.order, self.vocab_size = order, vocab_size
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        self.ctx_keys, self.totals, self.pair_keys, self.pair_counts = empty, empty, empty, empty

    def add_stream(self, tokens: torch.Tensor, start: int, end: int) -> None:
        """Counts each n-gram predicting tokens[t], start <= t < end, once per table; a peak of ~3 int64 copies."""
        if self.ctx_keys.numel():
            raise ValueError(f"order-{self.order} table already counted: count the whole stream in one add_stream")
        start, V = max(start, self.order - 1, 1), self.vocab_size
        if end <= start:
            return
        sorted_keys, by_key = torch.sort(context_keys_from(lambda k: tokens[start - 1 - k:end - 1 - k],
                                                           tokens[start:end], self.order, V))
        new_context = run_starts(sorted_keys)
        ctx_keys = sorted_keys[new_context]
        del sorted_keys
        pairs = torch.cumsum(new_context, 0).sub_(1).mul_(V).add_(tokens[start:end][by_key])
        del new_context, by_key
        pairs = torch.sort(pairs).values
        first = run_starts(pairs).nonzero().squeeze(1)
        pair_keys = pairs[first]
        del pairs
        count_dtype = torch.int32 if tokens.numel() < 2**31 else torch.int64
        pair_counts = torch.diff(first, append=first.new_tensor([end - start])).to(count_dtype)
        self.ctx_keys, self.pair_keys, self.pair_counts = ctx_keys, pair_keys, pair_counts
        self.totals = torch.zeros_like(ctx_keys, dtype=pair_counts.dtype).index_add_(0, pair_keys // V, pair_counts)

    def lookup(self, keys: torch.Tensor, next_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c(ctx, token), T(ctx)) for each key and token; zeros for an unseen context."""
        if self.ctx_keys.numel() == 0:
            return torch.zeros_like(keys), torch.zeros_like(keys)
        rows = torch.searchsorted(self.ctx_keys, keys).clamp_(max=self.ctx_keys.numel() - 1)
        seen = self.ctx_keys[rows] == keys
        pair = rows * self.vocab_size + next_tokens.to(torch.int64)
        at = torch.searchsorted(self.pair_keys, pair).clamp_(max=self.pair_keys.numel() - 1)
        counts = torch.where(seen & (self.pair_keys[at] == pair), self.pair_counts[at].long(), 0)
        return counts, torch.where(seen, self.totals[rows].long(), 0)


class NgramModel:
    """Orders NGRAM_MIN_ORDER..NGRAM_MAX_ORDER over one token stream, counted once (add_stream)."""
    def __init__(self, orders: Sequence[int], vocab_size: int, device: torch.device):
        self.orders, self.vocab_size = tuple(orders), vocab_size
        self.tables = [NgramCounts(n, vocab_size, device) for n in self.orders]
        self.order_tensor = torch.tensor(self.orders, device=device)  # built once, not per training step
        self.counted_tokens = 0

    def add_stream(self, tokens: torch.Tensor, start: int, end: int) -> None:
        """Counts the n-grams predicting tokens[t], start <= t < end (contexts may start earlier), once per model."""
        for table in self.tables:
            table.add_stream(tokens, start, end)

    def target_stats(self, keys: Sequence[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts, totals), each (..., K), of every order for each target given its context keys."""
        stats = [table.lookup(k, targets) for table, k in zip(self.tables, keys)]
        return torch.stack([c for c, _ in stats], -1), torch.stack([t for _, t in stats], -1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for table in self.tables
                   for t in (table.ctx_keys, table.totals, table.pair_keys, table.pair_counts))


def stream_context_keys(model: NgramModel, tokens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per order, the key of the context ending at each position of tokens (..., T); availability (..., T, K)."""
    T = tokens.size(-1)
    keys = [context_keys_from(lambda k: F.pad(tokens[..., :max(T - k, 0)], (min(k, T), 0)), tokens, n,
                              model.vocab_size) for n in model.orders]  # a stream shorter than a context: all padding
    positions = torch.arange(T, device=tokens.device)
    return keys, torch.stack([(positions >= n - 2).expand(tokens.shape) for n in model.orders], -1)


def oracle_tokens_from_shards(files: Sequence[str], vocab_size: int, count: int) -> np.ndarray:
    """The oracle's text: the first `count` training tokens in shard name order, as leave-one-out numbers them."""
    parts = []
    for path in files:
        if count <= 0:
            break
        parts.append(load_shard(path, vocab_size)[:count])
        count -= parts[-1].size
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def ngram_expert_probs(counts: torch.Tensor, totals: torch.Tensor, valid: torch.Tensor,
                       beta: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(c / T, None), or if beta > 0 (c / (T + beta), prior share beta / (T + beta)); (..., K) float64, 0 off valid."""
    if beta == 0:
        return torch.where(valid, counts.double() / totals.clamp(min=1).double(), 0.0), None
    denominator = totals.double() + beta
    return torch.where(valid, counts.double() / denominator, 0.0), torch.where(valid, beta / denominator, 0.0)


def oracle_probs_for_batch(oracle: NgramModel, inputs: torch.Tensor, targets: torch.Tensor, oracle_run: torch.Tensor,
                           beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ngram_expert_probs (B, T, K) of the oracle's counts for the targets, and validity. Leave-one-out: where
    oracle_run (tokens up to the target in the oracle's text) covers the n-gram, its own count goes (unseen text)."""
    keys, available = stream_context_keys(oracle, inputs)
    counts, totals = oracle.target_stats(keys, targets)
    counted = (oracle_run[..., None] >= oracle.order_tensor).to(torch.int64)
    counts, totals = counts - counted, totals - counted
    valid = available & (totals > 0)
    probs, prior = ngram_expert_probs(counts, totals, valid, beta)
    return probs.float(), valid, None if prior is None else prior.float()


def mixer_weights(mixer_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax (..., 1+K) over the neural expert (column 0) and the n-grams whose context (never target) was seen. The
    neural one keeps NEURAL_WEIGHT_FLOOR: float32 rounds it to 0 at a lead of ~104, and q_t would be 0 (rule 2)."""
    mask = torch.cat((torch.ones_like(valid[..., :1]), valid), -1)
    weights = torch.softmax(mixer_logits.float().masked_fill(~mask, float("-inf")), -1)
    floor = F.pad(torch.full_like(weights[..., :1], NEURAL_WEIGHT_FLOOR), (0, weights.size(-1) - 1))
    return weights * (1 - NEURAL_WEIGHT_FLOOR) + floor


def mixture_nll(neural_logprob: torch.Tensor, weights: torch.Tensor, expert_probs: torch.Tensor,
                expert_prior: torch.Tensor | None = None) -> torch.Tensor:
    """-ln(w_0 p_nn(x) + sum_n w_n (p_n(x) + b_n p_nn(x))) of the target x; ln p_nn (...,), p_n, shares b_n (..., K)."""
    expert_terms = weights[..., 1:] * expert_probs
    positive = expert_terms > 0
    log_experts = torch.where(positive, torch.where(positive, expert_terms, 1.0).log(), float("-inf"))  # no NaN grad
    neural_weight = weights[..., 0]  # >= NEURAL_WEIGHT_FLOOR > 0
    if expert_prior is not None:  # p_nn(x) joins the neural term: exact, no exp of a log-probability
        neural_weight = neural_weight + (weights[..., 1:] * expert_prior).sum(-1)
    log_neural = neural_logprob + neural_weight.log()
    return -torch.logsumexp(torch.cat((log_neural[..., None], log_experts.to(log_neural.dtype)), -1), -1)


def hedge_expert_probs(counts: torch.Tensor, totals: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Hedge's experts (c + a) / (T + a V), (..., K) float64: positive, and any rank can compute them from counts."""
    return (counts.double() + HEDGE_ALPHA) / (totals.double() + HEDGE_ALPHA * vocab_size)


# =============================================================================
# OPTIMIZERS
# =============================================================================


def newton_schulz_orthogonalize(g: torch.Tensor, steps: int) -> torch.Tensor:
    """~U V^T for g = U S V^T: quintic Newton-Schulz, modded-nanogpt's coefficients (fast to ~1, not convergent)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()
    transposed = x.size(0) > x.size(1)
    x = x.T if transposed else x
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(g.dtype)


def muon_update(grad: torch.Tensor, buf: torch.Tensor, momentum: torch.Tensor, steps: int,
                row_normalize: bool = False) -> torch.Tensor:
    """One matrix's update: momentum into `buf` in place, the Nesterov direction orthogonalized, RMS kept if tall."""
    buf.mul_(momentum).add_(grad)
    direction = grad + momentum * buf
    if row_normalize:  # MuonEq-R: each row to norm 1 first, so no row dominates the orthogonalization
        direction = direction / direction.float().norm(dim=1, keepdim=True).clamp_min(1e-7).to(direction.dtype)
    return newton_schulz_orthogonalize(direction, steps).float() * max(1.0, grad.size(0) / grad.size(1)) ** 0.5


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalized; decoupled weight decay. Rank r of W orthogonalizes matrices r, r+W, ..."""
    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 rank: int = 0, world_size: int = 1, compile: bool = False, row_normalize: bool = False):
        super().__init__(list(params), dict(lr=lr, base_lr=lr, momentum=momentum, backend_steps=backend_steps,
                                            weight_decay=weight_decay, row_normalize=row_normalize))
        self.rank, self.world_size = rank, world_size
        self.update = torch.compile(muon_update, dynamic=False) if compile else muon_update  # fused, a graph per shape

    @torch.no_grad()
    def compile_shapes(self) -> None:
        """Runs the update once per matrix shape (compiling before the clock), on zeros and throw-away buffers."""
        for group in self.param_groups:
            device = group["params"][0].device
            momentum = torch.tensor(group["momentum"], device=device)
            for shape in sorted({tuple(p.shape) for p in group["params"]}):
                self.update(torch.zeros(shape, device=device), torch.zeros(shape, device=device), momentum,
                            group["backend_steps"], group["row_normalize"])

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            if "flat" not in group:  # one buffer for the all-reduce, and each matrix's view of it, kept
                group["flat"] = flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
                group["updates"] = [u.view_as(p) for u, p in zip(flat.split([p.numel() for p in params]), params)]
                group["momentum_tensor"] = torch.zeros((), device=params[0].device)  # a tensor: no recompiles
            flat, updates, momentum = group["flat"], group["updates"], group["momentum_tensor"]
            flat.zero_()
            momentum.fill_(group["momentum"])  # filled, not new: no host copy
            for i, p in enumerate(params):
                if i % self.world_size == self.rank and p.grad is not None:
                    if "momentum" not in self.state[p]:
                        self.state[p]["momentum"] = torch.zeros_like(p.grad)
                    updates[i].copy_(self.update(p.grad, self.state[p]["momentum"], momentum, group["backend_steps"],
                                                 group["row_normalize"]))
            if self.world_size > 1:  # zeros but for this rank's matrices: the sum gives every rank every update
                dist.all_reduce(flat)
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, updates, alpha=-group["lr"])


def parameter_groups(model: GPT) -> dict[str, list[nn.Parameter]]:
    """Muon takes the 2-D weights of blocks and projections ("matrix"); AdamW embeddings, untied head, vectors."""
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "scalar": [], "embed": [], "head": []}
    for name, p in model.named_parameters():
        embed = name in ("tok_emb.weight", "bigram.embed.weight", "value_embed.weight")
        # not the mixer head, the gates, the skip and lane weights: too small for Muon, or not maps
        matrix = p.ndim == 2 and name.endswith(".weight") and "gate." not in name and not name.startswith("mixer_head.")
        groups["embed" if embed else "head" if name == "lm_head.weight" else "matrix" if matrix else "scalar"].append(p)
    return groups


def build_optimizers(model: GPT, cfg: Hyperparameters, rank: int, world_size: int) -> list[torch.optim.Optimizer]:
    groups = parameter_groups(model)
    embed_lr = cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr
    adam_groups = [dict(params=groups["embed"], lr=embed_lr, base_lr=embed_lr, weight_decay=cfg.embed_wd),
                   dict(params=groups["scalar"], lr=cfg.scalar_lr, base_lr=cfg.scalar_lr)]
    if groups["head"]:
        adam_groups.append(dict(params=groups["head"], lr=cfg.head_lr, base_lr=cfg.head_lr))
    # fused: one kernel for all parameters, and no host sync for the step count (the CPU has it too)
    adam = torch.optim.AdamW(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=1e-8, weight_decay=cfg.adam_wd, fused=True)
    muon = Muon(groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                weight_decay=cfg.muon_wd, rank=rank, world_size=world_size, compile=cfg.compile,
                row_normalize=cfg.muon_row_normalize)
    return [adam, muon]


# =============================================================================
# TRAINING
# =============================================================================


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    bf16: bool = False  # BF16
    local_world_size: int = 1  # processes on this machine (they share its memory)

    is_main = property(lambda self: self.rank == 0)
    distributed = property(lambda self: self.world_size > 1)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def synced_time(self) -> float:
        self.synchronize()
        return time.perf_counter()


class RunLog:
    """Prints on rank 0 and appends to logs/<RUN_ID>.txt; other ranks stay silent."""
    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def __call__(self, line: str) -> None:
        if self.path is not None:
            print(line, flush=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")


def accum_steps(cfg: Hyperparameters, world_size: int) -> int:
    """Micro-steps per optimizer step; automatic keeps the micro-batch the same on 1 and 8 GPUs."""
    return cfg.grad_accum_steps or (8 // world_size if 8 % world_size == 0 else 1)


def eval_batch_tokens(cfg: Hyperparameters, world_size: int) -> int:
    """Tokens of one rank's evaluation batch: VAL_BATCH_SIZE is all ranks' together, as upstream."""
    return cfg.val_batch_size // (world_size * accum_steps(cfg, world_size))


def grad_accum_steps_for(cfg: Hyperparameters, world_size: int) -> int:
    """accum_steps, once TRAIN_BATCH_TOKENS is checked to split evenly into its micro-batches."""
    steps = accum_steps(cfg, world_size)
    unit = world_size * steps * cfg.train_seq_len
    if cfg.train_batch_tokens % unit or cfg.train_batch_tokens < unit:
        raise ConfigError(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} is not allowed: it must be a positive "
                          f"multiple of WORLD_SIZE x GRAD_ACCUM_STEPS x TRAIN_SEQ_LEN = {world_size} x {steps} x "
                          f"{cfg.train_seq_len} = {unit}")
    return steps


def lr_scale(step: int, elapsed_ms: float, stop_ms: float | None, cfg: Hyperparameters) -> float:
    """Linear warm-up, then a linear warm-down to MIN_LR at ITERATIONS or, if sooner, at the wall-clock stop."""
    scale = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else 1.0
    if cfg.warmdown_iters:
        down = (cfg.iterations - step) / cfg.warmdown_iters
        if stop_ms is not None and step > 0:
            down = min(down, max(stop_ms - elapsed_ms, 0.0) / (cfg.warmdown_iters * elapsed_ms / step))
        scale = min(scale, max(down, cfg.min_lr))
    return max(scale, 0.0)


def muon_momentum_at(step: int, cfg: Hyperparameters) -> float:
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


class WeightEMA:
    """An fp32 moving average of the weights (records: 0.997, ~0.002-0.005 bpb); ramp: 200-step demo 2.667 -> 2.314."""
    def __init__(self, model: nn.Module, decay: float, ramp: bool = False):
        self.decay, self.ramp, self.updates = decay, ramp, 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (3 + self.updates)) if self.ramp else self.decay
        self.updates += 1
        torch._foreach_lerp_(list(self.shadow.values()), list(model.parameters()), 1 - decay)  # one fused kernel

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))


def agreed_max(values: Sequence[float], rt: Runtime) -> list[float]:
    """The largest of each value over ranks: a rank stopping on its own clock leaves the others hung in a collective."""
    if not rt.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


CLOCK_READ_EVERY = 10  # steps between clock reads (a host sync and an all-reduce each), extrapolated in between


def compile_count() -> int:
    """Graphs torch.compile has built in this process (one built in a timed phase is time on its clock)."""
    from torch._dynamo.utils import counters
    return counters["frames"]["total"]


def micro_step(train_model: nn.Module, batch: Batch, oracle_lookup, penalty_scale: torch.Tensor | None,
               rt: Runtime, accum_steps: int, sync: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch; its loss, detached. DDP all-reduces only when `sync`."""
    experts = (None, None, None) if oracle_lookup is None else oracle_lookup(batch)
    with train_model.no_sync() if rt.distributed and not sync else contextlib.nullcontext():
        with rt.autocast():
            loss = train_model(batch.inputs, batch.targets, *experts, penalty_scale)
        (loss / accum_steps).backward()
    return loss.detach()


def train_step(train_model: nn.Module, optimizers: list[torch.optim.Optimizer], loader: DistributedBatchLoader,
               cfg: Hyperparameters, rt: Runtime, accum_steps: int, scale: float, momentum: float,
               oracle_lookup=None, penalty_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One optimizer step; this rank's mean loss as a tensor (reading it syncs the host, so only logged steps do)."""
    total = torch.zeros((), device=rt.device)
    batches = loader.step_batches(cfg.train_batch_tokens, accum_steps, cfg.train_seq_len, rt.device)
    for micro, batch in enumerate(batches):
        total += micro_step(train_model, batch, oracle_lookup, penalty_scale, rt, accum_steps, micro == accum_steps - 1)
    total /= accum_steps
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
            if isinstance(opt, Muon):
                group["momentum"] = momentum
    if cfg.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_([p for opt in optimizers for g in opt.param_groups for p in g["params"]],
                                       cfg.grad_clip_norm, foreach=True)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return total


@dataclass
class TrainResult:
    steps: int
    train_time_ms: float
    stopped_early: bool
    recompiles: int = 0  # graphs compiled while the training clock ran


def build_oracle(cfg: Hyperparameters, rt: Runtime, files: Sequence[str]) -> NgramModel:
    """The frozen n-gram oracle over the first NGRAM_ORACLE_TOKENS training tokens; every rank counts the same."""
    tokens = torch.from_numpy(oracle_tokens_from_shards(files, cfg.vocab_size, cfg.ngram_oracle_tokens)
                              .astype(np.int32)).to(rt.device)  # int32: it stays in memory while orders are counted
    oracle = NgramModel(cfg.ngram_orders, cfg.vocab_size, rt.device)
    oracle.add_stream(tokens, 1, tokens.numel())
    oracle.counted_tokens = tokens.numel()
    return oracle


def train(model: GPT, train_model: nn.Module, cfg: Hyperparameters, rt: Runtime, log,
          evaluate_val=None, oracle: NgramModel | None = None) -> TrainResult:
    """Trains to ITERATIONS or the wall-clock stop; counting an oracle is training time, validation is not."""
    accum_steps = grad_accum_steps_for(cfg, rt.world_size)
    files = shard_files(cfg.data_path, "train")
    t0, oracle_lookup = rt.synced_time(), None
    if model.mixer_head is not None and oracle is None:
        oracle = build_oracle(cfg, rt, files)
        log(f"ngram_oracle tokens:{oracle.counted_tokens} orders:{','.join(map(str, oracle.orders))} "
            f"bytes:{oracle.nbytes()} time:{1000 * (rt.synced_time() - t0):.0f}ms")
    if oracle is not None:  # compiled, the lookup's ~230 ops are one graph
        lookup = torch.compile(oracle_probs_for_batch, dynamic=False) if cfg.compile else oracle_probs_for_batch
        oracle_lookup = lambda b: lookup(oracle, b.inputs, b.targets, b.oracle_run, cfg.ngram_prior_beta)
    train_ms = 1000 * (time.perf_counter() - t0)
    penalty_scale = torch.zeros((), device=rt.device) if cfg.crown_q_lambda else None
    optimizers = build_optimizers(model, cfg, rt.rank, rt.world_size)
    for looping in sorted({cfg.num_loops > 0, cfg.num_loops > 0 and not cfg.enable_looping_at}, reverse=True):
        model.looping = looping  # both graphs compiled before the clock; the loop then starts unlooped (or not)
        if cfg.compile and cfg.warmup_steps:
            warm_up_training(train_model, optimizers, cfg, rt, accum_steps, oracle_lookup, penalty_scale, log)
    loader = DistributedBatchLoader(files, cfg.vocab_size, cfg.seed, rt.rank, rt.world_size,
                                    0 if oracle is None else oracle.counted_tokens)
    ema = WeightEMA(model, cfg.ema_decay, ramp=True) if cfg.ema_decay else None
    stop_ms = 1000 * (cfg.max_wallclock_seconds - cfg.gptq_reserve_seconds) if cfg.max_wallclock_seconds else None
    step, stopped_early, reading, start_ms, compiles = 0, False, None, train_ms, compile_count()
    t0 = rt.synced_time()
    while step < cfg.iterations:
        if reading is None or step - reading[0] >= CLOCK_READ_EVERY:
            reading = (step, agreed_max([train_ms + 1000 * (rt.synced_time() - t0)], rt)[0])
        step_ms = (reading[1] - start_ms) / reading[0] if reading[0] else 0.0
        elapsed = reading[1] + (step - reading[0]) * step_ms  # the same on every rank: from agreed readings
        spent = max((step + 1) / cfg.iterations, elapsed / stop_ms if stop_ms else 0.0)
        if not model.looping and cfg.num_loops and spent >= cfg.enable_looping_at:
            model.looping = True
            log(f"looping_enabled step:{step} train_time:{elapsed:.0f}ms "
                f"layer_order:{','.join(map(str, model.layer_order()))}")
        stopped_early = stop_ms is not None and elapsed >= stop_ms
        if stopped_early:
            break
        scale = lr_scale(step, elapsed, stop_ms, cfg)
        warming_down = step >= cfg.lr_warmup_steps and scale < 1.0  # CROWN-Q's window: where the weights settle
        if penalty_scale is not None:
            penalty_scale.fill_(float(warming_down))
        loss = train_step(train_model, optimizers, loader, cfg, rt, accum_steps, scale, muon_momentum_at(step, cfg),
                          oracle_lookup, penalty_scale if cfg.compile or warming_down else None)  # compiled: one graph
        if ema is not None:
            ema.update(model)
        step += 1
        if cfg.train_log_every and (step % cfg.train_log_every == 0 or step <= 10 or step == cfg.iterations):
            now = train_ms + 1000 * (rt.synced_time() - t0)
            eta = (cfg.iterations - step) * (now - start_ms) / step  # at the steps' pace, no oracle prefill
            eta = eta if stop_ms is None else max(0.0, min(eta, stop_ms - now))
            log(f"step:{step}/{cfg.iterations} train_loss:{float(loss):.4f} train_time:{now:.0f}ms "
                f"step_avg:{now / step:.2f}ms eta:{eta:.0f}ms")
        if evaluate_val is not None and cfg.val_loss_every and step % cfg.val_loss_every == 0 and step < cfg.iterations:
            train_ms += 1000 * (rt.synced_time() - t0)
            paused = compile_count()
            val = evaluate_val()
            compiles += compile_count() - paused  # compiled while the clock was stopped
            log(f"step:{step}/{cfg.iterations} val_loss:{val.val_loss:.4f} val_bpb:{val.val_bpb:.4f} "
                f"train_time:{train_ms:.0f}ms step_avg:{train_ms / step:.2f}ms")
            t0, reading = rt.synced_time(), None
    train_ms += 1000 * (rt.synced_time() - t0)
    if stopped_early:
        log(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{cfg.iterations}")
    if ema is not None:
        ema.copy_to(model)
        log(f"ema:applied decay:{cfg.ema_decay}")
    return TrainResult(step, train_ms, stopped_early, compile_count() - compiles)


def warm_up_training(train_model: nn.Module, optimizers: list[torch.optim.Optimizer], cfg: Hyperparameters,
                     rt: Runtime, accum_steps: int, oracle_lookup, penalty_scale: torch.Tensor | None, log) -> None:
    """Compiles the training step before the clock (../shared/CONVENTIONS.md, "What the clocks count") on synthetic
    batches laid out as the loader's. No trace: no optimizer step; data, optimizers, EMA and global RNG untouched."""
    t0, compiles = time.perf_counter(), compile_count()
    generator = torch.Generator().manual_seed(0)
    rows = cfg.train_batch_tokens // (accum_steps * rt.world_size * cfg.train_seq_len)
    steps = max(cfg.warmup_steps, 2 if rt.distributed else 1)  # DDP takes another path from its second step
    for _ in range(steps):
        for micro in range(accum_steps):
            stream = torch.randint(cfg.vocab_size, (rows * cfg.train_seq_len + 1,), generator=generator).to(rt.device)
            run = torch.zeros_like(stream)[1:].view(rows, -1)  # no leave-one-out
            micro_step(train_model, Batch(stream[:-1].view(rows, -1), stream[1:].view(rows, -1), run), oracle_lookup,
                       penalty_scale, rt, accum_steps, micro == accum_steps - 1)
    train_model.zero_grad(set_to_none=True)
    for opt in (opt for opt in optimizers if isinstance(opt, Muon)):
        opt.compile_shapes()
    log(f"compile_warmup phase:train steps:{steps} graphs:{compile_count() - compiles} "
        f"time:{1000 * (rt.synced_time() - t0):.0f}ms")


# =============================================================================
# QUANTIZATION AND PACKING
# =============================================================================
# Each matrix as signed integers, one fp16 step per row (SDClip: k standard deviations of the row / qmax), then
# brotli or zstd. GPTQ (Frantar et al. 2022) rounds column by column, moving each error onto the later columns through
# the inverse Hessian E[x x^T] of the matrix's input (the tied embedding's: the head's input); GPTQ=0 rounds to nearest.
EMBED_TENSOR_NAMES = ("tok_emb.weight", "bigram.embed.weight", "value_embed.weight", "lm_head.weight")
FIT_STEPS = tuple(2 ** (i / 8) for i in range(-6, 9))  # the fitter's step multipliers, finest first: 0.59x to 2x
FIT_PRUNES = (0.02, 0.04, 0.08)  # then, at the coarsest step, the fraction of smallest values zeroed
FIT_TRIES = 6  # GPTQ-and-final-compression tries at most (bisection of the ladder: 5)
# One frame per tensor, compressed in parallel and reused across tries (vs one body: minutes less, 6% smaller).
ARTIFACT_MAGIC, ARTIFACT_VERSION = b"PGQW", 3
ARTIFACT_FRAME = struct.Struct("<4sHIQ")  # magic, version, crc32 of the payload, payload length
TENSOR_HEAD = struct.Struct("<HBBBBBI")   # name length, ndim, bits (0: raw), layout, dtype code, codec, frame bytes
FAST_ZSTD_LEVEL = 1  # layout choice and size estimates: a fraction of 22's time, within 0.1% of its size here
CODEC_ZSTD, CODEC_BROTLI = 0, 1
FRAME_CHUNK = 1 << 20  # bytes of a record compressed as one piece: pieces of one tensor compress in parallel
LAYOUT_RAW, LAYOUT_BYTES, LAYOUT_BITS = 0, 1, 2  # raw floats; one int8 per value; bit-packed fields
DTYPE_CODES = {torch.float16: 1, torch.float32: 2}
DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


class ArtifactError(ValueError):
    """An artifact that cannot be made to fit, or a blob that is not a sound artifact."""


@dataclass(frozen=True)
class QuantizedTensor:
    """bits > 0: int8 `values` (rows, cols) in [-qmax, qmax], fp16 `scale` (rows,); bits 0: fp16 `values` alone."""
    bits: int
    values: torch.Tensor
    scale: torch.Tensor | None = None


def tensor_class(name: str, tensor: torch.Tensor, min_numel: int = 0) -> str:
    """'mlp', 'attn', 'embed' or 'matrix' (BigramHash's, VE's projections) for a matrix stored as integers; 'raw'
    (fp16) for the rest and under `min_numel`."""
    if tensor.ndim != 2 or tensor.numel() < min_numel:
        return "raw"
    if name in EMBED_TENSOR_NAMES:
        return "embed"
    return next((kind for kind in ("mlp", "attn") if name.startswith("blocks.") and f".{kind}." in name), "matrix")


def class_quantizers(cfg: Hyperparameters, step: float = 1.0) -> dict[str, tuple[int, float]]:
    """(bits, clip sigmas) of each class at the fitter's step multiplier `step`. Below 1 the class takes one more bit
    (at most 8): the step shrinks while the clip stays beyond the set one (#1394: int b at k ~ int b+1 at 2k)."""
    plan = {"raw": (0, 0.0)}
    for kind, bits, sigmas in (("mlp", cfg.matrix_bits, cfg.mlp_clip_sigmas), ("attn", cfg.matrix_bits,
                               cfg.attn_clip_sigmas), ("matrix", cfg.matrix_bits, cfg.matrix_clip_sigmas),
                               ("embed", cfg.embed_bits, cfg.embed_clip_sigmas)):
        wide = min(8, bits + 1) if step < 1 else bits
        plan[kind] = (wide, sigmas * step * qmax_for(wide) / qmax_for(bits))
    return plan


def qmax_for(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # symmetric [-qmax, qmax]: zero is exact, one code of 2^bits unused


def row_scales(w: torch.Tensor, bits: int, sigmas: float) -> torch.Tensor:
    """Per-row fp16 step (as float32): SDClip (#1394), `sigmas` x the row's std / qmax. Its compressed size follows
    bits - log2(sigmas) (the row's histogram), so the size fitter steers by it; a search for the least squared error
    would pick steps the compressor pays for unseen."""
    return (sigmas * w.float().std(dim=1) / qmax_for(bits)).half().float().clamp_min(2.0 ** -24)


def rtn_quantize(w: torch.Tensor, bits: int, sigmas: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp16 per-row steps) by rounding to nearest."""
    scale = row_scales(w, bits, sigmas=sigmas)
    q = torch.clamp(torch.round(w.float() / scale[:, None]), -qmax_for(bits), qmax_for(bits))
    return q.to(torch.int8), scale.half()


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, the damping raised 10x (up to 5 times) until PD."""
    eye, mean_diag = torch.eye(h.size(0), device=h.device, dtype=h.dtype), h.diagonal().mean()
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * 10 ** attempt * mean_diag * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    raise ArtifactError(f"GPTQ: Hessian not positive definite even with damping {damp * 10 ** 5:g}")


def gptq_round_columns(w: torch.Tensor, hinv_upper: torch.Tensor, scale: torch.Tensor, qmax: int,
                       block_size: int) -> torch.Tensor:
    """Integer values (float) of w (rows, cols) by GPTQ's lazy batch updates: a dozen GPU launches per column."""
    w, q = w.clone(), torch.zeros_like(w)
    for start in range(0, w.size(1), block_size):
        end = min(start + block_size, w.size(1))
        block, h_block = w[:, start:end].clone(), hinv_upper[start:end, start:end]
        pivots, later = h_block.diagonal().tolist(), h_block.triu(1)  # later[j]: row j right of the diagonal
        for j, pivot in enumerate(pivots):
            column = block[:, j]  # its value when rounded: later columns' updates never touch it
            error = (column - torch.clamp(torch.round(column / scale), -qmax, qmax) * scale) / pivot
            block -= error[:, None] * later[j]
        q[:, start:end] = q_block = torch.clamp(torch.round(block / scale[:, None]), -qmax, qmax)
        errors = (block - q_block * scale[:, None]) / h_block.diagonal()
        w[:, end:] -= errors @ hinv_upper[start:end, end:]
    return q


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, damp: float, sigmas: float,
                  block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp16 per-row steps) for w (rows, cols) by GPTQ with `hessian` (cols, cols)."""
    with torch.autocast(w.device.type, enabled=False):  # the error propagation needs fp32, even under autocast
        w, h = w.detach().float(), hessian.detach().float().to(w.device).clone()
        dead = h.diagonal() == 0  # inputs that were always zero: any weight there is free, store 0
        h[dead, dead] = 1.0
        w = w.masked_fill(dead[None, :], 0.0)
        scale = row_scales(w, bits, sigmas)
        order = torch.argsort(h.diagonal(), descending=True)  # act-order: largest inputs first, most columns left
        hinv_upper = inverse_hessian_cholesky(h[order][:, order], damp)
        q = gptq_round_columns(w[:, order], hinv_upper, scale, qmax_for(bits), block_size)
    return q[:, torch.argsort(order)].to(torch.int8), scale.half()


@torch.no_grad()
def selfgen_calibration_tokens(model: GPT, num_seqs: int, seq_len: int, seed: int, batch_seqs: int = 64,
                               bos_id: int = 1) -> torch.Tensor:
    """(num_seqs, seq_len) int64 sequences sampled from BOS at temperature 1: no data needed after training."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training, batches = model.training, []
    model.eval()
    for start in range(0, num_seqs, batch_seqs):
        seqs = torch.full((min(batch_seqs, num_seqs - start), seq_len), bos_id, dtype=torch.int64, device=device)
        cache = DecodeCache(seq_len)
        for t in range(1, seq_len):
            logits = model.logits_from_hidden(model.forward_hidden(seqs[:, t - 1:t], cache)[:, -1])  # (B, V)
            seqs[:, t] = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=generator)[:, 0]
        batches.append(seqs)
    model.train(was_training)
    return torch.cat(batches)


@torch.no_grad()
def collect_hessians(model: GPT, calib_tokens: torch.Tensor, batch_seqs: int = 8) -> dict[str, torch.Tensor]:
    """Mean x x^T of each nn.Linear's input by weight name, and of the head's input (the final norm's output) for the
    head's weight, the tied embedding's (#1394); c_q, c_k, c_v share one."""
    sums, counts, shared, last = {}, {}, {}, [None, None]  # last: (input, name) of the last call

    def accumulate(name: str, x: torch.Tensor) -> None:
        if x is last[0]:
            shared[name] = last[1]
            return
        last[:] = x, name
        x = x.detach().flatten(0, -2).float()  # (tokens, in_features)
        if name not in sums:
            sums[name], counts[name] = torch.zeros(x.size(1), x.size(1), device=x.device), 0
        sums[name].addmm_(x.T, x)
        counts[name] += x.size(0)
    handles = [module.register_forward_hook(lambda _, inputs, out, name=f"{name}.weight": accumulate(name, inputs[0]))
               for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    device = next(model.parameters()).device
    try:
        for start in range(0, calib_tokens.size(0), batch_seqs):
            hidden = model.forward_hidden(calib_tokens[start:start + batch_seqs].to(device))
            accumulate("tok_emb.weight" if model.lm_head is None else "lm_head.weight", hidden)
    finally:
        for handle in handles:
            handle.remove()
    hessians = {name: total / counts[name] for name, total in sums.items()}
    return hessians | {name: hessians[source] for name, source in shared.items()}


@torch.no_grad()
def quantize_state(model: GPT, cfg: Hyperparameters, hessians: dict[str, torch.Tensor],
                   step: float = 1.0) -> dict[str, QuantizedTensor]:
    """Every state-dict entry as stored (class_quantizers at `step`), on the CPU; GPTQ where a Hessian is given,
    stacking the matrices that share one (c_q, c_k, c_v: a third of the steps)."""
    state, tensors, gptq_groups, plan = {}, model.state_dict(), {}, class_quantizers(cfg, step)
    for name, tensor in tensors.items():
        bits, sigmas = plan[tensor_class(name, tensor, cfg.quant_min_numel)]
        if bits == 0:
            state[name] = QuantizedTensor(0, tensor.detach().to("cpu", torch.float16))
        elif cfg.gptq and name in hessians:
            state[name] = None  # keeps its place in the order
            gptq_groups.setdefault((id(hessians[name]), bits, sigmas), []).append(name)
        else:
            q, scale = rtn_quantize(tensor, bits, sigmas)
            state[name] = QuantizedTensor(bits, q.cpu(), scale.cpu())
    for (_, bits, sigmas), names in gptq_groups.items():
        q, scale = gptq_quantize(torch.cat([tensors[name] for name in names]), hessians[names[0]], bits, cfg.gptq_damp,
                                 sigmas)
        rows = [tensors[name].size(0) for name in names]
        for name, q_part, scale_part in zip(names, q.cpu().split(rows), scale.cpu().split(rows)):
            state[name] = QuantizedTensor(bits, q_part, scale_part)
    return state


@torch.no_grad()
def dequantize_into(model: GPT, quantized_state: dict[str, QuantizedTensor]) -> GPT:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = {name: tuple(q.values.shape) for name, q in quantized_state.items()}
    if expected != stored:
        name = sorted(set(expected.items()) ^ set(stored.items()))[0][0]
        raise ArtifactError(f"artifact does not match the model built from these settings: {name} "
                            f"is {stored.get(name)} in the artifact, {expected.get(name)} in the model")
    model.load_state_dict({name: q.values.float() * q.scale.float()[:, None] if q.bits else q.values.float()
                           for name, q in quantized_state.items()})
    return model


def crown_q_penalty(model: GPT, cfg: Hyperparameters) -> torch.Tensor:
    """CROWN_Q_LAMBDA x mean of mean(w^2 delta^2 / 12), delta the detached row step: pulls the coarsest rows in most."""
    terms, plan = [], class_quantizers(cfg)
    for name, p in model.named_parameters():
        bits, sigmas = plan[tensor_class(name, p, cfg.quant_min_numel)]
        if bits:
            delta = sigmas * p.detach().float().std(dim=1, keepdim=True) / qmax_for(bits)  # (rows, 1): SDClip's step
            terms.append((p.float().square() * delta.square()).mean() / 12)
    if not terms:
        return torch.zeros((), device=next(model.parameters()).device)
    return cfg.crown_q_lambda * torch.stack(terms).mean()


def prune_smallest(quantized_state: dict[str, QuantizedTensor], fraction: float) -> dict[str, QuantizedTensor]:
    """A copy with `fraction` of MLP and attention values zeroed, those of least |q| * step: zstd likes zero runs."""
    prunable = {name: q for name, q in quantized_state.items()
                if q.bits and tensor_class(name, q.values) in ("mlp", "attn")}
    sizes = [q.values.numel() for q in prunable.values()]
    if int(fraction * sum(sizes)) == 0:
        return dict(quantized_state)
    cost = torch.cat([(q.values.float().abs() * q.scale.float()[:, None]).flatten() for q in prunable.values()])
    cost[cost == 0] = float("inf")  # already zero: nothing to gain
    k = min(int(fraction * sum(sizes)), int(torch.isfinite(cost).sum()))
    zero = torch.zeros(cost.numel(), dtype=torch.bool)
    zero[torch.topk(cost, k, largest=False).indices] = True
    pruned = dict(quantized_state)
    for (name, q), mask in zip(prunable.items(), zero.split(sizes)):
        pruned[name] = QuantizedTensor(q.bits, q.values.masked_fill(mask.view_as(q.values), 0), q.scale)
    return pruned


def tensor_record(name: str, q: QuantizedTensor, layout: int) -> bytes:
    """One tensor's frame, uncompressed: its values in `layout` (LAYOUT_BITS: fields of value + qmax), then steps."""
    if q.bits == 0:
        return q.values.reshape(-1).view(torch.uint8).numpy().tobytes()
    if q.values.dtype != torch.int8 or int(q.values.abs().max()) > qmax_for(q.bits) or not 2 <= q.bits <= 8:
        raise ValueError(f"{name}: values do not fit {q.bits}-bit integers")
    if layout == LAYOUT_BYTES:
        packed = q.values.numpy().tobytes()
    else:
        fields = (q.values.numpy().astype(np.int16).ravel() + qmax_for(q.bits)).astype(np.uint8)
        packed = np.packbits(np.unpackbits(fields[:, None], axis=1)[:, 8 - q.bits:]).tobytes()  # most significant first
    return packed + q.scale.reshape(-1).view(torch.uint8).numpy().tobytes()


def compression_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def codec_functions(codec: int):
    """(compress(data, level), decompress(data)) of CODEC_ZSTD or CODEC_BROTLI (imported where used: optional)."""
    if codec == CODEC_BROTLI:
        import brotli
        return lambda data, level: brotli.compress(data, quality=level), brotli.decompress
    return lambda data, level: zstandard.ZstdCompressor(level=level).compress(data), \
        zstandard.ZstdDecompressor().decompress


def final_codec(cfg: Hyperparameters) -> tuple[int, int]:
    """(codec, level) of the artifact's frames: brotli at quality 11 (the records'), or zstd at ZSTD_LEVEL."""
    return (CODEC_BROTLI, 11) if cfg.compressor == "brotli" else (CODEC_ZSTD, cfg.zstd_level)


def compressed_frames(records: Sequence[bytes], codec: int, level: int, cache: dict | None = None,
                      workers: int = 0) -> list[bytes]:
    """Each record as its own frame: its FRAME_CHUNK-byte pieces compressed in parallel, each after its u32 length (an
    8192-row embedding in one piece is ~4 s of brotli-11 on one core). `cache` maps (codec, level, sha256 of a piece)
    to its compressed bytes. 0 workers: all CPUs."""
    cache, compress = {} if cache is None else cache, codec_functions(codec)[0]
    pieces = [[record[i:i + FRAME_CHUNK] for i in range(0, max(len(record), 1), FRAME_CHUNK)] for record in records]
    keys = [[(codec, level, hashlib.sha256(piece).digest()) for piece in parts] for parts in pieces]
    todo = dict(sorted(((key, piece) for k, parts in zip(keys, pieces) for key, piece in zip(k, parts)
                        if key not in cache), key=lambda item: -len(item[1])))  # the longest first: no straggler
    if todo:
        with ThreadPoolExecutor(min(len(todo), workers or compression_workers())) as pool:
            cache.update(zip(todo, pool.map(lambda piece: compress(piece, level), todo.values())))
    return [b"".join(struct.pack("<I", len(cache[key])) + cache[key] for key in k) for k in keys]


def decompressed_frame(codec: int, frame: bytes) -> bytes:
    """The record compressed_frames made `frame` of."""
    decompress, offset, parts = codec_functions(codec)[1], 0, []
    while offset < len(frame):
        (length,) = struct.unpack_from("<I", frame, offset)
        parts.append(decompress(frame[offset + 4:offset + 4 + length]))
        offset += 4 + length
    return b"".join(parts)


@dataclass(frozen=True)
class Packing:
    """Per tensor, in state order: its layout (LAYOUT_RAW if raw), its record, that record's FAST_ZSTD_LEVEL frame."""
    layouts: list[int]
    records: list[bytes]
    fast_frames: list[bytes]

    def fast_blob(self, quantized_state: dict[str, QuantizedTensor]) -> bytes:
        return blob_from_frames(quantized_state, self.layouts, [CODEC_ZSTD] * len(self.layouts), self.fast_frames)


def fast_packing(quantized_state: dict[str, QuantizedTensor], cache: dict | None = None,
                 layout: int | None = None) -> Packing:
    """Integer tensors in `layout`, or (None) whichever zstd shrinks more at FAST_ZSTD_LEVEL (it ranks as the final)."""
    candidates = [(name, option) for name, q in quantized_state.items()
                  for option in ((LAYOUT_RAW,) if q.bits == 0 else (LAYOUT_BYTES, LAYOUT_BITS) if layout is None
                                 else (layout,))]
    records = [tensor_record(name, quantized_state[name], option) for name, option in candidates]
    best = {}
    for (name, option), record, frame in zip(candidates, records,
                                             compressed_frames(records, CODEC_ZSTD, FAST_ZSTD_LEVEL, cache)):
        if name not in best or len(frame) < len(best[name][2]):
            best[name] = (option, record, frame)
    return Packing(*map(list, zip(*best.values())))


def blob_from_frames(quantized_state: dict[str, QuantizedTensor], layouts: Sequence[int], codecs: Sequence[int],
                     frames: Sequence[bytes]) -> bytes:
    """The artifact around the tensors' frames: ARTIFACT_FRAME, then the payload: the zstd-compressed head table's
    length (u32), that table (tensor count; per tensor TENSOR_HEAD, name, shape), the frames in state order."""
    heads = [struct.pack("<I", len(quantized_state))]
    for (name, q), layout, codec, frame in zip(quantized_state.items(), layouts, codecs, frames):
        name_bytes, shape = name.encode(), tuple(q.values.shape)
        dtype_code = DTYPE_CODES[q.values.dtype if q.bits == 0 else q.scale.dtype]
        heads += [TENSOR_HEAD.pack(len(name_bytes), len(shape), q.bits, layout, dtype_code, codec, len(frame)),
                  name_bytes, struct.pack(f"<{len(shape)}I", *shape)]
    head_frame = zstandard.ZstdCompressor(level=FAST_ZSTD_LEVEL).compress(b"".join(heads))
    payload = b"".join([struct.pack("<I", len(head_frame)), head_frame, *frames])
    return ARTIFACT_FRAME.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, zlib.crc32(payload), len(payload)) + payload


def pack_artifact(quantized_state: dict[str, QuantizedTensor], codec: int = CODEC_ZSTD, level: int = 22,
                  cache: dict | None = None, layout: int | None = None, packing: Packing | None = None) -> bytes:
    """The artifact, each frame the smaller of its FAST_ZSTD_LEVEL zstd frame and its `codec` frame at `level`."""
    packing = packing or fast_packing(quantized_state, cache, layout)
    final = compressed_frames(packing.records, codec, level, cache)
    kept = [(codec, slow) if len(slow) < len(fast) else (CODEC_ZSTD, fast)
            for slow, fast in zip(final, packing.fast_frames)]
    return blob_from_frames(quantized_state, packing.layouts, *zip(*kept))


def read_tensor_heads(table: bytes) -> list[tuple]:
    """[(name, shape, bits, layout, dtype, codec, frame length)] from the decompressed head table."""
    (count,), offset, heads = struct.unpack_from("<I", table), 4, []
    for _ in range(count):
        name_len, ndim, bits, layout, dtype_code, codec, frame_len = TENSOR_HEAD.unpack_from(table, offset)
        offset += TENSOR_HEAD.size
        name = table[offset:offset + name_len].decode()
        shape = struct.unpack_from(f"<{ndim}I", table, offset + name_len)
        offset += name_len + 4 * ndim
        known = layout in (LAYOUT_RAW, LAYOUT_BYTES, LAYOUT_BITS) and codec in (CODEC_ZSTD, CODEC_BROTLI)
        if not known or dtype_code not in DTYPES_BY_CODE:
            raise ArtifactError(f"artifact header of {name} has unknown layout {layout}, dtype {dtype_code} or "
                                f"codec {codec}")
        if (layout == LAYOUT_RAW) != (bits == 0) or (bits and (ndim != 2 or not 2 <= bits <= 8)):
            raise ArtifactError(f"artifact header of {name} is inconsistent: bits {bits}, layout {layout}, "
                                f"shape {shape}")
        heads.append((name, shape, bits, layout, DTYPES_BY_CODE[dtype_code], codec, frame_len))
    if offset != len(table):
        raise ArtifactError(f"artifact head table has {len(table) - offset} bytes after its last tensor")
    return heads


def tensor_from_record(name: str, shape: tuple[int, ...], bits: int, layout: int, dtype: torch.dtype,
                       record: bytes) -> QuantizedTensor:
    count, dtype_bytes = math.prod(shape), torch.finfo(dtype).bits // 8
    value_bytes = {LAYOUT_RAW: count * dtype_bytes, LAYOUT_BYTES: count, LAYOUT_BITS: (count * bits + 7) // 8}[layout]
    expected = value_bytes + (0 if layout == LAYOUT_RAW else shape[0] * dtype_bytes)
    if len(record) != expected:
        raise ArtifactError(f"artifact tensor {name} holds {len(record)} bytes, its header says {expected}")
    raw = record[:value_bytes]
    if layout == LAYOUT_RAW:
        return QuantizedTensor(0, torch.frombuffer(bytearray(raw), dtype=dtype).view(shape))
    if layout == LAYOUT_BYTES:
        values = torch.frombuffer(bytearray(raw), dtype=torch.int8).view(shape)
    else:
        fields = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=count * bits).reshape(count, bits)
        weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int32)
        values = torch.from_numpy((fields.astype(np.int32) @ weights - qmax_for(bits)).astype(np.int8)).view(shape)
    return QuantizedTensor(bits, values, torch.frombuffer(bytearray(record[value_bytes:]), dtype=dtype))


def unpack_artifact(blob: bytes) -> dict[str, QuantizedTensor]:
    """The quantized state `pack_artifact` was given, exactly; ArtifactError for anything else."""
    if len(blob) < ARTIFACT_FRAME.size:
        raise ArtifactError(f"artifact truncated: {len(blob)} bytes, shorter than its {ARTIFACT_FRAME.size}-byte frame")
    (magic, version, crc, length), payload = ARTIFACT_FRAME.unpack_from(blob), blob[ARTIFACT_FRAME.size:]
    if magic != ARTIFACT_MAGIC:
        raise ArtifactError(f"not a model artifact: magic {magic!r}, expected {ARTIFACT_MAGIC!r}")
    if version != ARTIFACT_VERSION:
        raise ArtifactError(f"artifact format version {version} is not supported: this script reads {ARTIFACT_VERSION}")
    if len(payload) != length:
        raise ArtifactError(f"artifact truncated or padded: payload is {len(payload)} bytes, header says {length}")
    if zlib.crc32(payload) != crc:
        raise ArtifactError("artifact corrupted: payload checksum does not match")
    decompress = zstandard.ZstdDecompressor().decompress
    try:
        (table_len,) = struct.unpack_from("<I", payload)
        offset, state = 4 + table_len, {}
        for name, shape, bits, layout, dtype, codec, frame_len in read_tensor_heads(decompress(payload[4:offset])):
            if offset + frame_len > len(payload):
                raise ArtifactError(f"artifact payload ends inside tensor {name}")
            record = decompressed_frame(codec, payload[offset:offset + frame_len])
            state[name] = tensor_from_record(name, shape, bits, layout, dtype, record)
            offset += frame_len
    except ArtifactError:
        raise
    except Exception as err:  # whatever a codec raises on bytes it did not write (zstd, brotli, struct, utf-8)
        raise ArtifactError(f"artifact unreadable: {type(err).__name__}: {err}") from None
    if offset != len(payload):
        raise ArtifactError(f"artifact payload has {len(payload) - offset} bytes after its last tensor")
    return state


def fit_ladder(cfg: Hyperparameters) -> list[tuple[float, float]]:
    """(step multiplier, prune fraction) from the most precise to the smallest: FIT_STEPS, then FIT_PRUNES."""
    return ([(step, cfg.prune_fraction) for step in FIT_STEPS] +
            [(FIT_STEPS[-1], p) for p in FIT_PRUNES if p > cfg.prune_fraction])


class FitTries:
    """The ladder's artifacts, predicted from rounding to nearest at FAST_ZSTD_LEVEL (cheap), built with GPTQ and the
    final codec (dear); each logged once."""
    def __init__(self, model: GPT, cfg: Hyperparameters, hessians: dict[str, torch.Tensor], code_bytes: int, log):
        self.model, self.cfg, self.hessians, self.code_bytes, self.log = model, cfg, hessians, code_bytes, log
        self.ladder, self.frame_cache, self.estimates = fit_ladder(cfg), {}, {}

    def describe(self, i: int) -> str:
        step, prune = self.ladder[i]
        plan = class_quantizers(self.cfg, step)
        return f"step:{step:.3f} prune:{prune:.2f} " + " ".join(
            f"{kind}:int{bits}@{sigmas:.2f}" for kind, (bits, sigmas) in plan.items() if bits)

    def state(self, i: int, hessians: dict) -> dict[str, QuantizedTensor]:
        step, prune = self.ladder[i]
        return prune_smallest(quantize_state(self.model, self.cfg, hessians, step), prune)

    def estimate(self, i: int) -> int:
        if i not in self.estimates:
            state = self.state(i, {})
            self.estimates[i] = len(fast_packing(state, self.frame_cache).fast_blob(state))
            self.log(f"artifact_estimate {self.describe(i)} rtn_level:{FAST_ZSTD_LEVEL} "
                     f"artifact_bytes:{self.estimates[i]}")
        return self.estimates[i]

    def build(self, i: int) -> bytes:
        t0 = time.perf_counter()
        state = self.state(i, self.hessians)
        blob = pack_artifact(state, *final_codec(self.cfg), self.frame_cache)
        total = self.code_bytes + len(blob)
        self.log(f"artifact_try {self.describe(i)} compressor:{self.cfg.compressor} artifact_bytes:{len(blob)} "
                 f"total_bytes:{total} target_bytes:{self.cfg.target_bytes} fits:{int(total <= self.cfg.target_bytes)} "
                 f"time:{1000 * (time.perf_counter() - t0):.0f}ms")
        return blob


def first_predicted_fit(lo: int, hi: int, fits) -> int | None:
    """The first i in [lo, hi) with fits(i), by bisection: predicted sizes shrink along the ladder."""
    if lo >= hi or not fits(hi - 1):
        return None
    while lo < hi - 1:
        mid = (lo + hi - 1) // 2
        lo, hi = (lo, mid + 1) if fits(mid) else (mid + 1, hi)
    return lo


def fit_artifact(model: GPT, cfg: Hyperparameters, code_bytes: int, log, calib_tokens: torch.Tensor | None = None,
                 deadline: float | None = None) -> tuple[bytes, tuple[float, float]]:
    """The artifact of the most precise fit_ladder entry under TARGET_BYTES (of the FIT_TRIES built), and that entry.
    A try's size over its prediction scales the predictions after it; one over the budget moves coarser, one under it
    finer, down to the neighbour of the best. Once one fits, no try starts that would end past `deadline` (a
    perf_counter time: the training clock's). Rank 0 alone decides; from sizes only, unless the deadline stops it."""
    hessians = {}
    if cfg.gptq:
        if calib_tokens is None:
            raise ValueError("fit_artifact: GPTQ=1 needs calib_tokens")
        t0 = time.perf_counter()
        hessians = collect_hessians(model, calib_tokens)
        log(f"gptq_hessians matrices:{len(hessians)} calib_seqs:{calib_tokens.size(0)} "
            f"calib_seq_len:{calib_tokens.size(1)} time:{1000 * (time.perf_counter() - t0):.0f}ms")
    tries, budget = FitTries(model, cfg, hessians, code_bytes, log), cfg.target_bytes - code_bytes
    built, ratio, lo, best, try_s = {}, 1.0, 0, None, 0.0  # built: entry -> bytes; those before lo are over budget
    while len(built) < FIT_TRIES:
        if best is not None and deadline is not None and time.perf_counter() + try_s > deadline:
            log(f"artifact_fit stopped: another try ({try_s:.1f}s) would end past GPTQ_RESERVE_SECONDS")
            break
        hi = len(tries.ladder) if best is None else best
        i = first_predicted_fit(lo, hi, lambda j: ratio * tries.estimate(j) <= budget)
        if i is None and hi - 1 >= lo:  # none predicted: the smallest decides fit or refusal, the best's finer
            i = hi - 1                  # neighbour whether it is the most precise that fits
        if i is None or i in built:
            break
        t0 = time.perf_counter()
        blob = tries.build(i)
        built[i], ratio, try_s = len(blob), len(blob) / tries.estimate(i), time.perf_counter() - t0
        if len(blob) <= budget:
            best = i
            kept = blob
        else:
            lo = i + 1
    if best is None:
        raise ArtifactError(f"artifact cannot fit: code + artifact is {code_bytes + min(built.values())} bytes at the "
                            f"smallest setting tried ({tries.describe(max(built))}), over "
                            f"TARGET_BYTES={cfg.target_bytes}")
    finer = f"{tries.describe(best - 1)} bytes:{built.get(best - 1, 'unbuilt')}" if best else "none (the finest)"
    log(f"artifact_fit chose {tries.describe(best)} bytes:{code_bytes + len(kept)} gave_up_finer {finer}")
    return kept, tries.ladder[best]


def write_artifact(path: str | Path, blob: bytes) -> None:
    """Writes to a temporary name, then renames: a crash never leaves half an artifact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# =============================================================================
# EVALUATION
# =============================================================================


@dataclass(frozen=True)
class EvalResult:
    val_loss: float      # mean nats per scored token
    val_bpb: float       # bits per UTF-8 byte of the scored tokens
    scored_tokens: int
    scored_bytes: int


@functools.lru_cache(maxsize=4)  # TTT asks for every chunk: ~1M spans on FineWeb take ~0.7 s to build
def sliding_window_spans(num_tokens: int, seq_len: int, stride: int) -> tuple[tuple[int, int, int], ...]:
    """(start, length, scored) full-length windows scoring each target 1..N-1 once, in the last `scored` predictions."""
    spans, scored_end = [], 1
    while scored_end < num_tokens:
        end = min(scored_end + (seq_len if scored_end == 1 else stride), num_tokens)  # targets [scored_end, end)
        start = max(0, end - 1 - seq_len)
        spans.append((start, end - 1 - start, end - scored_end))
        scored_end = end
    return tuple(spans)


def _owned_batches(num_items: int, batch_size: int, rt: Runtime) -> Iterator[tuple[int, int]]:
    """(first, last+1) ranges of this rank's batches, cut from the global order: the same for any world size."""
    num_batches = (num_items + batch_size - 1) // batch_size
    per_rank = (num_batches + rt.world_size - 1) // rt.world_size
    for b in range(rt.rank * per_rank, min(num_batches, (rt.rank + 1) * per_rank)):
        yield b * batch_size, min(num_items, (b + 1) * batch_size)


def _eval_result(batch_scores: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 rt: Runtime) -> EvalResult:
    """All ranks' EvalResult of this rank's (-ln q (n,), bytes (n,)) batches; sums stay on the device: no stalls."""
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    byte_sum, count = torch.zeros((), dtype=torch.int64, device=device), 0
    for nll, nbytes in batch_scores:
        nll_sum += nll.double().sum()
        byte_sum += nbytes.sum()
        count += nll.numel()
    sums = torch.tensor([float(nll_sum), float(int(byte_sum)), float(count)], dtype=torch.float64, device=rt.device)
    if rt.distributed:
        dist.all_reduce(sums)
    nll, nbytes, ntok = sums.tolist()
    return EvalResult(nll / ntok, nll / (math.log(2) * nbytes), int(ntok), int(nbytes))


@dataclass
class WindowBatch:
    """Windows and the predictions they score; `picked`'s size is known on the host: no sync per batch."""
    index: torch.Tensor      # (B, L+1) positions in val_tokens of each row's window (padding clamped)
    tokens: torch.Tensor     # (B, L+1) val_tokens[index]
    positions: torch.Tensor  # (B, S) the predictions each row computes: window[p] predicts window[p+1]
    picked: torch.Tensor     # (n,) flat indices into (B, S) of the scored ones, in target order

    def pick(self, per_prediction: torch.Tensor) -> torch.Tensor:
        return per_prediction.flatten(0, 1)[self.picked]  # (B, S, ...) -> (n, ...)

    def scored(self, tables: TokenByteTables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(next tokens (B, S), the scored targets' positions in val_tokens (n,), their bytes (n,))"""
        next_tokens, targets = self.tokens.gather(1, self.positions + 1), self.index.gather(1, self.positions + 1)
        nbytes = target_byte_counts(self.tokens.gather(1, self.positions), next_tokens, tables, targets)
        return next_tokens, self.pick(targets), self.pick(nbytes)


def eval_batch_rows(batch_tokens: int, seq_len: int) -> int:
    """Windows in every evaluation batch (padded to it): one shape, the one warm_up_evaluation compiles."""
    return max(1, batch_tokens // seq_len)


def sliding_window_batches(val_tokens: torch.Tensor, seq_len: int, stride: int, batch_tokens: int, rt: Runtime,
                           lo: int = 1, hi: int | None = None) -> Iterator[WindowBatch]:
    """This rank's batches scoring targets [lo, hi), `stride` a row; a window straddling lo or hi is split, exactly."""
    hi = val_tokens.numel() if hi is None else hi
    spans = sliding_window_spans(val_tokens.numel(), seq_len, stride)
    spans = spans[bisect.bisect_left(spans, lo, key=lambda sp: sp[0] + sp[1]):  # in order: [lo, hi)'s spans are a run
                  bisect.bisect_left(spans, hi, key=lambda sp: sp[0] + sp[1] - sp[2] + 1)]
    def window_rows(spans):  # (start, first, end): a span's scored predictions [n-k, n), `stride` per row
        return [(s, f, min(f + stride, n)) for s, n, k in spans for f in range(n - k, n, stride)]
    head = window_rows(spans[:1])  # every later span scores at most `stride`: one row each
    rows = eval_batch_rows(batch_tokens, seq_len)
    for first, last in _owned_batches(len(head) + max(0, len(spans) - 1), rows, rt):
        tail = spans[1 + max(0, first - len(head)):1 + max(0, last - len(head))]
        yield padded_window_batch(val_tokens, head[first:last] + window_rows(tail), rows, seq_len, stride, lo, hi)


def padded_window_batch(val_tokens: torch.Tensor, windows: Sequence[tuple[int, int, int]], rows: int, seq_len: int,
                        scored: int, lo: int, hi: int) -> WindowBatch:
    """(start, first, end) windows scoring predictions [first, end) with targets in [lo, hi); padding is not picked."""
    device, N = val_tokens.device, val_tokens.numel()
    hi = min(hi, N)
    count = sum(max(0, min(s + e + 1, hi) - max(s + f + 1, lo)) for s, f, e in windows)
    table = torch.tensor(list(windows) + [(0, 0, 0)] * (rows - len(windows)), dtype=torch.int64)
    start, first, end = to_device_async(table, device).unbind(1)
    positions = first.clamp(max=seq_len - scored)[:, None] + torch.arange(scored, device=device)[None, :]
    targets = start[:, None] + positions + 1
    keep = (positions >= first[:, None]) & (positions < end[:, None]) & (targets >= lo) & (targets < hi)
    index = (start[:, None] + torch.arange(seq_len + 1, device=device)[None, :]).clamp_(max=N - 1)
    return WindowBatch(index, val_tokens[index], positions, keep.flatten().nonzero_static(size=count).squeeze(1))


@torch.no_grad()
def evaluate_plain(token_nll, val_tokens: torch.Tensor, tables: TokenByteTables, seq_len: int,
                   batch_tokens: int, rt: Runtime) -> EvalResult:
    """Non-overlapping windows of seq_len (the last one shorter): each token scored once, context reset."""
    N, rows = val_tokens.numel(), eval_batch_rows(batch_tokens, seq_len)
    def batch_scores():
        for first, last in _owned_batches((N - 2) // seq_len + 1, rows, rt):
            batch = padded_window_batch(val_tokens, [(i * seq_len, 0, seq_len) for i in range(first, last)], rows,
                                        seq_len, seq_len, 1, N)
            inputs, targets = batch.tokens[:, :-1], batch.tokens[:, 1:]  # every position: the warmed-up graph
            with rt.autocast():
                nll = token_nll(inputs, targets)
            yield batch.pick(nll), batch.pick(target_byte_counts(inputs, targets, tables, batch.index[:, 1:]))
    return _eval_result(batch_scores(), val_tokens.device, rt)


@dataclass
class NeuralScores:
    """What the neural pass keeps of each target this rank scores, in target order."""
    targets: torch.Tensor                 # (n,) int64 positions in the validation stream
    logprob: torch.Tensor                 # (n,) float64 ln p_nn(x_t)
    mixer_logits: torch.Tensor | None     # (n, 1+K) float32, the learned head's output
    nbytes: torch.Tensor                  # (n,) int64
    audit_rows: dict[int, torch.Tensor]   # target position -> (V,) float64 neural log-probabilities


@torch.no_grad()
def neural_pass(eval_outputs, val_tokens: torch.Tensor, tables: TokenByteTables, cfg: Hyperparameters,
                rt: Runtime, audit_targets: torch.Tensor, lo: int = 1, hi: int | None = None) -> NeuralScores:
    """The sliding-window pass of the model alone over targets [lo, hi); n-gram caches play no part in it."""
    parts = []
    for batch in sliding_window_batches(val_tokens, cfg.eval_seq_len, cfg.eval_stride,
                                        eval_batch_tokens(cfg, rt.world_size), rt, lo, hi):
        with rt.autocast():
            logprobs, mixer_logits = eval_outputs(batch.tokens[:, :-1], batch.positions)
        parts.append(window_scores(batch, tables, logprobs, mixer_logits, audit_targets))
    return concatenated_scores(parts, val_tokens.device)


def window_scores(batch: WindowBatch, tables: TokenByteTables, logprobs: torch.Tensor, mixer_logits,
                  audit_targets: torch.Tensor) -> NeuralScores:
    """The NeuralScores of a batch's scored targets from its (B, S, V) log-probabilities and mixer logits."""
    next_tokens, targets, nbytes = batch.scored(tables)
    audit_rows = {}
    if audit_targets.numel():  # reads the hits back: only when auditing
        hits = torch.isin(targets, audit_targets).nonzero().squeeze(1)
        rows = logprobs.flatten(0, 1)[batch.picked[hits]].double()
        audit_rows = dict(zip(targets[hits].tolist(), rows.unbind(0)))
    target_logprob = batch.pick(logprobs.gather(-1, next_tokens[..., None])[..., 0]).double()
    mixer_logits = None if mixer_logits is None else batch.pick(mixer_logits).float()
    return NeuralScores(targets, target_logprob, mixer_logits, nbytes, audit_rows)


def concatenated_scores(parts: Sequence[NeuralScores], device: torch.device) -> NeuralScores:
    """The scores of several batches as one, in target order; a rank may own no batch at all."""
    parts = [p for p in parts if p.targets.numel()]
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return NeuralScores(empty, empty.double(), None, empty, {})
    targets, order = torch.sort(torch.cat([p.targets for p in parts]))
    mixer = None if parts[0].mixer_logits is None else torch.cat([p.mixer_logits for p in parts])[order]
    audit_rows = {t: r for p in parts for t, r in p.audit_rows.items()}
    return NeuralScores(targets, torch.cat([p.logprob for p in parts])[order], mixer,
                        torch.cat([p.nbytes for p in parts])[order], audit_rows)


def document_spans(val_tokens: torch.Tensor) -> list[tuple[int, int]]:
    """(first, last) positions of each document: its BOS through the next one's, its last target (the split's first
    token opens the first document whatever it is); the documents' targets are 1..N-1, each once."""
    starts = [0] + (val_tokens[1:-1] == BOS_ID).nonzero().squeeze(1).add(1).tolist()
    return list(zip(starts, starts[1:] + [val_tokens.numel() - 1]))


class DocAdapters:
    """TTT_LORA_RANK adapters scaled TTT_LORA_ALPHA / rank on every matrix the forward pass uses (lanes, loops, the
    head) but the mixer head's; row b of a batch is document b's. A starts from one seeded draw for every row (a score
    does not depend on its row), B at 0: exactly the base model."""
    def __init__(self, model: GPT, cfg: Hyperparameters, device: torch.device):
        self.sites = [m for m in model.modules() if isinstance(m, Linear)]  # the heads are nn.Linear
        shapes = [(m.in_features, m.out_features) for m in self.sites] + [(cfg.model_dim, cfg.vocab_size)]
        r, rows, generator = cfg.ttt_lora_rank, cfg.ttt_batch_size, torch.Generator().manual_seed(cfg.seed)
        self.a_init = [torch.rand(r, i, generator=generator).sub(0.5).mul(2 / i ** 0.5).to(device) for i, _ in shapes]
        self.a = [nn.Parameter(torch.empty(rows, r, i, device=device)) for i, _ in shapes]
        self.b = [nn.Parameter(torch.zeros(rows, o, r, device=device)) for _, o in shapes]
        self.params = self.a + self.b
        self.model, self.cfg, self.scale = model, cfg, cfg.ttt_lora_alpha / r
        self.reset()

    def reset(self) -> torch.optim.Optimizer:
        """A to its draw, B to 0; returns a fresh optimizer (TTT_OPTIMIZER) over them."""
        cfg = self.cfg
        with torch.no_grad():
            for a, a_init, b in zip(self.a, self.a_init, self.b):
                a.copy_(a_init.expand_as(a))
                b.zero_()
        if cfg.ttt_optimizer == "sgd":
            return torch.optim.SGD(self.params, lr=cfg.ttt_lora_lr, momentum=cfg.ttt_beta1,
                                   weight_decay=cfg.ttt_weight_decay)
        return torch.optim.AdamW(self.params, lr=cfg.ttt_lora_lr, betas=(cfg.ttt_beta1, cfg.ttt_beta2), eps=1e-10,
                                 weight_decay=cfg.ttt_weight_decay, fused=self.a[0].is_cuda)

    @contextlib.contextmanager
    def attached(self):
        """The model's matrices carry the adapters inside, and only inside, this block."""
        sites = [(site, "adapter") for site in self.sites] + [(self.model, "head_adapter")]
        for (site, name), a, b in zip(sites, self.a, self.b):
            setattr(site, name, (a, b, self.scale))
        try:
            yield
        finally:  # back to the classes' None: graphs compiled before see the attributes they were traced with
            for site, name in sites:
                delattr(site, name)


def lora_widths(cfg: Hyperparameters) -> list[int]:
    """The window lengths a LoRA step runs at: powers of two from TTT_CHUNK_SIZE up, then EVAL_SEQ_LEN; all compiled."""
    bits = range((cfg.ttt_chunk_size - 1).bit_length(), (cfg.eval_seq_len - 1).bit_length() + 1)
    return sorted({min(1 << k, cfg.eval_seq_len) for k in bits})


def chunk_window(doc: tuple[int, int], c: int, cfg: Hyperparameters) -> tuple[int, int, int]:
    """(start, first, end) of chunk c of a document: a window of its own tokens only, at most EVAL_SEQ_LEN, ending
    with the chunk's last input, whose predictions [first, end) are the chunk's TTT_CHUNK_SIZE targets."""
    (s, e), C = doc, cfg.ttt_chunk_size
    hi = min(s + (c + 1) * C, e)  # the chunk's last target
    w = max(s, hi - cfg.eval_seq_len)
    return w, s + c * C - w, hi - w


@torch.no_grad()
def lora_batch_scores(docs: Sequence[tuple[int, int]], adapters: DocAdapters, eval_outputs, val_tokens: torch.Tensor,
                      tables: TokenByteTables, rt: Runtime, audit_targets: torch.Tensor,
                      probe) -> tuple[NeuralScores, int, int]:
    """(scores, tokens run, of which padding) of up to TTT_BATCH_SIZE documents side by side: each chunk is scored,
    then one optimizer step on its loss updates each document's adapters; adapters start afresh."""
    cfg, rows, device, parts, run, padding = adapters.cfg, adapters.cfg.ttt_batch_size, val_tokens.device, [], 0, 0
    optimizer = adapters.reset()
    chunks = [-(-(e - s) // cfg.ttt_chunk_size) for s, e in docs]
    for c in range(max(chunks)):
        windows = [chunk_window(doc, c, cfg) if c < n else (0, 0, 0) for doc, n in zip(docs, chunks)]
        ends = torch.tensor([w[2] for w in windows] + [0] * (rows - len(docs)))
        width = next(w for w in lora_widths(cfg) if w >= int(ends.max()))
        run, padding = run + rows * width, padding + rows * width - int(ends.sum())
        batch = padded_window_batch(val_tokens, windows, rows, width, cfg.ttt_chunk_size, 1, val_tokens.numel())
        unread = torch.arange(width, device=device)[None, :] >= to_device_async(ends, device)[:, None]
        inputs = batch.tokens[:, :-1].masked_fill(unread, 0)  # the window holds no token past the chunk's last input
        with torch.enable_grad(), rt.autocast():
            logprobs, mixer_logits = eval_outputs(inputs, batch.positions)
        parts.append(window_scores(batch, tables, logprobs.detach(), mixer_logits, audit_targets))  # keeps no graph
        probe("score", parts[-1].targets, None)
        trains = [c < n - 1 for n in chunks] + [False] * (rows - len(docs))  # on the host: no sync a step
        if not any(trains):
            continue
        keep = torch.zeros(rows * cfg.ttt_chunk_size, dtype=torch.bool, device=device)
        keep = keep.index_fill_(0, batch.picked, True).view(rows, -1) & to_device_async(torch.tensor(trains),
                                                                                        device)[:, None]
        probe("update", batch.index[:, :-1], ~unread)  # positions and masks: no host sync a step
        probe("update", batch.index.gather(1, batch.positions + 1), keep)
        with torch.enable_grad():
            nll = -logprobs.gather(-1, batch.tokens.gather(1, batch.positions + 1)[..., None])[..., 0]
            ((nll * keep).sum(1) / keep.sum(1).clamp(min=1)).sum().float().backward()  # each document's mean
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return concatenated_scores(parts, device), run, padding


def global_parameters(model: GPT) -> list[nn.Parameter]:
    """What phased global SGD trains: every base weight but the mixer head's (its loss is the CE alone)."""
    return [p for name, p in model.named_parameters() if not name.startswith("mixer_head.")]


def set_trainable(model: GPT, params: Sequence[nn.Parameter]) -> None:
    """requires_grad on `params` alone: graphs compiled with these flags must meet the same ones when they run."""
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


def chunk_training_sequences(val_tokens: torch.Tensor, lo: int, hi: int, seq_len: int) -> torch.Tensor:
    """((hi - lo) // seq_len, seq_len+1) non-overlapping, already scored sequences of the chunk of targets [lo, hi)."""
    starts = lo - 1 + seq_len * torch.arange((hi - lo) // seq_len, device=val_tokens.device)
    return val_tokens[starts[:, None] + torch.arange(seq_len + 1, device=val_tokens.device)[None, :]]


@torch.enable_grad()  # called from inside the evaluation's no_grad
def global_sgd(model: GPT, train_forward, val_tokens: torch.Tensor, hi: int, cfg: Hyperparameters, rt: Runtime,
               generator: torch.Generator) -> None:
    """One phase: SGD on targets [1, hi) by chunks under a cosine learning rate (GLOBAL_TTT_*); ranks step on summed
    gradients: the same weights."""
    params, G, B = global_parameters(model), cfg.global_ttt_chunk_tokens, cfg.global_ttt_batch_seqs
    optimizer = torch.optim.SGD(params, lr=cfg.global_ttt_lr, momentum=cfg.global_ttt_momentum)
    rows, num_chunks = -(-B // rt.world_size), -(-(hi - 1) // G)  # a rank's share of a batch, rounded up: one shape
    model.train()
    for k in range(num_chunks):
        seqs = chunk_training_sequences(val_tokens, 1 + k * G, min(hi, 1 + (k + 1) * G), cfg.eval_seq_len)
        optimizer.param_groups[0]["lr"] = cfg.global_ttt_lr * 0.5 * (1 + math.cos(math.pi * k / num_chunks))
        for _ in range(cfg.global_ttt_epochs):
            order = torch.randperm(seqs.size(0), generator=generator)  # a CPU generator: the same on every rank
            for b in range(0, seqs.size(0), B):
                batch = order[b:b + B]
                inputs, targets = ttt_rank_batch(seqs, batch[rt.rank::rt.world_size].to(seqs.device), rows)
                with rt.autocast():
                    loss = train_forward(inputs, targets)
                (loss * (rows / batch.numel())).backward()  # sum / (rows * T), scaled to the global batch's mean
                if rt.distributed:  # one collective per step, not one per parameter
                    flat = torch.cat([p.grad.flatten() for p in params])
                    dist.all_reduce(flat)
                    for p, g in zip(params, flat.split([p.numel() for p in params])):
                        p.grad.copy_(g.view_as(p))
                if cfg.global_ttt_grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.global_ttt_grad_clip)
                optimizer.step()
                model.zero_grad(set_to_none=True)
    model.eval()


def ttt_rank_batch(seqs: torch.Tensor, mine: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) (rows, T) of sequences `mine`, padded to one compiled shape by the first, targets -100 (0)."""
    x = torch.cat((seqs[mine], seqs[:1].expand(rows - mine.numel(), -1)))
    return x[:, :-1], x[:, 1:].masked_fill(torch.arange(rows, device=x.device)[:, None] >= mine.numel(), -100)


def ttt_segments(num_docs: int, cfg: Hyperparameters) -> tuple[list[int], set[int]]:
    """(document boundaries, those ending a phase): the phases split the first PHASED_TTT_PREFIX_DOCS, the rest is cut
    in TTT_SEGMENTS, each boundary a point where every rank has scored every document before it."""
    prefix = min(num_docs, cfg.phased_ttt_prefix_docs) if cfg.phased_ttt_num_phases else 0
    phase_ends = {prefix * (k + 1) // cfg.phased_ttt_num_phases for k in range(cfg.phased_ttt_num_phases)}
    phase_ends -= {0, num_docs}  # a phase after the last document would train for nothing
    rest = [prefix + (num_docs - prefix) * (k + 1) // TTT_SEGMENTS for k in range(TTT_SEGMENTS)]
    return sorted({0} | phase_ends | set(rest)), phase_ends


def lora_neural_pass(model: GPT, eval_outputs, train_forward, adapters: DocAdapters, val_tokens: torch.Tensor,
                     tables: TokenByteTables, cfg: Hyperparameters, rt: Runtime, audit_targets: torch.Tensor, log,
                     eval_start: float, phases: dict[str, float], probe=lambda *event: None) -> NeuralScores:
    """Per-document LoRA TTT, score first, by segments of the stream. A segment's documents are scored longest first,
    TTT_BATCH_SIZE at a time, batch i by rank i mod WORLD_SIZE: a score depends on its document and the base weights
    alone, so any order within a segment keeps rule 1. A segment ending a phase is followed by global SGD on every
    document before its end. Past EVAL_BUDGET_SECONDS's pace (agreed), the rest is scored as without TTT."""
    docs, generator, parts = document_spans(val_tokens), torch.Generator().manual_seed(cfg.seed), []
    bounds, phase_ends = ttt_segments(len(docs), cfg)
    adapting, done_phases, lora_s, sgd_s, scored, trained, run, padding = True, 0, 0.0, 0.0, 0, 0, 0, 0
    for lo, hi in zip(bounds, bounds[1:]):
        if lo > 0:  # the pace so far: a LoRA step per scored token, an SGD step per trained one
            left, sgd_left = docs[-1][1] - docs[lo][0], sum(docs[b - 1][1] for b in phase_ends if b > lo)
            own = time.perf_counter() - eval_start
            projected = own + left * lora_s / scored + sgd_left * (sgd_s / trained if trained else lora_s / scored)
            elapsed, projected = agreed_max([own, projected], rt)
            if projected > cfg.eval_budget_seconds:  # the rest as without TTT: the stream's sliding window
                adapting = False
                log(f"ttt_stopped doc:{lo}/{len(docs)} elapsed:{elapsed:.1f}s projected:{projected:.1f}s budget:"
                    f"{cfg.eval_budget_seconds:.1f}s: the remaining documents are scored by the sliding window")
                parts.append(neural_pass(eval_outputs, val_tokens, tables, cfg, rt, audit_targets, docs[lo][0] + 1))
                break
        t0, order = time.perf_counter(), sorted(range(lo, hi), key=lambda d: docs[d][0] - docs[d][1])
        set_trainable(model, [])  # the adapters' gradients alone
        with adapters.attached():
            for first in range(rt.rank * cfg.ttt_batch_size, len(order), rt.world_size * cfg.ttt_batch_size):
                batch_docs = [docs[d] for d in order[first:first + cfg.ttt_batch_size]]
                part, batch_run, batch_padding = lora_batch_scores(batch_docs, adapters, eval_outputs, val_tokens,
                                                                   tables, rt, audit_targets, probe)
                parts.append(part)
                run, padding = run + batch_run, padding + batch_padding
        lora_s, scored = lora_s + agreed_max([time.perf_counter() - t0], rt)[0], scored + docs[hi - 1][1] - docs[lo][0]
        set_trainable(model, global_parameters(model))
        if hi in phase_ends:
            t0 = time.perf_counter()
            probe("update", torch.arange(docs[hi - 1][1] + 1, device=val_tokens.device), None)
            global_sgd(model, train_forward, val_tokens, docs[hi - 1][1] + 1, cfg, rt, generator)
            sgd_s, trained, done_phases = sgd_s + rt.synced_time() - t0, trained + docs[hi - 1][1], done_phases + 1
            phases["ttt_train"] += 1000 * (rt.synced_time() - t0)
        model.requires_grad_(True)  # the flags the sliding window's graph has
    log(f"ttt_done docs:{len(docs)} segments:{len(bounds) - 1} phases:{done_phases}/{len(phase_ends)} "
        f"adapted:{int(adapting)} lora:{lora_s:.1f}s global_sgd:{sgd_s:.1f}s padding:{padding / max(run, 1):.1%}")
    return concatenated_scores(parts, val_tokens.device)


def audit_distribution(q: torch.Tensor, target: int, fast_nll: float) -> tuple[float, float, float]:
    """(|sum - 1|, min, |q[target] - exp(-fast_nll)|) of q (V,) float64: a normalized q's entry is scored (rule 2)."""
    return abs(float(q.sum()) - 1.0), float(q.min()), abs(float(q[target]) - math.exp(-fast_nll))


def materialized_mixture(neural_logprobs: torch.Tensor, rows: Sequence[torch.Tensor], valid: Sequence[bool],
                         weights: torch.Tensor, hedge: bool, beta: float = 0.0) -> torch.Tensor:
    """The whole q_t (V,) float64 the fast path scores one entry of, from each order's counts row and the neural row."""
    neural = neural_logprobs.exp()
    q = weights[0].double() * neural
    for i, row in enumerate(rows):
        row = row.double()
        if hedge:
            q = q + weights[i + 1].double() * hedge_expert_probs(row, row.sum(), row.numel())
        elif valid[i]:  # beta = 0: row / row.sum(), exactly (row + 0 = row)
            q = q + weights[i + 1].double() * (row + beta * neural) / (row.sum() + beta)
    return q


@dataclass
class AuditStats:
    """NGRAM_AUDIT_POSITIONS' q_t materialized at `targets`, kept with -ln q_t(x_t) (V floats each: few positions)."""
    targets: torch.Tensor
    positions: int = 0
    worst_sum_error: float = 0.0
    min_prob: float = 1.0
    worst_target_diff: float = 0.0
    distributions: dict = dataclasses.field(default_factory=dict)
    fast_nll: dict = dataclasses.field(default_factory=dict)

    def add(self, t: int, q: torch.Tensor, target: int, nll: float) -> None:
        sum_error, min_prob, target_diff = audit_distribution(q, target, nll)
        self.positions += 1
        self.worst_sum_error = max(self.worst_sum_error, sum_error)
        self.min_prob = min(self.min_prob, min_prob)
        self.worst_target_diff = max(self.worst_target_diff, target_diff)
        self.distributions[t], self.fast_nll[t] = q, nll


def counts_in_earlier_chunks(new_run: torch.Tensor, chunks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per item sorted into runs of a key (chunks non-decreasing): its run's weight in earlier chunks."""
    before = torch.cumsum(weights, 0) - weights  # non-decreasing, as cummax needs
    new_chunk = new_run.clone()
    new_chunk[1:] |= chunks[1:] != chunks[:-1]
    run_start = torch.cummax(torch.where(new_run, before, 0), 0).values
    return torch.cummax(torch.where(new_chunk, before, 0), 0).values - run_start


def cache_items(val_tokens: torch.Tensor, targets: torch.Tensor, order: int, vocab_size: int,
                chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows (context key, next token, chunk, weight) (m, 4) int64 of sorted targets, and each target's row (None: i).
    Orders <= 2 merge equal rows, weighing that many: no owner receives a frequent context's every target."""
    V = vocab_size
    keys = context_keys_from(lambda k: val_tokens[targets - 1 - k], targets, order, V)
    tokens, chunks = val_tokens[targets], (targets - 1) // chunk_tokens
    if order > 2:
        return torch.stack((keys, tokens, chunks, torch.ones_like(keys)), 1), None
    rows, where, weights = torch.unique((chunks * V + keys) * V + tokens, return_inverse=True, return_counts=True)
    return torch.stack((rows // V % V, rows % V, rows // (V * V), weights), 1), where


def earlier_chunk_counts(items: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """c(ctx, x) and T(ctx) (n, 2) int64 before each row's chunk, for items (n, 4) holding every row of their
    contexts. Stable sorts keep runs in chunk order: the cost does not grow with the number of chunks."""
    in_order = None
    if not bool((items[1:, 2] >= items[:-1, 2]).all()):  # the senders' blocks interleave (TTT shares each chunk)
        in_order = torch.sort(items[:, 2], stable=True).indices
        items = items[in_order]
    by_key = torch.sort(items[:, 0], stable=True).indices
    rows = items[by_key]  # whole rows: one cache miss per row, not per column (at 8M rows a gather costs)
    new_context = run_starts(rows[:, 0])
    pairs, by_pair = torch.sort((torch.cumsum(new_context, 0) - 1) * vocab_size + rows[:, 1], stable=True)
    out = torch.empty_like(items[:, :2])
    out[by_key, 1] = counts_in_earlier_chunks(new_context, rows[:, 2], rows[:, 3])
    rows = rows[by_pair]
    out[by_key[by_pair], 0] = counts_in_earlier_chunks(run_starts(pairs), rows[:, 2], rows[:, 3])
    return out if in_order is None else torch.empty_like(out).index_copy_(0, in_order, out)


def context_owners(keys: torch.Tensor, world_size: int) -> torch.Tensor:
    """The rank that counts each context: high bits of a hash, as a packed key's low bits are one token."""
    return torch.remainder((keys * 0x5851F42D4C957F2D) >> 32, world_size)


def owners_counts(items: torch.Tensor, vocab_size: int, rt: Runtime, audit_keys: torch.Tensor,
                  audit_chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """earlier_chunk_counts of this rank's rows by their contexts' owners, and its audit counts (A, V); all join."""
    owned = items
    if rt.distributed:
        dest = context_owners(items[:, 0], rt.world_size)
        by_dest = torch.sort(dest, stable=True).indices  # stable: each owner gets a sender's rows in chunk order
        sent = torch.bincount(dest, minlength=rt.world_size)
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent)
        sent, received = sent.tolist(), received.tolist()
        owned = items.new_empty((sum(received), items.size(1)))
        dist.all_to_all_single(owned, items[by_dest], received, sent)
        answers = items.new_empty((items.size(0), 2))
        dist.all_to_all_single(answers, earlier_chunk_counts(owned, vocab_size), sent, received)
        counts = torch.empty_like(answers).index_copy_(0, by_dest, answers)
    else:
        counts = earlier_chunk_counts(items, vocab_size)
    near = owned[torch.isin(owned[:, 0], audit_keys)]  # an owner holds every row of its contexts
    keys, tokens, chunks, weights = near.t().contiguous()
    sorted_keys, by_key = torch.sort(audit_keys)  # each near row meets every audit position of its context at once
    first = torch.searchsorted(sorted_keys, keys)
    count = torch.searchsorted(sorted_keys, keys, right=True) - first
    row = torch.repeat_interleave(count)
    a = by_key[first[row] + torch.arange(row.numel(), device=row.device) - (torch.cumsum(count, 0) - count)[row]]
    use = chunks[row] < audit_chunks[a]
    audit_rows = torch.zeros(audit_keys.numel(), vocab_size, dtype=torch.float64, device=items.device)
    audit_rows.view(-1).index_add_(0, (a * vocab_size + tokens[row])[use], weights[row][use].double())
    return counts, audit_rows


def score_first_counts(val_tokens: torch.Tensor, orders: Sequence[int], vocab_size: int, chunk_tokens: int,
                       targets: torch.Tensor, rt: Runtime, audit_targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(c(ctx_t, x_t), T(ctx_t) before t's chunk, available) (n, K) of sorted targets, audit rows (A, K, V); exact."""
    V, K = vocab_size, len(orders)
    stats = torch.zeros(targets.numel(), K, 2, dtype=torch.int64, device=targets.device)
    available = torch.stack([targets >= order - 1 for order in orders], 1)
    audit_chunks = (audit_targets - 1) // chunk_tokens
    audit_rows = []
    for i, order in enumerate(orders):
        items, where = cache_items(val_tokens, targets[available[:, i]], order, V, chunk_tokens)
        audit_keys = torch.where(audit_targets >= order - 1, context_keys_from(  # short context: -1, matches none
            lambda k: val_tokens[(audit_targets - 1 - k).clamp(min=0)], audit_targets, order, V), -1)
        counts, rows = owners_counts(items, V, rt, audit_keys, audit_chunks)
        stats[available[:, i], i] = counts if where is None else counts[where]
        audit_rows.append(rows)
    audit_rows = torch.stack(audit_rows, 1)
    if rt.distributed and audit_targets.numel():
        dist.all_reduce(audit_rows)
    return stats[..., 0], stats[..., 1], available, audit_rows


@torch.no_grad()
def cache_pass(scores: NeuralScores, val_tokens: torch.Tensor, cfg: Hyperparameters, rt: Runtime,
               audit: AuditStats) -> torch.Tensor:
    """-ln q (n,) float64, each target mixed with the cache before its chunk (score-first, rule 4); all ranks join."""
    C, hedge, prior = cfg.ngram_chunk_tokens, cfg.use_mixer == "hedge", None
    audit_targets = torch.unique(audit.targets)
    counts, totals, available, rows = score_first_counts(val_tokens, cfg.ngram_orders, cfg.vocab_size, C,
                                                         scores.targets, rt, audit_targets)
    if hedge:
        probs = hedge_expert_probs(counts, totals, cfg.vocab_size)
        chunk = (scores.targets - 1) // C
        num_chunks = (val_tokens.numel() - 2) // C + 1
        losses = torch.zeros(num_chunks, 1 + probs.size(1), dtype=torch.float64, device=probs.device)
        losses.index_add_(0, chunk, -torch.cat((scores.logprob[:, None], probs.log()), 1))  # (chunks, 1+K)
        if rt.distributed:
            dist.all_reduce(losses)
        seen_loss = F.pad(torch.cumsum(losses, 0)[:-1], (0, 0, 1, 0))  # cumsum - own loss would leak rounding
        K = len(cfg.ngram_orders)  # start: HEDGE_PRIOR_NEURAL on the neural model, the rest shared by the n-grams
        start = torch.tensor([HEDGE_PRIOR_NEURAL] + [(1 - HEDGE_PRIOR_NEURAL) / K] * K, dtype=torch.float64)
        log_w = start.to(probs.device).log() - cfg.mixer_eta * seen_loss
        weights = log_w[chunk].softmax(-1)
        valid = torch.ones_like(available)
    elif scores.targets.numel():
        valid = available & (totals > 0)
        probs, prior = ngram_expert_probs(counts, totals, valid, cfg.ngram_prior_beta)
        weights = mixer_weights(scores.mixer_logits, valid)
    else:  # nothing scored here: no mixer logits to weigh
        return torch.zeros(0, dtype=torch.float64, device=val_tokens.device)
    nll = mixture_nll(scores.logprob, weights.double(), probs, prior)
    for i in torch.isin(scores.targets, audit_targets).nonzero().squeeze(1).tolist():
        t = int(scores.targets[i])
        q = materialized_mixture(scores.audit_rows[t], rows[torch.searchsorted(audit_targets, t)],
                                 valid[i].tolist(), weights[i], hedge, cfg.ngram_prior_beta)
        audit.add(t, q, int(val_tokens[t]), float(nll[i]))
    return nll


@torch.no_grad()
def evaluate_sliding_mixed(eval_outputs, val_tokens: torch.Tensor, tables: TokenByteTables, cfg: Hyperparameters,
                           rt: Runtime, log, audit: AuditStats | None = None, neural_scores=None,
                           phases: dict[str, float] | None = None) -> tuple[EvalResult, EvalResult | None]:
    """(neural, n-gram mixed or None); neural_scores(audit_targets) replaces neural_pass (TTT); `phases` gains ms."""
    phases = {"neural": 0.0, "ttt_train": 0.0, "cache": 0.0} if phases is None else phases
    t0, trained = rt.synced_time(), phases["ttt_train"]
    if audit is None:  # NGRAM_AUDIT_POSITIONS targets from the seed, the same on every rank; no cache: none
        drawn = torch.randint(1, val_tokens.numel(), (cfg.ngram_audit_positions if cfg.ngram_orders else 0,),
                              generator=torch.Generator().manual_seed(cfg.seed))
        audit = AuditStats(drawn.to(val_tokens.device))
    neural_scores = neural_scores or (lambda targets: neural_pass(eval_outputs, val_tokens, tables, cfg, rt, targets))
    scores = neural_scores(audit.targets)
    phases["neural"] += 1000 * (rt.synced_time() - t0) - (phases["ttt_train"] - trained)
    t0 = time.perf_counter()
    neural = _eval_result([(-scores.logprob, scores.nbytes)], val_tokens.device, rt)
    if cfg.use_mixer == "none":
        return neural, None
    mixed = _eval_result([(cache_pass(scores, val_tokens, cfg, rt, audit), scores.nbytes)], val_tokens.device, rt)
    phases["cache"] += 1000 * (time.perf_counter() - t0)
    if audit.targets.numel():
        sum_error, neg_min_prob, target_diff = agreed_max([audit.worst_sum_error, -audit.min_prob,
                                                           audit.worst_target_diff], rt)
        positions = torch.tensor(float(audit.positions), dtype=torch.float64, device=val_tokens.device)
        if rt.distributed:
            dist.all_reduce(positions)
        log(f"ngram_audit positions:{int(positions)} worst_abs_sum_minus_1:{sum_error:.3e} "
            f"min_prob:{-neg_min_prob:.3e} worst_target_diff:{target_diff:.3e}")
    return neural, mixed


def log_final(log: RunLog, name: str, result: EvalResult, eval_ms: float) -> None:
    log(f"{name} val_loss:{result.val_loss:.4f} val_bpb:{result.val_bpb:.4f} eval_time:{eval_ms:.0f}ms "
        f"scored_tokens:{result.scored_tokens} scored_bytes:{result.scored_bytes}")
    log(f"{name}_exact val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f}")


# =============================================================================
# MAIN
# =============================================================================


def runtime_device(env: Mapping[str, str], local_rank: int) -> torch.device:
    """CUDA where it works, else the CPU; a node with NVIDIA devices but failing CUDA is refused (8 idle paid ranks)."""
    wanted = env.get("DEVICE", "auto").strip()
    if wanted not in DEVICES:
        raise ConfigError(f"DEVICE={wanted!r} is not allowed: {' or '.join(DEVICES)}")
    if wanted != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    hidden, nvidia = env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"), sorted(glob.glob("/dev/nvidia[0-9]*"))
    if wanted == "cuda" or (wanted == "auto" and not hidden and nvidia):
        raise ConfigError(f"DEVICE={wanted} is not allowed here: CUDA is not available on this machine, although "
                          f"it has NVIDIA devices ({', '.join(nvidia) or 'none found'}); fix the "
                          "driver or the torch build (a CPU wheel?), or set DEVICE=cpu to run on the CPU")
    return torch.device("cpu")


def init_runtime(env: Mapping[str, str]) -> Runtime:
    """Joins torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK; absent: one process): NCCL on CUDA, else gloo."""
    rank, world_size = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    local_rank, local_world = int(env.get("LOCAL_RANK", "0")), int(env.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = runtime_device(env, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return Runtime(rank, world_size, local_rank, device, local_world_size=local_world)


WRAPPER_HEAD = b'import lzma,base64;exec(lzma.decompress(base64.b85decode(b"'
WRAPPER_TAIL = b'")))\n'  # code counts as this wrapper of the source, as in the records (PR #1530 on)


def self_extracting_wrapper(source: bytes) -> bytes:
    """The counted train_gpt.py for `source`; deterministic (xz at a fixed preset records no time or name)."""
    return WRAPPER_HEAD + base64.b85encode(lzma.compress(source, preset=9 | lzma.PRESET_EXTREME)) + WRAPPER_TAIL


def wrapped_source(script: bytes) -> bytes:
    """The source a script runs: what a wrapper unpacks, or the script itself."""
    packed = script[len(WRAPPER_HEAD):-len(WRAPPER_TAIL)]
    return lzma.decompress(base64.b85decode(packed)) if script.startswith(WRAPPER_HEAD) else script


@functools.lru_cache(maxsize=1)
def script_identity() -> tuple[str, int]:
    """(sha256 of the running source, bytes of its self-extracting wrapper), whether run readable or wrapped."""
    source = wrapped_source(Path(__file__).read_bytes())
    return hashlib.sha256(source).hexdigest(), len(self_extracting_wrapper(source))


def built_artifact(model: GPT, cfg: Hyperparameters, rt: Runtime, log) -> bytes:
    """The artifact's bytes (see QUANTIZATION AND PACKING): calibration, GPTQ, size fitting, packing, the fitting
    ending its tries within GPTQ_RESERVE_SECONDS of the start (it counts against the training budget)."""
    calib, t0 = None, time.perf_counter()
    deadline = t0 + cfg.gptq_reserve_seconds if cfg.max_wallclock_seconds else None
    if cfg.gptq:  # self-generated (the records'): no data read after training, none of validation's ever
        with rt.autocast():
            calib = selfgen_calibration_tokens(model, cfg.gptq_calib_seqs, cfg.gptq_calib_seq_len, cfg.seed)
        log(f"gptq_calibration source:selfgen seqs:{cfg.gptq_calib_seqs} seq_len:{cfg.gptq_calib_seq_len} "
            f"time:{1000 * (rt.synced_time() - t0):.0f}ms")
    return fit_artifact(model, cfg, script_identity()[1], log, calib, deadline)[0]


def rank0_artifact(model: GPT, cfg: Hyperparameters, rt: Runtime, log) -> bytes:
    """The artifact on every rank, built once by rank 0 with all the cores; an ArtifactError there stops every rank."""
    outcome, threads = [None, None], torch.get_num_threads()  # outcome: blob, error
    if rt.is_main:
        try:
            if rt.device.type == "cpu":  # the other ranks on this machine only wait
                torch.set_num_threads(threads * rt.local_world_size)
            outcome[0] = built_artifact(model, cfg, rt, log)
        except ArtifactError as err:
            outcome[1] = str(err)
        finally:
            torch.set_num_threads(threads)
    if rt.distributed:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise ArtifactError(outcome[1])
    return outcome[0]


def save_artifact(model: GPT, cfg: Hyperparameters, rt: Runtime, log, train_ms: float) -> Path:
    """Writes artifacts/<RUN_ID>.pgqw; returns its path. Its time counts against MAX_WALLCLOCK_SECONDS (as training)."""
    t0, path = time.perf_counter(), Path("artifacts") / f"{cfg.run_id}.pgqw"
    blob = rank0_artifact(model, cfg, rt, log)
    if rt.is_main:
        write_artifact(path, blob)
    if rt.distributed:
        dist.barrier()
    artifact_ms = 1000 * (time.perf_counter() - t0)
    log(f"artifact_saved path:{path} bytes:{len(blob)} time:{artifact_ms:.0f}ms")
    phase_ms = train_ms + artifact_ms
    log(f"training_phase train_time:{train_ms:.0f}ms artifact_time:{artifact_ms:.0f}ms total:{phase_ms:.0f}ms")
    if cfg.max_wallclock_seconds and phase_ms > 1000 * cfg.max_wallclock_seconds:
        log(f"warning: training and artifact took {phase_ms / 1000:.1f}s, over MAX_WALLCLOCK_SECONDS="
            f"{cfg.max_wallclock_seconds:g}: raise TRAIN_RESERVE_SECONDS")
    return path


def compiled_functions(model: GPT, cfg: Hyperparameters, rt: Runtime) -> tuple:
    """(training module (DDP with several ranks), TTT's forward, token_nll, eval_outputs), compiled with COMPILE=1."""
    compiled = functools.partial(torch.compile, dynamic=False) if cfg.compile else lambda f: f
    # DDP inside compile: each bucket's all-reduce overlaps the backward. The only buffer (rotary table) is constant.
    train_model = model if not rt.distributed else nn.parallel.DistributedDataParallel(
        model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None, broadcast_buffers=False,
        gradient_as_bucket_view=True)
    return compiled(train_model), compiled(model), compiled(model.token_nll), compiled(model.eval_outputs)


def run(cfg: Hyperparameters, rt: Runtime, log: RunLog) -> EvalResult:
    """Trains and writes the artifact (or takes EVAL_ARTIFACT's), then scores the artifact alone."""
    torch.manual_seed(cfg.seed)  # numpy's global generator draws nothing: the stream has its own
    val_tokens, tables = validation_split(cfg)
    val_tokens, tables = val_tokens.to(rt.device), tables.to(rt.device)
    log(f"val_tokens:{val_tokens.numel()} bytes_from:{'tokenizer' if tables.sidecar is None else 'sidecar'}")
    model = GPT(cfg).to(rt.device)
    log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    train_model, ttt_forward, token_nll, eval_outputs = compiled_functions(model, cfg, rt)
    def plain_val() -> EvalResult:
        model.eval()
        val = evaluate_plain(token_nll, val_tokens, tables, cfg.eval_seq_len, eval_batch_tokens(cfg, rt.world_size), rt)
        model.train()
        return val
    path = cfg.eval_artifact
    if not path:
        files = shard_files(cfg.data_path, "train")
        load_shard(files[0], cfg.vocab_size)  # ids beyond the tokenizer stop the run now, not mid-training
        log(f"train_shards:{len(files)}")
        result = train(model, train_model, cfg, rt, log, plain_val)
        log(f"train_done steps:{result.steps} train_time:{result.train_time_ms:.0f}ms "
            f"step_avg:{result.train_time_ms / max(result.steps, 1):.2f}ms recompiles:{result.recompiles}")
        prequant = plain_val()
        log(f"prequant_plain val_loss:{prequant.val_loss:.8f} val_bpb:{prequant.val_bpb:.8f}")
        path = save_artifact(model, cfg, rt, log, result.train_time_ms)
    blob = Path(path).read_bytes()
    dequantize_into(model, unpack_artifact(blob))  # every weight: what is evaluated is the artifact alone
    log(f"artifact_loaded path:{path} bytes:{len(blob)} sha256:{hashlib.sha256(blob).hexdigest()}")
    code_bytes = script_identity()[1]  # what counts: this script's wrapper and the artifact scored
    log(f"Total submission size quantized+{cfg.compressor}: {code_bytes + len(blob)} bytes "
        f"(code {code_bytes}, artifact {len(blob)})")
    return evaluate_final(model, token_nll, eval_outputs, val_tokens, tables, cfg, rt, log, ttt_forward)


def evaluate_final(model: GPT, token_nll, eval_outputs, val_tokens: torch.Tensor, tables: TokenByteTables,
                   cfg: Hyperparameters, rt: Runtime, log, train_forward=None,
                   phases: dict[str, float] | None = None) -> EvalResult:
    """Logs final plain, sliding (TTT) and mixed lines, the score last, then eval_phases (slowest rank's ms)."""
    train_forward = model if train_forward is None else train_forward
    phases = {} if phases is None else phases
    phases.update(compile_warmup=0.0, plain=0.0, neural=0.0, ttt_train=0.0, cache=0.0)
    adapters = DocAdapters(model, cfg, rt.device) if cfg.ttt_enabled else None  # compiled and run: the same tensors
    if cfg.compile:
        phases["compile_warmup"] = warm_up_evaluation(model, token_nll, eval_outputs, train_forward, adapters, cfg,
                                                       rt, log)
    model.eval()
    compiles, start = compile_count(), rt.synced_time()
    plain = evaluate_plain(token_nll, val_tokens, tables, cfg.eval_seq_len, eval_batch_tokens(cfg, rt.world_size), rt)
    phases["plain"] = 1000 * (rt.synced_time() - start)
    log_final(log, "final_plain", plain, phases["plain"])
    t0 = time.perf_counter()
    name = "final_lora_ttt" if cfg.ttt_enabled else "final_sliding_window"
    ttt_scores = lambda audit_targets: lora_neural_pass(model, eval_outputs, train_forward, adapters, val_tokens,
                                                        tables, cfg, rt, audit_targets, log, start, phases)
    neural, mixed = evaluate_sliding_mixed(eval_outputs, val_tokens, tables, cfg, rt, log,
                                           neural_scores=ttt_scores if cfg.ttt_enabled else None, phases=phases)
    elapsed = 1000 * (rt.synced_time() - t0)
    log_final(log, name, neural, elapsed)
    if mixed is not None:
        log_final(log, f"{name}_ngram_{cfg.use_mixer}", mixed, elapsed)
    eval_s = time.perf_counter() - start
    if eval_s > cfg.eval_budget_seconds:
        log(f"warning: evaluation took {eval_s:.1f}s, over EVAL_BUDGET_SECONDS={cfg.eval_budget_seconds:g}")
    phases.update(zip(phases, agreed_max(list(phases.values()), rt)))
    log(f"eval_phases {' '.join(f'{name}:{ms:.0f}ms' for name, ms in phases.items())}")
    log(f"eval_done eval_time:{1000 * eval_s:.0f}ms recompiles:{compile_count() - compiles}")
    return neural if mixed is None else mixed


def warm_up_evaluation(model: GPT, token_nll, eval_outputs, train_forward, adapters: DocAdapters | None,
                       cfg: Hyperparameters, rt: Runtime, log) -> float:
    """Compiles what evaluation calls, in each of its padded shapes, before the clock; returns ms. TTT takes no step:
    the adapters' gradients are dropped (they are reset at every batch) and global SGD's too."""
    t0, compiles = time.perf_counter(), compile_count()
    generator = torch.Generator().manual_seed(0)
    L, S = cfg.eval_seq_len, cfg.eval_stride
    rows = eval_batch_rows(eval_batch_tokens(cfg, rt.world_size), L)
    tokens = torch.randint(0, cfg.vocab_size, (rows, L + 1), generator=generator).to(rt.device)  # as val_tokens[index]
    positions = torch.arange(L - S, L, device=rt.device).repeat(rows, 1)  # the predictions a window scores
    model.eval()
    with torch.no_grad(), rt.autocast():
        token_nll(tokens[:, :-1], tokens[:, 1:])
        eval_outputs(tokens[:, :-1], positions)
    for width in lora_widths(cfg) if adapters is not None else ():  # the LoRA steps' forward and backward
        set_trainable(model, [])
        tokens = torch.randint(0, cfg.vocab_size, (cfg.ttt_batch_size, width), generator=generator).to(rt.device)
        positions = torch.arange(width - cfg.ttt_chunk_size, width, device=rt.device).repeat(cfg.ttt_batch_size, 1)
        with adapters.attached(), torch.enable_grad(), rt.autocast():
            eval_outputs(tokens, positions)[0].sum().float().backward()
        for p in adapters.params:
            p.grad = None
    if adapters is not None and cfg.phased_ttt_num_phases:
        rows = -(-cfg.global_ttt_batch_seqs // rt.world_size)  # as global_sgd's
        seqs = torch.randint(0, cfg.vocab_size, (rows, cfg.eval_seq_len + 1), generator=generator).to(rt.device)
        set_trainable(model, global_parameters(model))
        model.train()
        with rt.autocast():
            loss = train_forward(*ttt_rank_batch(seqs, torch.arange(rows, device=rt.device), rows))
        loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()
    model.requires_grad_(True)
    warmup_ms = 1000 * (rt.synced_time() - t0)
    log(f"compile_warmup phase:eval graphs:{compile_count() - compiles} time:{warmup_ms:.0f}ms")
    return warmup_ms


def main(job=None, log_suffix: str = "") -> int:
    """Trains and evaluates, or runs job(cfg, rt, log) -> exit status (preflight; logs/<RUN_ID><log_suffix>.txt)."""
    rt = None
    try:
        if job is None and os.environ.get("PREFLIGHT", "0").strip() not in ("", "0"):
            raise ConfigError("PREFLIGHT=1 is not allowed here: the preflight is its own script, run with the same "
                              "settings: torchrun --standalone --nproc_per_node=8 scripts/preflight.py")
        rt = init_runtime(os.environ)
        cfg = hyperparameters_from_env(os.environ, rt.device.type == "cuda")
        rt = dataclasses.replace(rt, bf16=cfg.bf16)
        grad_accum_steps_for(cfg, rt.world_size)
        log = RunLog(Path("logs") / f"{cfg.run_id}{log_suffix}.txt" if rt.is_main else None)
        sha, code_bytes = script_identity()
        log(f"script:{Path(__file__).name} script_sha256:{sha} code_bytes:{code_bytes}")
        device_name = (torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda"
                       else platform.processor() or "cpu")
        log(f"torch_version:{torch.__version__} python:{platform.python_version()} device:{rt.device.type} "
            f"world_size:{rt.world_size} hardware:{rt.world_size}x{device_name.replace(' ', '_')}")
        for line in cfg.as_log_lines() + unknown_setting_warnings(os.environ, cfg):
            log(line)
        if job is not None:
            return job(cfg, rt, log)
        run(cfg, rt, log)
        return 0
    except (ConfigError, ShardError, ArtifactError) as err:
        if (rt.rank if rt else int(os.environ.get("RANK", "0"))) == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            gc.collect()  # free DDP's reducer cycles: gloo torn down at exit aborts (SIGABRT, 1 run in 3)
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
