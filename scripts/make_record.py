"""make_record.py: a records/ submission folder from the logs of one run per seed.

    python3 scripts/make_record.py logs/seed1.txt logs/seed2.txt logs/seed3.txt \\
        --name 11L_NgramMixer --author "Ada Lovelace" --github-id ada --track 10min_16mb \\
        --blurb "11-layer GPT with a learned n-gram mixer" \\
        [--baseline records/track_10min_16mb/2026-03-25_Previous/submission.json] \\
        [--script train_gpt.py] [--date YYYY-MM-DD] [--records-dir records] [--force]

Writes records/track_<track>/<date>_<name>/ (CONVENTIONS.md, "Records folder"): train_gpt.py, the
self-extracting wrapper (lzma + base85 behind one exec line) whose size the logs counted as
code_bytes, and beside it train_gpt_readable.py, the exact source it runs, which wrote the logs; the
logs as train_seed<SEED>.log, submission.json, README.md (what it is, results per seed with mean and
std, settings that differ from the script's defaults, the command that reproduces each seed) and the
repository's requirements.txt. --script is the readable source or a wrapper of it: either is taken
(a wrapper is unpacked with train_gpt's wrapped_source). With --baseline it adds the improvement over
that submission and a one-sided Welch t-test on per-seed val_loss, and says whether the record rule
(at least 0.005 nats better at p < 0.01) is met.

Refused, with one `error: ...` line and exit code 2, and nothing written: a log that is not a
finished train_gpt.py run or has no size line; logs from different scripts, or a --script whose
source's sha256 is not the logs' script_sha256; a wrapper that does not unpack to that source byte
for byte, or whose size is not the logs' code_bytes (a log from a script that counted code another
way); two logs of the same seed; code + artifact over 16,000,000 bytes; on the 10min_16mb track,
training (train_done + artifact_saved) or evaluation (eval_done) over 600 s; an existing folder
without --force. The folder is built under a temporary sibling name and renamed into place at the
end, so a refusal or a crash leaves no half-written folder.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from run_log import LogError, RunSummary, parse_log  # noqa: E402  (needs scripts/ on sys.path)

TRACKS = ("10min_16mb", "non_record_16mb")
RECORD_TRACK = "10min_16mb"
MAX_TOTAL_BYTES = 16_000_000
MAX_TRAIN_MS = 600_000
MAX_EVAL_MS = 600_000
MIN_IMPROVEMENT_NATS = 0.005
MAX_P_VALUE = 0.01
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
CODE_FILE = "train_gpt.py"  # the counted self-extracting wrapper
READABLE_FILE = "train_gpt_readable.py"  # the source it runs


class RecordError(Exception):
    """A submission that must not be written; the message is the one line the user sees."""


# =============================================================================
# STATISTICS (numpy-free, scipy-free: the record rule must be checkable anywhere)
# =============================================================================

def mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def sample_std(values: list[float]) -> float | None:
    """Standard deviation with n - 1 in the denominator; None for fewer than 2 values."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """1 / (1 + d1 / (1 + d2 / (1 + ...))), the continued fraction of I_x(a, b) (Abramowitz and
    Stegun 26.5.8), evaluated front to back with the modified Lentz method."""
    tiny, eps = 1e-300, 1e-15
    f, c, d = tiny, tiny, 0.0
    for j in range(1, 20_000):
        if j == 1:
            numerator = 1.0
        elif j % 2 == 0:  # d_(2m+1), m = (j - 2) / 2
            m = (j - 2) // 2
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # d_(2m), m = (j - 1) / 2
            m = (j - 1) // 2
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < eps:
            return f
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"incomplete beta needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    # The fraction converges quickly only below this point; above it, I_x(a, b) = 1 - I_(1-x)(b, a).
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    log_front = (a * math.log(x) + b * math.log1p(-x) - math.log(a)
                 - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)))
    return math.exp(log_front) * _beta_continued_fraction(a, b, x)


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` (any positive real) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    upper_tail = 0.5 * regularized_incomplete_beta(df / 2, 0.5, df / (df + t * t))  # P(T > |t|)
    return upper_tail if t >= 0 else 1.0 - upper_tail


@dataclass(frozen=True)
class WelchTest:
    """Welch's t-test of `baseline mean > ours mean`; t, df and p are None when it is undefined."""
    t: float | None
    df: float | None
    p_value: float | None
    undefined_because: str = ""


def welch_t_test(ours: list[float], baseline: list[float]) -> WelchTest:
    """One-sided Welch t-test that our values are lower than the baseline's (unequal variances)."""
    if len(ours) < 2 or len(baseline) < 2:
        return WelchTest(None, None, None, f"undefined with {len(ours)} seed(s) of ours and {len(baseline)} of "
                                            f"the baseline: each side needs at least 2 seeds to estimate its spread")
    var_ours = sample_std(ours) ** 2 / len(ours)
    var_base = sample_std(baseline) ** 2 / len(baseline)
    if var_ours + var_base == 0:
        return WelchTest(None, None, None, "undefined: every seed on both sides has the same val_loss")
    t = (mean(baseline) - mean(ours)) / math.sqrt(var_ours + var_base)
    # Welch-Satterthwaite degrees of freedom
    df = (var_ours + var_base) ** 2 / (var_ours ** 2 / (len(ours) - 1) + var_base ** 2 / (len(baseline) - 1))
    return WelchTest(t, df, student_t_sf(t, df))


# =============================================================================
# BASELINE
# =============================================================================

@dataclass(frozen=True)
class Baseline:
    path: str
    name: str | None
    val_loss: float
    val_bpb: float | None
    seed_val_losses: list[float]


def per_seed_values(results, key: str) -> list[float]:
    """`key` of each per-seed entry, whether the entries are a {seed: {...}} map or a list."""
    entries = results.values() if isinstance(results, dict) else results if isinstance(results, list) else []
    return [float(e[key]) for e in entries if isinstance(e, dict) and isinstance(e.get(key), (int, float))]


def read_baseline(path: str) -> Baseline:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"--baseline {path}: cannot read it as JSON ({err})") from None
    if not isinstance(data, dict):
        raise RecordError(f"--baseline {path}: not a submission.json object")
    losses = per_seed_values(data.get("seed_results"), "val_loss")
    val_loss = data.get("val_loss")
    if not isinstance(val_loss, (int, float)):
        if not losses:
            raise RecordError(f"--baseline {path}: has neither val_loss nor per-seed val_loss under seed_results")
        val_loss = mean(losses)
    val_bpb = data.get("val_bpb")
    return Baseline(path, data.get("name"), float(val_loss),
                    float(val_bpb) if isinstance(val_bpb, (int, float)) else None, losses)


@dataclass(frozen=True)
class Comparison:
    baseline: Baseline
    improvement_nats: float
    improvement_bpb: float | None
    test: WelchTest
    clears_rule: bool
    verdict: str


def compare_with_baseline(baseline: Baseline, val_losses: list[float], val_bpbs: list[float]) -> Comparison:
    improvement = baseline.val_loss - mean(val_losses)
    improvement_bpb = baseline.val_bpb - mean(val_bpbs) if baseline.val_bpb is not None else None
    test = welch_t_test(val_losses, baseline.seed_val_losses)
    shortfalls = []
    # The logs give val_loss to 8 decimals: a tolerance far below that keeps an improvement of exactly
    # 0.005 from failing on a float rounding of the subtraction.
    if improvement < MIN_IMPROVEMENT_NATS - 1e-12:
        shortfalls.append(f"the improvement is {improvement:.5f} nats, under the {MIN_IMPROVEMENT_NATS} required")
    if test.p_value is None:
        shortfalls.append(f"the t-test is {test.undefined_because}, so p < {MAX_P_VALUE} is not shown")
    elif test.p_value >= MAX_P_VALUE:
        shortfalls.append(f"p = {test.p_value:.4g} is not below {MAX_P_VALUE}")
    if shortfalls:
        verdict = "Does NOT clear the record rule: " + "; ".join(shortfalls) + "."
    else:
        verdict = (f"Clears the record rule: {improvement:.5f} nats better (at least {MIN_IMPROVEMENT_NATS}) "
                   f"at p = {test.p_value:.4g} (below {MAX_P_VALUE}).")
    return Comparison(baseline, improvement, improvement_bpb, test, not shortfalls, verdict)


# =============================================================================
# CHECKS
# =============================================================================

def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_same_script(runs: list[RunSummary]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if run.script_sha256 != first.script_sha256:
            raise RecordError(f"logs from different scripts: {first.path} has script_sha256 "
                              f"{first.script_sha256[:12]}..., {run.path} has {run.script_sha256[:12]}...")


def submitted_source(runs: list[RunSummary], script_path: Path, script_bytes: bytes) -> bytes:
    """The source that wrote the logs, from --script: the readable source itself, or what a wrapper of it
    unpacks to; its sha256 must be the logs' script_sha256 (the logs hash the source that runs)."""
    logged = runs[0].script_sha256
    if sha256_hex(script_bytes) == logged:
        return script_bytes  # the readable source itself (no wrapper unpacks to its own bytes)
    # Not the source itself: perhaps its wrapper, in the format of the repository's train_gpt.py (the
    # submitted source is only known once unpacked); the source is then checked against the logs' sha256.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import train_gpt

    try:
        source = train_gpt.wrapped_source(script_bytes)
    except Exception as err:  # a file that starts like a wrapper but does not decode
        raise RecordError(f"{script_path} starts like a self-extracting wrapper but cannot be unpacked "
                          f"({type(err).__name__}: {err})") from None
    if source == script_bytes:  # not a wrapper
        raise RecordError(f"{script_path} has sha256 {sha256_hex(script_bytes)[:12]}..., but the logs were "
                          f"written by a script with sha256 {logged[:12]}...: pass the exact script with --script")
    if sha256_hex(source) != logged:
        raise RecordError(f"{script_path} is a self-extracting wrapper whose source has sha256 "
                          f"{sha256_hex(source)[:12]}..., but the logs were written by a script with sha256 "
                          f"{logged[:12]}...: pass the exact script with --script")
    return source


def counted_wrapper(module: types.ModuleType, source: bytes) -> tuple[bytes, bytes]:
    """(the self-extracting wrapper of `source`, what that wrapper unpacks to), made with the submitted
    source's own functions (loaded anyway for its default settings): the file written is the one it counts."""
    if not hasattr(module, "self_extracting_wrapper"):
        raise RecordError("the script has no self_extracting_wrapper: it is from before code was counted as "
                          "its wrapper (PR #1530's count), and its logs' code_bytes are the raw file's")
    wrapper = module.self_extracting_wrapper(source)
    return wrapper, module.wrapped_source(wrapper)


def check_wrapper(runs: list[RunSummary], source: bytes, wrapper: bytes, unpacked: bytes) -> None:
    """The wrapper to be written runs exactly the logged source, and its size is what the logs counted."""
    logged = runs[0].script_sha256
    if sha256_hex(unpacked) != logged or unpacked != source:
        raise RecordError(f"the self-extracting wrapper made for the source unpacks to sha256 "
                          f"{sha256_hex(unpacked)[:12]}..., not the logs' {logged[:12]}...: it would not run "
                          f"the script that wrote the logs")
    for run in runs:
        if run.code_bytes != len(wrapper):
            raise RecordError(f"{run.path}: code_bytes is {run.code_bytes:,}, but the self-extracting wrapper of "
                              f"its script is {len(wrapper):,} bytes: the log was written by a script that counted "
                              f"its code another way (or with another lzma); rerun with one that counts its wrapper")


def check_seeds_and_scores(runs: list[RunSummary]) -> None:
    seen: dict[int, Path] = {}
    for run in runs:
        if run.seed is None:
            raise RecordError(f"{run.path}: no `setting SEED=<integer>` line")
        if run.seed in seen:
            raise RecordError(f"seed {run.seed} twice: {seen[run.seed]} and {run.path}; one log per seed")
        seen[run.seed] = run.path
    names = {run.score_name for run in runs}
    if len(names) > 1:
        raise RecordError("the logs are scored by different final lines (" + ", ".join(
            f"{run.path.name}: {run.score_name}" for run in runs) + "): their mean would mix two methods")


def training_ms(run: RunSummary) -> float | None:
    """Training as the record track counts it: the training loop plus quantizing and packing."""
    if run.train_time_ms is None or run.artifact_time_ms is None:
        return None
    return run.train_time_ms + run.artifact_time_ms


def check_limits(run: RunSummary, track: str) -> None:
    if run.total_bytes is None:
        raise RecordError(f"{run.path}: no `Total submission size ...: N bytes` line: the submission's size "
                          f"is unknown")
    if run.total_bytes > MAX_TOTAL_BYTES:
        raise RecordError(f"{run.path}: code + artifact is {run.total_bytes:,} bytes, over the "
                          f"{MAX_TOTAL_BYTES:,}-byte limit")
    if track != RECORD_TRACK:
        return
    train_ms = training_ms(run)
    if train_ms is None:
        raise RecordError(f"{run.path}: no train_done or artifact_saved line, so the training time is unknown; "
                          f"the {RECORD_TRACK} track needs it (use --track non_record_16mb)")
    if train_ms > MAX_TRAIN_MS:
        raise RecordError(f"{run.path}: training took {train_ms / 1000:.1f} s (train_done "
                          f"{run.train_time_ms / 1000:.1f} s + artifact_saved {run.artifact_time_ms / 1000:.1f} s), "
                          f"over the {RECORD_TRACK} limit of {MAX_TRAIN_MS // 1000} s (use --track non_record_16mb)")
    if run.eval_time_ms is None:
        raise RecordError(f"{run.path}: no eval_done line, so the evaluation time is unknown; the {RECORD_TRACK} "
                          f"track needs it")
    if run.eval_time_ms > MAX_EVAL_MS:
        raise RecordError(f"{run.path}: evaluation took {run.eval_time_ms / 1000:.1f} s (eval_done), over the "
                          f"{RECORD_TRACK} limit of {MAX_EVAL_MS // 1000} s (use --track non_record_16mb)")


# =============================================================================
# SETTINGS AND REPRODUCTION
# =============================================================================

def load_submitted(script_path: Path, source: bytes) -> tuple[types.ModuleType, dict[str, str]]:
    """(the submitted source as a module, NAME -> default value of each of its settings), the defaults
    formatted by the script's own Hyperparameters.as_log_lines, so that they compare as strings with the
    log's `setting` lines. It runs the source already checked against the logs, not the file again,
    which may have changed."""
    module = types.ModuleType(f"submitted_train_gpt_{sha256_hex(source)[:12]}")
    module.__file__ = str(script_path)
    sys.modules[module.__name__] = module  # dataclasses look their module up while the class is built
    try:
        exec(compile(source, str(script_path), "exec"), module.__dict__)
        lines = module.Hyperparameters().as_log_lines()
    except Exception as err:  # any failure to import is reported the same way: one line
        raise RecordError(f"{script_path}: cannot import it to read its default settings "
                          f"({type(err).__name__}: {err})") from None
    finally:
        del sys.modules[module.__name__]
    return module, dict(line.removeprefix("setting ").split("=", 1) for line in lines)


def differing_settings(runs: list[RunSummary], defaults: dict[str, str]) -> dict[str, list[str]]:
    """NAME -> the value of each run, for every setting that some run has away from its default."""
    names = list(dict.fromkeys(name for run in runs for name in run.settings))
    return {name: [run.settings.get(name, "") for run in runs] for name in names
            if any(run.settings.get(name) != defaults.get(name) for run in runs)}


def reproduce_commands(runs: list[RunSummary], differing: dict[str, list[str]]) -> list[str]:
    """Shell lines: one export per setting shared by all seeds, then one launch line per seed."""
    shared = {name: values[0] for name, values in differing.items() if len(set(values)) == 1}
    lines = [f"export {name}={shlex.quote(value)}" for name, value in shared.items()]
    for i, run in enumerate(runs):
        own = " ".join(f"{name}={shlex.quote(values[i])}" for name, values in differing.items() if name not in shared)
        launch = f"torchrun --standalone --nproc_per_node={run.world_size or 1} train_gpt.py"
        lines.append(f"{own} {launch}" if own else launch)
    return lines


# =============================================================================
# FOLDER CONTENTS
# =============================================================================

@dataclass
class Submission:
    args: argparse.Namespace
    runs: list[RunSummary]  # sorted by seed
    comparison: Comparison | None
    differing: dict[str, list[str]]
    defaults: dict[str, str]
    source_bytes: int = 0  # size of train_gpt_readable.py; the wrapper's is runs[0].code_bytes

    def losses(self) -> list[float]:
        return [run.val_loss for run in self.runs]

    def bpbs(self) -> list[float]:
        return [run.val_bpb for run in self.runs]


def joined(values) -> str:
    """One value when all runs agree, else each distinct value in run order."""
    return ", ".join(dict.fromkeys(str(v) for v in values))


def round8(value: float | None) -> float | None:
    return None if value is None else round(value, 8)


def seed_result(run: RunSummary) -> dict:
    return dict(val_loss=run.val_loss, val_bpb=run.val_bpb, artifact_bytes=run.total_bytes,
                model_bytes=run.artifact_bytes, steps=run.steps, step_avg_ms=run.step_avg_ms,
                train_time_ms=run.train_time_ms, artifact_time_ms=run.artifact_time_ms,
                eval_time_ms=run.eval_time_ms)


def comparison_json(c: Comparison) -> dict:
    return dict(baseline=c.baseline.path, baseline_name=c.baseline.name, baseline_val_loss=c.baseline.val_loss,
                baseline_val_bpb=c.baseline.val_bpb, baseline_seeds=len(c.baseline.seed_val_losses),
                improvement_nats=round8(c.improvement_nats), improvement_bpb=round8(c.improvement_bpb),
                welch_t=c.test.t, welch_df=c.test.df, p_value_one_sided=c.test.p_value,
                t_test_note=c.test.undefined_because or None, min_improvement_nats=MIN_IMPROVEMENT_NATS,
                max_p_value=MAX_P_VALUE, clears_record_rule=c.clears_rule, verdict=c.verdict)


def submission_json(sub: Submission) -> dict:
    a, runs = sub.args, sub.runs
    train = [training_ms(run) for run in runs]
    evals = [run.eval_time_ms for run in runs]
    data = dict(author=a.author, github_id=a.github_id, name=a.name, blurb=a.blurb, date=a.date, track=a.track,
                val_loss=round8(mean(sub.losses())), val_bpb=round8(mean(sub.bpbs())),
                val_loss_std=round8(sample_std(sub.losses())), val_bpb_std=round8(sample_std(sub.bpbs())),
                seeds=[run.seed for run in runs], score=runs[0].score_name,
                seed_results={str(run.seed): seed_result(run) for run in runs},
                artifact_bytes_max=max(run.total_bytes for run in runs),
                hardware=joined(run.hardware for run in runs), pytorch_version=joined(run.torch_version for run in runs),
                script_sha256=runs[0].script_sha256, code_bytes=runs[0].code_bytes,
                compliance=dict(artifact_under_16mb=True,
                                train_under_600s=None if None in train else max(train) <= MAX_TRAIN_MS,
                                eval_under_600s=None if None in evals else max(evals) <= MAX_EVAL_MS))
    if sub.comparison is not None:
        data["comparison"] = comparison_json(sub.comparison)
    return data


def seconds(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms / 1000:.1f}"


def number(value: float | None, digits: int = 8) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def track_sentence(track: str) -> str:
    if track == RECORD_TRACK:
        return (f"Track `{track}` (record): training at most 600 s and evaluation at most 600 s on 8xH100 SXM, "
                f"code + compressed model at most {MAX_TOTAL_BYTES:,} bytes.")
    return (f"Track `{track}` (non-record): code + compressed model at most {MAX_TOTAL_BYTES:,} bytes; the "
            f"record track's 600 s limits on training and evaluation do not apply.")


def results_table(sub: Submission) -> list[str]:
    rows = ["| seed | val_loss | val_bpb | steps | step_avg (ms) | train (s) | artifact (s) | eval (s) | bytes |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in sub.runs:
        rows.append(f"| {run.seed} | {run.val_loss:.8f} | {run.val_bpb:.8f} | {run.steps if run.steps is not None else 'n/a'} "
                    f"| {number(run.step_avg_ms, 2)} | {seconds(run.train_time_ms)} | {seconds(run.artifact_time_ms)} "
                    f"| {seconds(run.eval_time_ms)} | {run.total_bytes:,} |")
    rows.append(f"| **mean** | **{mean(sub.losses()):.8f}** | **{mean(sub.bpbs()):.8f}** | | | | | | |")
    rows.append(f"| std | {number(sample_std(sub.losses()))} | {number(sample_std(sub.bpbs()))} | | | | | | |")
    return rows


def comparison_section(c: Comparison) -> list[str]:
    b = c.baseline
    t = c.test
    lines = ["## Against the baseline", "",
             f"Baseline: `{b.path}`" + (f" ({b.name})" if b.name else "") +
             f", val_loss {b.val_loss:.8f}" + (f", val_bpb {b.val_bpb:.8f}" if b.val_bpb is not None else "") +
             f", {len(b.seed_val_losses)} per-seed val_loss values.", "",
             f"- improvement: {c.improvement_nats:.8f} nats"
             + (f", {c.improvement_bpb:.8f} bpb" if c.improvement_bpb is not None else ""),
             "- Welch's t-test, one-sided (ours lower), on per-seed val_loss: "
             + (f"t = {t.t:.4f}, df = {t.df:.2f}, p = {t.p_value:.4g}" if t.p_value is not None
                else f"{t.undefined_because}"),
             f"- rule: at least {MIN_IMPROVEMENT_NATS} nats better and p < {MAX_P_VALUE}", "",
             f"**{c.verdict}**", ""]
    return lines


def settings_section(sub: Submission) -> list[str]:
    lines = ["## Settings that differ from the script's defaults", "",
             "Values as the logs print them (resolved). A default that depends on the machine, such as "
             "COMPILE (on only with CUDA), shows up here when the run was on other hardware.", ""]
    if not sub.differing:
        return lines + ["None: every setting is the script's default.", ""]
    seeds = " / ".join(f"seed {run.seed}" for run in sub.runs)
    lines += [f"| setting | default | value ({seeds}) |", "|---|---|---|"]
    for name, values in sub.differing.items():
        shown = values[0] if len(set(values)) == 1 else " / ".join(values)
        lines.append(f"| {name} | `{sub.defaults.get(name, '(none)')}` | `{shown}` |")
    return lines + [""]


def readme_text(sub: Submission) -> str:
    a, runs = sub.args, sub.runs
    n = len(runs)
    std = sample_std(sub.bpbs())
    lines = [f"# {a.name}", "", a.blurb, "",
             f"- {track_sentence(a.track)}",
             f"- Author: {a.author} (@{a.github_id}), {a.date}",
             f"- Score: `{runs[0].score_name}`, val_bpb {mean(sub.bpbs()):.8f}"
             + (f" ± {std:.8f} (sample std)" if std is not None else "") + f" over {n} seed{'s' * (n > 1)}",
             f"- Hardware: {joined(run.hardware for run in runs)}; PyTorch {joined(run.torch_version for run in runs)}",
             f"- Code: `{CODE_FILE}` is the counted self-extracting wrapper ({runs[0].code_bytes:,} bytes: the "
             f"source lzma-compressed and base85-encoded behind one exec line); `{READABLE_FILE}` is the source it "
             f"runs (sha256 `{runs[0].script_sha256}`, {sub.source_bytes:,} bytes). Running either runs the same "
             f"code and logs the same script_sha256 and code_bytes.", ""]
    if a.track == RECORD_TRACK and not all((run.hardware or "").startswith("8xNVIDIA_H100") for run in runs):
        lines += ["Note: the record track's time limits are defined on 8xH100 SXM; these runs were on "
                  f"{joined(run.hardware for run in runs)}.", ""]
    lines += ["## Results", "",
              "train = the training loop (train_done), artifact = quantizing and packing (artifact_saved); the "
              "record track's 600 s covers both. bytes = code + compressed model.", ""]
    lines += results_table(sub) + [""]
    if sub.comparison is not None:
        lines += comparison_section(sub.comparison)
    lines += settings_section(sub)
    lines += ["## Reproduce", "", "From this folder, with the data at DATA_PATH and the tokenizer at TOKENIZER_PATH "
              "(`data/cached_challenge_fineweb.py --variant sp1024` downloads the published ones):", "",
              "```bash"] + reproduce_commands(runs, sub.differing) + ["```", ""]
    lines += ["## Files", "",
              f"- `{CODE_FILE}`: the self-extracting wrapper whose {runs[0].code_bytes:,} bytes are counted; it "
              f"runs `{READABLE_FILE}`'s source",
              f"- `{READABLE_FILE}`: the readable source that wrote the logs (sha256 `{runs[0].script_sha256}`)",
              *[f"- `train_seed{run.seed}.log`: the log of seed {run.seed}" for run in runs],
              "- `submission.json`: the numbers above, machine-readable"]
    if (Path(a.script).parent / "requirements.txt").is_file():
        lines.append("- `requirements.txt`: what the script needs besides PyTorch")
    return "\n".join(lines) + "\n"


def write_folder(folder: Path, sub: Submission, wrapper: bytes, source: bytes, log_bytes: list[bytes]) -> None:
    (folder / CODE_FILE).write_bytes(wrapper)
    (folder / READABLE_FILE).write_bytes(source)
    for run, data in zip(sub.runs, log_bytes):
        (folder / f"train_seed{run.seed}.log").write_bytes(data)
    requirements = Path(sub.args.script).parent / "requirements.txt"
    if requirements.is_file():
        shutil.copyfile(requirements, folder / "requirements.txt")
    (folder / "submission.json").write_text(json.dumps(submission_json(sub), indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(readme_text(sub), encoding="utf-8")


def build_in_place(final: Path, force: bool, fill) -> None:
    """Runs fill(folder) on a temporary sibling of `final`, then renames it to `final` (replacing an
    old one only with force); on any failure the temporary folder goes and `final` is untouched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so that the rename stays on one file system; made with mkdir, not mkdtemp, so that it
    # gets the usual permissions rather than mkdtemp's owner-only ones.
    building = final.with_name(f".{final.name}.{os.getpid()}.building")
    shutil.rmtree(building, ignore_errors=True)  # left by a killed run that had the same process id
    building.mkdir()
    try:
        fill(building)
        if final.exists():
            if not force:
                raise RecordError(f"{final} already exists (use --force to replace it)")
            old = final.with_name(f".{final.name}.{os.getpid()}.replaced")
            final.rename(old)
            building.rename(final)
            shutil.rmtree(old)
        else:
            building.rename(final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


# =============================================================================
# MAIN
# =============================================================================

def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", help="one train_gpt.py log per seed (logs/<RUN_ID>.txt)")
    parser.add_argument("--name", required=True, help="short name; the folder is <date>_<name>")
    parser.add_argument("--author", required=True)
    parser.add_argument("--github-id", required=True)
    parser.add_argument("--track", required=True, choices=TRACKS)
    parser.add_argument("--blurb", required=True, help="one paragraph: what this submission does")
    parser.add_argument("--script", default=str(ROOT / "train_gpt.py"),
                        help="the script that wrote the logs: its readable source or its self-extracting wrapper")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD (default today)")
    parser.add_argument("--baseline", help="submission.json of the record to compare against")
    parser.add_argument("--records-dir", default=str(ROOT / "records"))
    parser.add_argument("--force", action="store_true", help="replace an existing folder of the same name")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if not FOLDER_NAME.fullmatch(args.name):
        raise RecordError(f"--name {args.name!r} is not allowed: letters, digits and . _ + - only, starting "
                          f"with a letter or digit (it names the folder)")
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date):
            raise ValueError
        datetime.date.fromisoformat(args.date)
    except ValueError:
        raise RecordError(f"--date {args.date!r} is not allowed: a date as YYYY-MM-DD") from None


def read_bytes(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise RecordError(f"{what} {path}: cannot read it ({err.strerror})") from None


def make_record(args: argparse.Namespace) -> Path:
    """Checks everything, then writes the folder; returns its path. RecordError/LogError: nothing written."""
    check_args(args)
    script_bytes = read_bytes(args.script, "--script")
    log_bytes = [read_bytes(path, "log") for path in args.logs]
    runs = [parse_log(path) for path in args.logs]
    check_same_script(runs)
    source = submitted_source(runs, Path(args.script), script_bytes)
    check_seeds_and_scores(runs)
    for run in runs:
        check_limits(run, args.track)
    order = sorted(range(len(runs)), key=lambda i: runs[i].seed)
    runs, log_bytes = [runs[i] for i in order], [log_bytes[i] for i in order]
    final = Path(args.records_dir) / f"track_{args.track}" / f"{args.date}_{args.name}"
    if final.exists() and not args.force:
        raise RecordError(f"{final} already exists (use --force to replace it)")
    comparison = None
    if args.baseline:
        comparison = compare_with_baseline(read_baseline(args.baseline), [r.val_loss for r in runs],
                                           [r.val_bpb for r in runs])
    module, defaults = load_submitted(Path(args.script), source)
    wrapper, unpacked = counted_wrapper(module, source)
    check_wrapper(runs, source, wrapper, unpacked)
    sub = Submission(args, runs, comparison, differing_settings(runs, defaults), defaults, len(source))
    build_in_place(final, args.force, lambda folder: write_folder(folder, sub, wrapper, source, log_bytes))
    return final


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        folder = make_record(args)
    except (RecordError, LogError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
