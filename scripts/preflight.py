"""The preflight: measures this machine with a run's settings for about a minute and projects the run
against its budgets, before it is paid for. Same launch and environment as the run:

    torchrun --standalone --nproc_per_node=8 scripts/preflight.py     # exit 0: every budget ok; 3: over
    python3 scripts/preflight.py                                      # one process

It runs the oracle's prefill on a slice of its text, PREFLIGHT_STEPS real training steps (real batches,
oracle lookups, CROWN-Q, EMA, compiled as the run compiles), one artifact build from those weights, and the
evaluation of a slice of the validation split from that artifact, then logs one row per budget to
logs/<RUN_ID>_preflight.txt. Nothing is kept: no artifact is written, the run's own log is not touched, and
no score line is printed (a slice's scores mean nothing). It lives outside train_gpt.py so that its code
is not counted in the artifact's bytes.
"""
import argparse
import dataclasses
import math
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

PREFLIGHT_STEPS, PREFLIGHT_SKIP = 20, 5  # steps run; the first ones (allocator, DDP buckets) are not timed
PREFLIGHT_ORACLE_TOKENS = 2_000_000
PREFLIGHT_EVAL_TOKENS = 262_144
PREFLIGHT_OVER_STATUS = 3  # exit status of a preflight that finds a budget over
PREFLIGHT_QUIET = ("val_bpb", "Total submission size")  # lines of the inner run not repeated


@dataclass
class PreflightRow:
    """One line of the table: what was measured, the projection for the run, its budget (None: none)."""
    name: str
    measured: str
    projected: float
    budget: float | None
    unit: str = "s"  # "s", "GB" (a figure in bytes) or "" (a count)

    @property
    def over(self) -> bool:
        return self.budget is not None and self.projected > self.budget

    def line(self) -> str:
        fmt = {"s": lambda v: f"{v:.1f}s", "GB": lambda v: f"{v / 1e9:.2f}GB"}.get(self.unit, lambda v: f"{v:.0f}")
        budget = "none" if self.budget is None else fmt(self.budget)
        return (f"preflight_{self.name} {self.measured} projected:{fmt(self.projected)} budget:{budget} "
                f"status:{'over' if self.over else 'ok'}")


def peak_memory_bytes(rt: tg.Runtime) -> tuple[int, int]:
    """(device peak allocated, host peak resident) bytes of this process so far; the CPU's device is the host."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return (torch.cuda.max_memory_allocated(rt.device) if rt.device.type == "cuda" else host), host


def current_memory_bytes(rt: tg.Runtime) -> int:
    if rt.device.type == "cuda":
        return torch.cuda.memory_allocated(rt.device)
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sort_scaled(seconds: float, measured: int, full: int) -> float:
    """A sort-bound time measured on `measured` items, at `full` items (n log n)."""
    if full <= measured or measured < 2:
        return seconds * full / max(measured, 1)
    return seconds * full / measured * math.log(full) / math.log(measured)


def preflight_step_ms(model: tg.GPT, train_model: nn.Module, cfg: tg.Hyperparameters, rt: tg.Runtime, oracle, log,
                      lines: list[str]) -> tuple[float, int]:
    """(milliseconds per training step, graphs compiled while timing) from PREFLIGHT_STEPS real steps,
    the first PREFLIGHT_SKIP not counted. No warm-up in the schedule, so that the CROWN-Q penalty (on in
    the warm-down) is in every step, as it is in the run's last steps; looped from the first step (the
    slower pace and the higher peak of a run with NUM_LOOPS, so its projected steps are a floor)."""
    short = dataclasses.replace(cfg, iterations=PREFLIGHT_STEPS, lr_warmup_steps=0, max_wallclock_seconds=0.0,
                                val_loss_every=0, train_log_every=1, enable_looping_at=0.0)
    result = tg.train(model, train_model, short, rt, log, oracle=oracle)
    times = [float(t) for t in re.findall(r"^step:\d+/\d+ train_loss:\S+ train_time:(\S+)ms", "\n".join(lines),
                                          re.M)]
    return (times[-1] - times[PREFLIGHT_SKIP - 1]) / (len(times) - PREFLIGHT_SKIP), result.recompiles


def preflight(cfg: tg.Hyperparameters, rt: tg.Runtime, log, eval_tokens: int = PREFLIGHT_EVAL_TOKENS) -> bool:
    """Runs the checks and measurements described above, evaluating a slice of at least `eval_tokens`
    validation tokens; logs the table and the verdict; True if every projection is within its budget."""
    t_start, lines, rows = time.perf_counter(), [], []

    def inner(line: str) -> None:  # the measured work's own lines, less those that look like a run's result
        lines.append(line)
        if not any(quiet in line for quiet in PREFLIGHT_QUIET):
            log(line)

    val_tokens, tables = tg.validation_split(cfg)  # the run's checks, at the same point
    val_tokens, tables = val_tokens.to(rt.device), tables.to(rt.device)
    files = tg.shard_files(cfg.data_path, "train")
    train_tokens = sum(tg.shard_token_count(f) for f in files)
    log(f"preflight_data train_shards:{len(files)} train_tokens:{train_tokens} val_tokens:{val_tokens.numel()} "
        f"tokenizer:{Path(cfg.tokenizer_path).name}")
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg).to(rt.device)
    train_model, ttt_forward, token_nll, eval_outputs = tg.compiled_functions(model, cfg, rt)

    oracle, oracle_s, oracle_tokens = None, 0.0, min(cfg.ngram_oracle_tokens, train_tokens)
    base, prefill_peak, stored = current_memory_bytes(rt), 0, 0
    if model.mixer_head is not None:
        if rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)
        rt.synchronize()
        t0 = time.perf_counter()
        oracle = tg.build_oracle(dataclasses.replace(cfg, ngram_oracle_tokens=min(oracle_tokens, PREFLIGHT_ORACLE_TOKENS)),
                              rt, files)
        rt.synchronize()
        oracle_s = sort_scaled(time.perf_counter() - t0, oracle.counted_tokens, oracle_tokens)
        scale = oracle_tokens / max(oracle.counted_tokens, 1)
        prefill_peak = base + scale * max(peak_memory_bytes(rt)[0] - base, 0)
        stored = (scale - 1) * oracle.nbytes()  # what the full oracle holds beyond the slice's
        rows.append(PreflightRow("oracle", f"tokens:{oracle.counted_tokens} bytes:{oracle.nbytes()}", oracle_s, None))

    step_ms, recompiles = preflight_step_ms(model, train_model, cfg, rt, oracle, inner, lines)
    step_ms, oracle_s = tg.agreed_max([step_ms, oracle_s], rt)
    stop_s = cfg.max_wallclock_seconds - cfg.gptq_reserve_seconds if cfg.max_wallclock_seconds else None
    steps = cfg.iterations if stop_s is None else min(cfg.iterations, max(0, int((stop_s - oracle_s) * 1000 / step_ms)))
    rows.append(PreflightRow("steps", f"step_avg:{step_ms:.2f}ms recompiles:{recompiles}", steps, None, unit=""))
    train_peak = peak_memory_bytes(rt)

    t0 = time.perf_counter()
    try:
        blob = tg.rank0_artifact(model, cfg, rt, inner)  # as the run builds it: rank 0 alone
        size = f"total_bytes:{tg.script_identity()[1] + len(blob)}"
        tg.dequantize_into(model, tg.unpack_artifact(blob))  # the evaluation below scores the artifact, as the run does
    except tg.ArtifactError as err:
        blob, size = None, "fits:0"
        log(f"preflight_artifact error: {err}")
    artifact_s = tg.agreed_max([time.perf_counter() - t0], rt)[0]
    reserve = cfg.gptq_reserve_seconds if cfg.max_wallclock_seconds else None
    tries = sum(line.startswith("artifact_try") for line in lines)
    rows.append(PreflightRow("artifact", f"tries:{tries} {size} target_bytes:{cfg.target_bytes}", artifact_s, reserve))
    train_s = oracle_s + steps * step_ms / 1000 + artifact_s
    rows.append(PreflightRow("training_phase", f"oracle:{oracle_s:.1f}s steps:{steps} artifact:{artifact_s:.1f}s",
                             train_s, cfg.max_wallclock_seconds or None))

    part = val_tokens[:max(eval_tokens, 2 * cfg.ngram_chunk_tokens + 1 if cfg.ngram_orders else 2)]
    docs, part_docs = tg.document_spans(val_tokens), tg.document_spans(part)
    # the run's phases train on the documents before each phase's end; the slice's, with the prefix scaled
    # to half its documents, are timed as a rate per trained token
    short = dataclasses.replace(cfg, phased_ttt_prefix_docs=min(cfg.phased_ttt_prefix_docs, len(part_docs) // 2))
    trained, to_train = (sum(d[b - 1][1] for b in tg.ttt_segments(len(d), c)[1]) if cfg.ttt_enabled else 0
                         for d, c in ((part_docs, short), (docs, cfg)))
    phases: dict[str, float] = {}
    tg.evaluate_final(model, token_nll, eval_outputs, part, tables, short, rt, inner, ttt_forward, phases)
    full, n = val_tokens.numel() - 1, part.numel() - 1
    ttt_s = phases["ttt_train"] / 1000 / max(trained, 1) * to_train
    scoring_s = (phases["plain"] + phases["neural"]) / 1000 * full / n + sort_scaled(phases["cache"] / 1000, n, full)
    measured = " ".join(f"{k}:{v / 1000:.3f}s" for k, v in phases.items())  # ms shown: tiny slices are quick
    lora = f"documents:{len(docs)} phase_tokens:{to_train} " if cfg.ttt_enabled else ""
    rows.append(PreflightRow("evaluation", f"tokens:{n} {lora}{measured} phases_projected:{ttt_s:.3f}s",
                             scoring_s + ttt_s, cfg.eval_budget_seconds))
    if rows[-1].over and cfg.ttt_enabled:
        log(f"preflight_note LoRA TTT projects {scoring_s + ttt_s:.0f}s: its guard would stop it after about "
            f"{cfg.eval_budget_seconds / (scoring_s + ttt_s):.0%} of the split and score the rest with the sliding "
            f"window (TTT_ENABLED=0 projects the sliding window alone)")

    device_peak, host_peak = tg.agreed_max([max(train_peak[0] + stored, prefill_peak), peak_memory_bytes(rt)[1]], rt)
    if rt.device.type == "cuda":
        rows.append(PreflightRow("device_memory", "peak_allocated", device_peak,
                                 torch.cuda.get_device_properties(rt.device).total_memory, unit="GB"))
    else:
        host_peak = max(host_peak, device_peak)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // rt.local_world_size
    rows.append(PreflightRow("host_memory", f"peak_resident processes_here:{rt.local_world_size}", host_peak, physical,
                             unit="GB"))
    for row in rows:
        log(row.line())
    over = [row.name for row in rows if row.over] + ([] if blob is not None else ["artifact_size"])
    log(f"preflight verdict:{'over over:' + ','.join(over) if over else 'ok'} time:{time.perf_counter() - t_start:.0f}s")
    return not over


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-tokens", type=int, default=PREFLIGHT_EVAL_TOKENS,
                        help=f"validation tokens the evaluation slice holds at least (default {PREFLIGHT_EVAL_TOKENS:,})")
    args = parser.parse_args()
    if args.eval_tokens < 2:
        parser.error(f"--eval-tokens {args.eval_tokens} is not allowed: at least 2")
    return tg.main(lambda cfg, rt, log: 0 if preflight(cfg, rt, log, args.eval_tokens) else PREFLIGHT_OVER_STATUS,
                   "_preflight")


if __name__ == "__main__":
    sys.exit(main())
