"""run_log.py: the one parser of the run logs train_gpt.py writes (logs/<RUN_ID>.txt).

    from run_log import parse_log
    run = parse_log("logs/demo.txt")
    run.seed, run.score_name, run.val_bpb, run.total_bytes, run.train_losses

Each log line is a name and/or space-separated key:value pairs (STYLE.md, "Log lines"). What the
parser reads, in log order:
    script:train_gpt.py script_sha256:<hex> code_bytes:N          (required: the header)
    torch_version:V python:V device:D world_size:N hardware:NxNAME
    setting NAME=value                                            (one per hyperparameter)
    step:N/ITER train_loss:X train_time:Tms step_avg:Sms eta:Tms
    step:N/ITER val_loss:X val_bpb:Y train_time:Tms step_avg:Sms
    stopping_early: wallclock_cap ...
    train_done steps:N train_time:Tms step_avg:Sms
    Total submission size quantized+zstd: N bytes (code C, artifact A)
    artifact_saved path:P bytes:N time:Tms
    <name> val_loss:X val_bpb:Y ...                               (prequant_plain, final_*, ...)
    eval_phases compile_warmup:Tms plain:Tms neural:Tms ttt_train:Tms cache:Tms
    eval_done eval_time:Tms
Any other line is ignored, so that lines added to the script later (ttt_..., warnings) do not
break old tools. The score is the last `final_*_exact` line: CONVENTIONS.md makes the last val_bpb
line of a log the submission's score, and train_gpt.py ends every evaluation with such a line.
A run evaluated from an existing artifact (EVAL_ARTIFACT) has no training or artifact_saved lines;
those fields are then None. Nothing runs at import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

TOTAL_SIZE_LINE = re.compile(r"^Total submission size \S+: (\d+) bytes \(code (\d+), artifact (\d+)\)$")
FINAL_EXACT_NAME = re.compile(r"^final_\S+_exact$")


class LogError(ValueError):
    """A log that cannot be read as a train_gpt.py run: names the file and what is missing."""


@dataclass(frozen=True)
class Evaluation:
    val_loss: float
    val_bpb: float


@dataclass(frozen=True)
class TrainPoint:
    step: int
    train_loss: float
    train_time_ms: float


@dataclass(frozen=True)
class ValPoint:
    step: int
    val_loss: float
    val_bpb: float
    train_time_ms: float


@dataclass
class RunSummary:
    """Everything a submission or a plot needs from one log; None where the log has no such line."""
    path: Path
    script_name: str
    script_sha256: str
    code_bytes: int
    torch_version: str | None = None
    python_version: str | None = None
    device: str | None = None
    world_size: int | None = None
    hardware: str | None = None
    settings: dict[str, str] = field(default_factory=dict)  # NAME -> value exactly as logged
    train_losses: list[TrainPoint] = field(default_factory=list)
    val_points: list[ValPoint] = field(default_factory=list)  # periodic validation during training
    stopped_early: bool = False
    steps: int | None = None
    train_time_ms: float | None = None
    step_avg_ms: float | None = None
    total_bytes: int | None = None  # code + compressed model: the number the 16,000,000 limit is on
    artifact_bytes: int | None = None
    artifact_time_ms: float | None = None  # quantize + pack + write, after training
    eval_time_ms: float | None = None
    eval_phases_ms: dict[str, float] = field(default_factory=dict)  # where the evaluation's time went
    evaluations: dict[str, Evaluation] = field(default_factory=dict)  # every line with val_loss and val_bpb
    score_name: str = ""
    val_loss: float = float("nan")
    val_bpb: float = float("nan")

    @property
    def seed(self) -> int | None:
        value = self.settings.get("SEED")
        return int(value) if value is not None and value.lstrip("-").isdigit() else None

    @property
    def finals(self) -> dict[str, Evaluation]:
        return {name: ev for name, ev in self.evaluations.items() if name.startswith("final_")}


def key_values(tokens: list[str]) -> dict[str, str]:
    """{key: value} of the `key:value` tokens of a line; tokens without a colon are skipped."""
    pairs = {}
    for token in tokens:
        key, colon, value = token.partition(":")
        if colon and key:
            pairs[key] = value
    return pairs


def milliseconds(value: str) -> float:
    return float(value.removesuffix("ms"))


def parse_log(path: str | Path) -> RunSummary:
    """Reads and parses one log file; LogError when it is missing or is not a complete run."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LogError(f"{path}: cannot read the log ({err})") from None
    return parse_log_text(text, path)


def parse_log_text(text: str, path: str | Path = "<log>") -> RunSummary:
    path = Path(path)
    lines = text.splitlines()
    header = next((line for line in lines if line.startswith("script:")), None)
    if header is None:
        raise LogError(f"{path}: no `script:... script_sha256:... code_bytes:...` header line: "
                       f"not a log written by train_gpt.py")
    if sum(line.startswith("script:") for line in lines) > 1:
        raise LogError(f"{path}: more than one `script:` header line: the log holds several runs")
    fields = key_values(header.split())
    if "script_sha256" not in fields or not fields.get("code_bytes", "").isdigit():
        raise LogError(f"{path}: the header line lacks script_sha256 or code_bytes: {header!r}")
    run = RunSummary(path, fields["script"], fields["script_sha256"], int(fields["code_bytes"]))
    for number, line in enumerate(lines, 1):
        try:
            read_line(run, line)
        except (KeyError, ValueError):
            raise LogError(f"{path}: line {number} is not in the shape train_gpt.py writes: {line!r}") from None
    finals = [name for name in run.evaluations if FINAL_EXACT_NAME.match(name)]
    if not finals:
        raise LogError(f"{path}: no `final_..._exact val_loss:... val_bpb:...` line: the run did not "
                       f"finish its evaluation")
    run.score_name = finals[-1]
    run.val_loss, run.val_bpb = run.evaluations[run.score_name].val_loss, run.evaluations[run.score_name].val_bpb
    return run


def read_line(run: RunSummary, line: str) -> None:
    """Updates `run` with what one line says; lines the parser does not know change nothing."""
    if line.startswith("setting "):
        name, equals, value = line[len("setting "):].partition("=")
        if equals:
            run.settings[name] = value
        return
    size = TOTAL_SIZE_LINE.match(line)
    if size:
        run.total_bytes = int(size.group(1))
        return
    tokens = line.split()
    if not tokens:
        return
    name, pairs = tokens[0], key_values(tokens)
    if "torch_version" in pairs:
        read_runtime_line(run, pairs)
    elif name.startswith("step:"):
        read_step_line(run, pairs)
    elif name == "stopping_early:":
        run.stopped_early = True
    elif name == "train_done":
        run.steps = int(pairs["steps"])
        run.train_time_ms = milliseconds(pairs["train_time"])
        run.step_avg_ms = milliseconds(pairs["step_avg"])
    elif name == "artifact_saved":
        run.artifact_bytes = int(pairs["bytes"])
        run.artifact_time_ms = milliseconds(pairs["time"])
    elif name == "artifact_loaded" and run.artifact_bytes is None:
        run.artifact_bytes = int(pairs["bytes"])  # an EVAL_ARTIFACT run: the file it scored
    elif name == "eval_phases":
        run.eval_phases_ms = {key: milliseconds(value) for key, value in pairs.items()}
    elif name == "eval_done":
        run.eval_time_ms = milliseconds(pairs["eval_time"])
    elif ":" not in name and "val_loss" in pairs and "val_bpb" in pairs:
        run.evaluations[name] = Evaluation(float(pairs["val_loss"]), float(pairs["val_bpb"]))


def read_runtime_line(run: RunSummary, pairs: dict[str, str]) -> None:
    run.torch_version = pairs["torch_version"]
    run.python_version = pairs.get("python")
    run.device = pairs.get("device")
    run.world_size = int(pairs["world_size"]) if pairs.get("world_size", "").isdigit() else None
    run.hardware = pairs.get("hardware")


def read_step_line(run: RunSummary, pairs: dict[str, str]) -> None:
    if "train_time" not in pairs:
        return  # a kind of step line this parser does not know
    step = int(pairs["step"].partition("/")[0])
    time_ms = milliseconds(pairs["train_time"])
    if "train_loss" in pairs:
        run.train_losses.append(TrainPoint(step, float(pairs["train_loss"]), time_ms))
    elif "val_bpb" in pairs:
        run.val_points.append(ValPoint(step, float(pairs["val_loss"]), float(pairs["val_bpb"]), time_ms))
