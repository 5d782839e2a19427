"""scripts/run_log.py, make_record.py, plot_run.py and plot_ladder.py on logs that train_gpt.py writes in two
tiny runs."""
import hashlib
import json
import math
import os
import re
import runpy
import shutil
import statistics
import subprocess
import sys
import types

import pytest
import torch

import train_gpt as tg
from conftest import ROOT
from test_end_to_end import TINY_ENV, dataset, failure  # noqa: F401  (dataset: the fixture the runs train on)

sys.path.insert(0, str(ROOT / "scripts"))
import make_record  # noqa: E402
import plot_ladder  # noqa: E402
import plot_run  # noqa: E402
import run_log  # noqa: E402

SEEDS = (1, 2)
DATE = "2026-03-25"


@pytest.fixture(scope="module")
def tiny_runs(dataset, tmp_path_factory):
    """(folder, script, {seed: log path}) of two tiny runs of a copy of train_gpt.py: a copy, so that the
    logs' script_sha256 stays the script's even while train_gpt.py is being edited. Real logs, so they carry
    the copy's sha256 and the size of its self-extracting wrapper as code_bytes. Without the n-gram
    mixer, which costs most of a tiny run's time on a CPU (the parser test adds the mixer's lines), and
    scored by the sliding window (TTT_ENABLED=0): the tools read any final lines alike."""
    data, tok = dataset
    folder = tmp_path_factory.mktemp("runs")
    script = folder / "train_gpt.py"
    shutil.copyfile(ROOT / "train_gpt.py", script)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # One thread each, both seeds at once: the two cores each run one seed.
    env.update(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, ITERATIONS="4", VAL_LOSS_EVERY="2",
               USE_MIXER="none", TTT_ENABLED="0", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=folder, env=dict(env, SEED=str(s), RUN_ID=f"seed{s}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in SEEDS]
    for proc in procs:
        proc.stdout, proc.stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, failure(proc)
    return folder, script, {s: folder / "logs" / f"seed{s}.txt" for s in SEEDS}


def logged(pattern, text):
    return float(re.search(pattern, text, re.M).group(1))


def edited_copy(src, dst, pattern, replacement):
    text, count = re.subn(pattern, replacement, src.read_text(), flags=re.M)
    assert count >= 1, pattern
    dst.write_text(text)
    return dst


def record_args(logs, records, script, *extra, track="10min_16mb", name="Tiny_Mixer"):
    return [*map(str, logs), "--name", name, "--author", "Test Author", "--github-id", "tester", "--track", track,
            "--blurb", "Two tiny CPU runs.", "--script", str(script), "--date", DATE, "--records-dir", str(records),
            *extra]


# ----------------------------------------------------------------------------- the parser

def test_parser_reads_every_field_of_a_real_log(tiny_runs):
    folder, script, logs = tiny_runs
    text = logs[1].read_text()
    run = run_log.parse_log(logs[1])
    assert run.script_sha256 == hashlib.sha256(script.read_bytes()).hexdigest()
    assert run.code_bytes == len(tg.self_extracting_wrapper(script.read_bytes())) and run.script_name == "train_gpt.py"
    assert (run.torch_version, run.device, run.world_size) == (torch.__version__, "cpu", 1)
    assert run.hardware.startswith("1x")
    assert run.seed == 1 and run.settings["ITERATIONS"] == "4" and run.settings["VE_LAYERS"] == "1"
    assert len(run.settings) == text.count("\nsetting ")
    assert [p.step for p in run.train_losses] == [1, 2, 3, 4]
    assert run.train_losses[-1].train_loss == logged(r"^step:4/4 train_loss:(\S+)", text)
    assert [(p.step, p.val_bpb) for p in run.val_points] == [(2, logged(r"^step:2/4 val_loss:\S+ val_bpb:(\S+)", text))]
    assert run.steps == 4 and not run.stopped_early
    assert run.train_time_ms == logged(r"^train_done steps:4 train_time:(\d+)ms", text)
    assert run.step_avg_ms == logged(r"^train_done .* step_avg:(\S+)ms", text)
    assert run.artifact_bytes == (folder / "artifacts" / "seed1.pgqw").stat().st_size
    assert run.total_bytes == run.code_bytes + run.artifact_bytes
    assert run.artifact_time_ms == logged(r"^artifact_saved .* time:(\d+)ms", text)
    assert run.eval_time_ms == logged(r"^eval_done eval_time:(\d+)ms", text)
    assert run.score_name == "final_sliding_window_exact"
    assert run.val_bpb == float(re.findall(r"val_bpb:(\S+)", text)[-1])
    assert run.val_loss == logged(r"^final_sliding_window_exact val_loss:(\S+)", text)
    assert run.finals["final_plain_exact"].val_bpb == logged(r"^final_plain_exact val_loss:\S+ val_bpb:(\S+)", text)
    assert run.evaluations["prequant_plain"].val_loss == logged(r"^prequant_plain val_loss:(\S+)", text)


# The lines a run with USE_MIXER=learned adds (train_gpt.py's own wording), values from a demo run.
MIXER_ORACLE = "ngram_oracle tokens:2000000 orders:2,3,4,5,6,7 bytes:102451744 time:1753ms\n"
MIXER_FINALS = ("ngram_audit positions:16 worst_abs_sum_minus_1:1.271e-07 min_prob:1.900e-10 worst_target_diff:1.110e-16\n"
                "final_sliding_window_ngram_learned val_loss:3.7480 val_bpb:2.1791 eval_time:14291ms "
                "scored_tokens:95004 scored_bytes:235750\n"
                "final_sliding_window_ngram_learned_exact val_loss:3.74804872 val_bpb:2.17906385\n")


def test_parser_scores_a_mixer_run_by_its_last_final_line(tiny_runs):
    _, _, logs = tiny_runs
    text = logs[1].read_text().replace("step:1/", MIXER_ORACLE + "step:1/", 1).replace("eval_done", MIXER_FINALS + "eval_done")
    run = run_log.parse_log_text(text, "mixer.txt")
    assert run.score_name == "final_sliding_window_ngram_learned_exact"
    assert (run.val_loss, run.val_bpb) == (3.74804872, 2.17906385)
    assert run.finals["final_sliding_window_exact"] == run_log.parse_log(logs[1]).finals["final_sliding_window_exact"]
    assert run.steps == 4 and len(run.train_losses) == 4


def test_parser_ignores_unknown_lines_and_reads_an_artifact_only_evaluation(tiny_runs):
    _, _, logs = tiny_runs
    text = logs[1].read_text()
    base = run_log.parse_log_text(text, "x.txt")
    extra = text.replace("eval_done", "ttt_done chunks:3 trained:2 time:5ms\nsomething new\nwarning: slow\neval_done")
    assert run_log.parse_log_text(extra, "x.txt") == base
    # An EVAL_ARTIFACT run: no training, no artifact_saved, no size line.
    kept = [l for l in text.splitlines()
            if not re.match(r"(step:|train_done|train_shards|ngram_oracle|ema:|prequant|gptq|artifact_try|"
                            r"Total submission|artifact_saved)", l)]
    eval_only = run_log.parse_log_text("\n".join(kept), "x.txt")
    assert (eval_only.steps, eval_only.train_time_ms, eval_only.total_bytes) == (None, None, None)
    assert eval_only.artifact_bytes == base.artifact_bytes  # from artifact_loaded
    assert (eval_only.score_name, eval_only.val_bpb) == (base.score_name, base.val_bpb)


def test_parser_names_the_file_and_what_is_missing(tiny_runs, tmp_path):
    _, _, logs = tiny_runs
    no_header = edited_copy(logs[1], tmp_path / "no_header.txt", r"^script:.*\n", "")
    with pytest.raises(run_log.LogError, match=r"no_header\.txt: no `script:.* header line"):
        run_log.parse_log(no_header)
    unfinished = edited_copy(logs[1], tmp_path / "unfinished.txt", r"^final_.*\n", "")
    with pytest.raises(run_log.LogError, match=r"unfinished\.txt: no `final_\.\.\._exact .* line"):
        run_log.parse_log(unfinished)
    damaged = edited_copy(logs[1], tmp_path / "damaged.txt", r"^train_done steps:\d+", "train_done steps:four")
    with pytest.raises(run_log.LogError, match=r"damaged\.txt: line \d+ is not in the shape"):
        run_log.parse_log(damaged)
    with pytest.raises(run_log.LogError, match="missing.txt: cannot read"):
        run_log.parse_log(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("t, df, p", [
    (2.015, 5, 0.05), (3.365, 5, 0.01), (1.812, 10, 0.05), (2.764, 10, 0.01), (2.086, 20, 0.025),
    (12.706, 1, 0.025), (6.965, 2, 0.01), (1.645, 1e5, 0.05),  # one-sided t table; the last is the normal
])
def test_student_t_tail_matches_table_values(t, df, p):
    assert make_record.student_t_sf(t, df) == pytest.approx(p, abs=2e-4)
    assert make_record.student_t_sf(-t, df) == pytest.approx(1 - p, abs=2e-4)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 4.0, 25.0])
def test_student_t_tail_matches_closed_forms(t):
    assert make_record.student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)  # Cauchy
    assert make_record.student_t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert make_record.regularized_incomplete_beta(2.5, 1, 0.3) == pytest.approx(0.3 ** 2.5, rel=1e-12)
    assert make_record.regularized_incomplete_beta(1, 3.5, 0.3) == pytest.approx(1 - 0.7 ** 3.5, rel=1e-12)


def test_welch_t_test_against_hand_computed_values():
    ours, baseline = [2.00, 2.02, 2.04], [2.10, 2.13, 2.16]
    assert make_record.mean(ours) == pytest.approx(2.02) and make_record.mean(baseline) == pytest.approx(2.13)
    assert make_record.sample_std(ours) == pytest.approx(0.02) and make_record.sample_std(baseline) == pytest.approx(0.03)
    test = make_record.welch_t_test(ours, baseline)
    # se = sqrt(0.02^2/3 + 0.03^2/3) = sqrt(0.0013/3) = 0.0208167; t = 0.11 / se
    assert test.t == pytest.approx(0.11 / math.sqrt(0.0013 / 3), rel=1e-12) == pytest.approx(5.2842291, abs=1e-6)
    # df = (0.0013/3)^2 / ((0.0004/3)^2/2 + (0.0009/3)^2/2) = 2 * 0.0013^2 / (0.0004^2 + 0.0009^2)
    assert test.df == pytest.approx(2 * 0.0013 ** 2 / (0.0004 ** 2 + 0.0009 ** 2), rel=1e-12) == pytest.approx(3.4845361)
    assert test.p_value == pytest.approx(0.0044814, abs=1e-7)
    # Equal spreads: df = 2(n - 1) = 4, t = 0.1 / sqrt(2 * 0.02^2 / 3), and the t(4) tail has a closed form.
    test = make_record.welch_t_test([2.00, 2.02, 2.04], [2.10, 2.12, 2.14])
    t = 0.1 / math.sqrt(0.0008 / 3)
    assert test.df == pytest.approx(4.0) and test.t == pytest.approx(t)
    tail = 0.5 - 3 / 8 * (t / math.sqrt(1 + t * t / 4)) * (1 - t * t / (12 * (1 + t * t / 4)))
    assert test.p_value == pytest.approx(tail, rel=1e-9) == pytest.approx(0.0018011, abs=1e-7)
    assert make_record.sample_std([2.0]) is None


def baseline_of(losses, bpb=None):
    return make_record.Baseline("base.json", "Base", make_record.mean(losses), bpb, list(losses))


@pytest.mark.parametrize("ours, baseline, clears, says", [
    ([2.00, 2.02, 2.04], [2.10, 2.13, 2.16], True, r"^Clears the record rule: 0\.11000 nats better .* p = 0\.004481"),
    ([2.0000, 2.0001, 2.0002], [2.0030, 2.0031, 2.0032], False, r"improvement is 0\.00300 nats, under the 0\.005"),
    ([1.90, 2.10], [2.00, 2.20], False, r"p = 0\.2\d+ is not below 0\.01"),
    ([2.0], [2.10, 2.13, 2.16], False, r"t-test is undefined with 1 seed\(s\) of ours"),
    ([2.0000, 2.0001], [2.0050, 2.0051], True, r"^Clears .* 0\.00500 nats"),  # exactly 0.005 is enough
])
def test_record_rule_verdicts(ours, baseline, clears, says):
    comparison = make_record.compare_with_baseline(baseline_of(baseline, 1.2), ours, [1.1] * len(ours))
    assert comparison.clears_rule is clears
    assert re.search(says, comparison.verdict), comparison.verdict
    assert comparison.verdict.startswith("Clears" if clears else "Does NOT clear")
    assert comparison.improvement_nats == pytest.approx(make_record.mean(baseline) - make_record.mean(ours))
    assert comparison.improvement_bpb == pytest.approx(0.1)


# ----------------------------------------------------------------------------- make_record.py

def write_baseline(path, losses):
    data = dict(name="Base", val_loss=statistics.mean(losses), val_bpb=9.0,
                seed_results={str(7 + i): dict(val_loss=v) for i, v in enumerate(losses)})
    path.write_text(json.dumps(data))
    return path


def test_make_record_writes_the_submission_folder(tiny_runs, tmp_path):
    _, script, logs = tiny_runs
    runs = [run_log.parse_log(logs[s]) for s in SEEDS]
    losses, bpbs = [r.val_loss for r in runs], [r.val_bpb for r in runs]
    baseline = write_baseline(tmp_path / "base.json", [v + 0.001 for v in losses])  # too small a gain to clear
    records = tmp_path / "records"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_record.py"),
                           *record_args([logs[2], logs[1]], records, script, "--baseline", str(baseline))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    folder = records / "track_10min_16mb" / f"{DATE}_Tiny_Mixer"
    assert proc.stdout.strip() == str(folder)
    assert os.listdir(folder.parent) == [folder.name]  # nothing temporary left beside it
    assert sorted(os.listdir(folder)) == ["README.md", "submission.json", "train_gpt.py", "train_gpt_readable.py",
                                          "train_seed1.log", "train_seed2.log"]
    # train_gpt.py is the counted wrapper: it unpacks to the readable source byte for byte, its size is the
    # logs' code_bytes, and run as a script it is the same code (same identity as the logs' header).
    source, wrapper = (folder / "train_gpt_readable.py").read_bytes(), (folder / "train_gpt.py").read_bytes()
    assert source == script.read_bytes()
    assert wrapper.startswith(tg.WRAPPER_HEAD) and wrapper.endswith(tg.WRAPPER_TAIL)
    assert tg.wrapped_source(wrapper) == source
    assert hashlib.sha256(tg.wrapped_source(wrapper)).hexdigest() == runs[0].script_sha256
    assert len(wrapper) == runs[0].code_bytes == runs[1].code_bytes < len(source)
    identity = runpy.run_path(str(folder / "train_gpt.py"), run_name="wrapped_train_gpt")["script_identity"]
    assert identity() == (runs[0].script_sha256, runs[0].code_bytes)
    assert all((folder / f"train_seed{s}.log").read_bytes() == logs[s].read_bytes() for s in SEEDS)

    sub = json.loads((folder / "submission.json").read_text())
    assert {k: sub[k] for k in ("author", "github_id", "name", "blurb", "date", "track", "seeds")} == dict(
        author="Test Author", github_id="tester", name="Tiny_Mixer", blurb="Two tiny CPU runs.", date=DATE,
        track="10min_16mb", seeds=[1, 2])
    assert sub["val_loss"] == round(statistics.mean(losses), 8) and sub["val_bpb"] == round(statistics.mean(bpbs), 8)
    assert sub["val_loss_std"] == round(statistics.stdev(losses), 8)
    assert sub["val_bpb_std"] == round(statistics.stdev(bpbs), 8)
    assert sub["hardware"] == runs[0].hardware and sub["pytorch_version"] == torch.__version__
    assert sub["score"] == "final_sliding_window_exact"
    for run in runs:
        result = sub["seed_results"][str(run.seed)]
        assert result == dict(val_loss=run.val_loss, val_bpb=run.val_bpb, artifact_bytes=run.total_bytes,
                              model_bytes=run.artifact_bytes, steps=4, step_avg_ms=run.step_avg_ms,
                              train_time_ms=run.train_time_ms, artifact_time_ms=run.artifact_time_ms,
                              eval_time_ms=run.eval_time_ms)
    assert sub["compliance"] == dict(artifact_under_16mb=True, train_under_600s=True, eval_under_600s=True)
    comparison = sub["comparison"]
    assert comparison["improvement_nats"] == pytest.approx(0.001, abs=1e-8)
    assert comparison["improvement_bpb"] == round(9.0 - statistics.mean(bpbs), 8)
    assert comparison["welch_df"] == pytest.approx(2.0)  # equal spreads, 2 seeds each: 2 (n - 1)
    assert comparison["clears_record_rule"] is False and comparison["baseline_seeds"] == 2

    readme = (folder / "README.md").read_text()
    assert f"| 1 | {losses[0]:.8f} | {bpbs[0]:.8f} | 4 |" in readme
    assert f"| **mean** | **{statistics.mean(losses):.8f}** |" in readme
    assert "**Does NOT clear the record rule: the improvement is 0.00100 nats" in readme
    defaults = tg.Hyperparameters()
    assert f"| ITERATIONS | `{defaults.iterations}` | `4` |" in readme
    assert f"| SEED | `{defaults.seed}` | `1 / 2` |" in readme
    assert "ROPE_BASE" not in readme  # at its default
    assert "\nexport ITERATIONS=4\n" in readme
    assert "\nRUN_ID=seed2 SEED=2 torchrun --standalone --nproc_per_node=1 train_gpt.py\n" in readme
    assert "Track `10min_16mb` (record): training at most 600 s and evaluation at most 600 s" in readme
    assert (f"`train_gpt.py` is the counted self-extracting wrapper ({len(wrapper):,} bytes" in readme
            and f"`train_gpt_readable.py` is the source it runs (sha256 `{runs[0].script_sha256}`, "
                f"{len(source):,} bytes). Running either runs the same code" in readme)
    assert sub["script_sha256"] == runs[0].script_sha256 and sub["code_bytes"] == len(wrapper)


def folder_files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_the_wrapper_given_as_script_makes_the_same_folder(tiny_runs, tmp_path):
    _, script, logs = tiny_runs
    wrapped = tmp_path / "wrapped" / "train_gpt.py"
    wrapped.parent.mkdir()
    wrapped.write_bytes(tg.self_extracting_wrapper(script.read_bytes()))
    assert make_record.main(record_args([logs[1], logs[2]], tmp_path / "from_source", script)) == 0
    assert make_record.main(record_args([logs[1], logs[2]], tmp_path / "from_wrapper", wrapped)) == 0
    made = [folder_files(tmp_path / r / "track_10min_16mb" / f"{DATE}_Tiny_Mixer") for r in ("from_source", "from_wrapper")]
    assert made[0] == made[1]
    assert made[1]["train_gpt.py"] == wrapped.read_bytes() and made[1]["train_gpt_readable.py"] == script.read_bytes()


def test_a_log_that_counted_code_another_way_is_refused(tiny_runs, tmp_path, capsys):
    """A log whose code_bytes is not the wrapper's size (here: the readable file's, as scripts from before
    PR #1530 counted) is refused naming both numbers, before anything is written."""
    _, script, logs = tiny_runs
    size, wrapped = script.stat().st_size, len(tg.self_extracting_wrapper(script.read_bytes()))
    old = edited_copy(logs[2], tmp_path / "old.txt", r"code_bytes:\d+$", f"code_bytes:{size}")
    records = tmp_path / "records"
    assert make_record.main(record_args([logs[1], old], records, script)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {old}: code_bytes is {size:,}, but the self-extracting wrapper of its script is "
                     f"{wrapped:,} bytes: the log was written by a script that counted its code another way (or with "
                     f"another lzma); rerun with one that counts its wrapper"]
    assert not records.exists()


def test_a_wrapper_that_would_not_run_the_logged_source_is_refused(tiny_runs, tmp_path, capsys, monkeypatch):
    _, script, logs = tiny_runs
    source = script.read_bytes()
    other = tg.self_extracting_wrapper(source + b"# not the logged source\n")
    monkeypatch.setattr(make_record, "counted_wrapper", lambda module, src: (other, tg.wrapped_source(other)))
    records = tmp_path / "records"
    assert make_record.main(record_args([logs[1], logs[2]], records, script)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    sha = hashlib.sha256(source).hexdigest()
    assert len(lines) == 1 and re.fullmatch(r"error: the self-extracting wrapper made for the source unpacks to sha256 "
                                            rf"\w{{12}}\.\.\., not the logs' {sha[:12]}\.\.\.: it would not run "
                                            r"the script that wrote the logs", lines[0]), lines
    assert not records.exists()


def test_a_script_from_before_the_wrapper_is_refused(tiny_runs, tmp_path, capsys, monkeypatch):
    _, script, logs = tiny_runs
    real = make_record.load_submitted
    monkeypatch.setattr(make_record, "load_submitted",  # the submitted module as a pre-wrapper script's
                        lambda path, source: (types.SimpleNamespace(), real(path, source)[1]))
    records = tmp_path / "records"
    assert make_record.main(record_args([logs[1], logs[2]], records, script)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: the script has no self_extracting_wrapper: it is from before code was counted as its "
                     "wrapper (PR #1530's count), and its logs' code_bytes are the raw file's"]
    assert not records.exists()


def test_non_record_track_has_no_time_limits_and_copies_requirements(tiny_runs, tmp_path):
    _, script, logs = tiny_runs
    slow = edited_copy(logs[1], tmp_path / "slow.txt", r"^(train_done steps:\d+ train_time:)\d+ms", r"\g<1>3600000ms")
    elsewhere = tmp_path / "checkout"
    elsewhere.mkdir()
    shutil.copyfile(script, elsewhere / "train_gpt.py")
    (elsewhere / "requirements.txt").write_text("zstandard\n")
    records = tmp_path / "records"
    assert make_record.main(record_args([slow, logs[2]], records, elsewhere / "train_gpt.py",
                                        track="non_record_16mb")) == 0
    folder = records / "track_non_record_16mb" / f"{DATE}_Tiny_Mixer"
    assert (folder / "requirements.txt").read_text() == "zstandard\n"
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["compliance"]["train_under_600s"] is False and sub["seed_results"]["1"]["train_time_ms"] == 3600000
    assert "comparison" not in sub
    assert "the record track's 600 s limits on training and evaluation do not apply" in (folder / "README.md").read_text()


def refusal_case(name, logs, tmp_path, script):
    """(log paths, --script) of one refused submission, built from the real logs."""
    one, two = logs[1], logs[2]
    if name == "training over 600 s":
        edited = edited_copy(one, tmp_path / "a.txt", r"^(train_done steps:\d+ train_time:)\d+ms", r"\g<1>599000ms")
        return [edited_copy(edited, edited, r"^(artifact_saved .* time:)\d+ms", r"\g<1>1001ms"), two], script
    if name == "evaluation over 600 s":
        return [edited_copy(one, tmp_path / "a.txt", r"^eval_done eval_time:\d+ms", "eval_done eval_time:600001ms"), two], script
    if name == "over 16,000,000 bytes":
        return [one, edited_copy(two, tmp_path / "b.txt", r"^(Total submission size \S+:) \d+", r"\g<1> 16000001")], script
    if name == "no final lines":
        return [one, edited_copy(two, tmp_path / "b.txt", r"^final_.*\n", "")], script
    if name == "no size line":
        return [edited_copy(one, tmp_path / "a.txt", r"^Total submission size.*\n", ""), two], script
    if name == "different scripts":
        return [one, edited_copy(two, tmp_path / "b.txt", r"script_sha256:\w+", "script_sha256:" + "0" * 64)], script
    if name == "script hash mismatch":
        changed = tmp_path / "train_gpt.py"
        changed.write_bytes(script.read_bytes() + b"# one more line\n")
        return [one, two], changed
    if name == "wrapper of another source":
        changed = tmp_path / "train_gpt.py"
        changed.write_bytes(tg.self_extracting_wrapper(script.read_bytes() + b"# one more line\n"))
        return [one, two], changed
    if name == "different final lines":
        return [one, edited_copy(two, tmp_path / "b.txt", r"^final_sliding_window.*\n", "")], script
    if name == "duplicate seeds":
        return [one, two, shutil.copyfile(one, tmp_path / "again.txt")], script
    raise AssertionError(name)


@pytest.mark.parametrize("case, message", [
    ("training over 600 s", r"a\.txt: training took 600\.0 s \(train_done 599\.0 s \+ artifact_saved 1\.0 s\), "
                            r"over the 10min_16mb limit of 600 s"),
    ("evaluation over 600 s", r"a\.txt: evaluation took 600\.0 s \(eval_done\), over the 10min_16mb limit of 600 s"),
    ("over 16,000,000 bytes", r"b\.txt: code \+ artifact is 16,000,001 bytes, over the 16,000,000-byte limit"),
    ("no final lines", r"b\.txt: no `final_\.\.\._exact"),
    ("no size line", r"a\.txt: no `Total submission size \.\.\.: N bytes` line"),
    ("different scripts", r"logs from different scripts: .*seed1\.txt has script_sha256 \w+\.\.\., .*b\.txt has 000000"),
    ("script hash mismatch", r"train_gpt\.py has sha256 \w+\.\.\., but the logs were written by a script with sha256"),
    ("wrapper of another source", r"train_gpt\.py is a self-extracting wrapper whose source has sha256 \w+\.\.\., but "
                                  r"the logs were written by a script with sha256"),
    ("different final lines", r"scored by different final lines \(seed1\.txt: final_sliding_window_exact, "
                              r"b\.txt: final_plain_exact\)"),
    ("duplicate seeds", r"seed 1 twice: .*seed1\.txt and .*again\.txt"),
])
def test_refusals_write_nothing(tiny_runs, tmp_path, capsys, case, message):
    _, script, logs = tiny_runs
    paths, script = refusal_case(case, logs, tmp_path, script)
    records = tmp_path / "records"
    assert make_record.main(record_args(paths, records, script)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), lines
    assert not records.exists()


def test_exactly_600_s_of_training_is_allowed(tiny_runs, tmp_path):
    _, script, logs = tiny_runs
    edited = edited_copy(logs[1], tmp_path / "a.txt", r"^(train_done steps:\d+ train_time:)\d+ms", r"\g<1>599000ms")
    edited_copy(edited, edited, r"^(artifact_saved .* time:)\d+ms", r"\g<1>1000ms")
    assert make_record.main(record_args([edited, logs[2]], tmp_path / "records", script)) == 0


def test_an_existing_folder_is_kept_unless_forced(tiny_runs, tmp_path, capsys):
    _, script, logs = tiny_runs
    records = tmp_path / "records"
    folder = records / "track_10min_16mb" / f"{DATE}_Tiny_Mixer"
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_text("keep me")
    assert make_record.main(record_args([logs[1], logs[2]], records, script)) == 2
    assert "already exists (use --force to replace it)" in capsys.readouterr().err
    assert os.listdir(folder) == ["mine.txt"]
    assert make_record.main(record_args([logs[1], logs[2]], records, script, "--force")) == 0
    assert "mine.txt" not in os.listdir(folder) and (folder / "submission.json").is_file()
    assert os.listdir(folder.parent) == [folder.name]


def test_bad_name_and_date_are_refused(tiny_runs, tmp_path, capsys):
    _, script, logs = tiny_runs
    assert make_record.main(record_args([logs[1]], tmp_path / "r", script, name="two words")) == 2
    assert "--name 'two words' is not allowed" in capsys.readouterr().err
    assert make_record.main(record_args([logs[1]], tmp_path / "r", script, "--date", "25/03/2026")) == 2
    assert "--date '25/03/2026' is not allowed: a date as YYYY-MM-DD" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_crash_while_writing_leaves_no_folder(tiny_runs, tmp_path, monkeypatch):
    _, script, logs = tiny_runs

    def crash(sub):
        raise RuntimeError("disk full")

    monkeypatch.setattr(make_record, "readme_text", crash)
    records = tmp_path / "records"
    with pytest.raises(RuntimeError, match="disk full"):
        make_record.main(record_args([logs[1], logs[2]], records, script))
    assert os.listdir(records / "track_10min_16mb") == []


# ----------------------------------------------------------------------------- plot_run.py

def test_plot_points_are_the_logged_values(tiny_runs):
    _, _, logs = tiny_runs
    text = logs[2].read_text()
    points = plot_run.curve_points(run_log.parse_log(logs[2]))
    steps, losses = points[("train_loss", "step")]
    assert steps == [1, 2, 3, 4] and losses == [float(v) for v in re.findall(r"train_loss:(\S+)", text)]
    times, losses_by_time = points[("train_loss", "time_s")]
    assert times == [float(v) / 1000 for v in re.findall(r"train_loss:\S+ train_time:(\d+)ms", text)]
    assert losses_by_time == losses
    val_steps, bpbs = points[("val_bpb", "step")]
    assert val_steps == [2, 4]  # the periodic point, then the float model's score at the end of training
    assert bpbs == [logged(r"^step:2/4 val_loss:\S+ val_bpb:(\S+)", text), logged(r"^prequant_plain .* val_bpb:(\S+)", text)]
    assert points[("val_bpb", "time_s")][0][-1] == logged(r"^train_done .* train_time:(\d+)ms", text) / 1000


def test_plot_without_matplotlib_says_how_to_install_it(tiny_runs, tmp_path, monkeypatch, capsys):
    _, _, logs = tiny_runs
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert plot_run.main([str(logs[1]), "--out", str(tmp_path / "c.png")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install matplotlib" in lines[0]
    assert os.listdir(tmp_path) == []


def test_plot_writes_one_png_for_several_logs(tiny_runs, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional: pip install matplotlib")
    _, _, logs = tiny_runs
    out = tmp_path / "curves.png"
    assert plot_run.main([str(logs[1]), str(logs[2]), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert os.listdir(tmp_path) == ["curves.png"]


# ----------------------------------------------------------------------------- plot_ladder.py
def ladder_log(src, dst, steps, settings, neural, final=None):
    """A copy of a real tiny log as another rung (train_done's steps) and mixer variant (settings), with
    the given neural-only sliding score and, for a mixer, the mixture's final line after it."""
    text = re.sub(r"^train_done steps:\d+", f"train_done steps:{steps}", src.read_text(), flags=re.M)
    for name, value in settings.items():
        text, count = re.subn(rf"^setting {name}=.*$", f"setting {name}={value}", text, flags=re.M)
        assert count == 1, name
    text, count = re.subn(r"^(final_sliding_window_exact val_loss:\S+ val_bpb:)\S+$", rf"\g<1>{neural}", text,
                          flags=re.M)
    assert count == 1
    if final is not None:
        text += (f"final_sliding_window_ngram_learned_exact val_loss:1.0 val_bpb:{final}\n"
                 f"eval_phases compile_warmup:0ms plain:5ms neural:400ms ttt_train:0ms cache:{int(100 * final)}ms\n")
    dst.write_text(text)
    return str(dst)


@pytest.fixture
def ladder_logs(tiny_runs, tmp_path):
    _, _, logs = tiny_runs
    learned = dict(USE_MIXER="learned")
    return [ladder_log(logs[1], tmp_path / "a.txt", 4, {}, 2.0),
            ladder_log(logs[2], tmp_path / "b.txt", 4, {}, 2.2),  # a second seed of the same rung: averaged
            ladder_log(logs[1], tmp_path / "c.txt", 4, learned, 2.05, 1.8),
            ladder_log(logs[1], tmp_path / "d.txt", 16, {}, 1.5),
            ladder_log(logs[1], tmp_path / "e.txt", 16, learned, 1.49, 1.45),
            ladder_log(logs[1], tmp_path / "f.txt", 16, dict(learned, NGRAM_PRIOR_BETA="2.0"), 1.52, 1.42),
            ladder_log(logs[1], tmp_path / "g.txt", 16, dict(learned, NGRAM_MAX_ORDER="11"), 1.5, 1.47),
            ladder_log(logs[1], tmp_path / "h.txt", 16, dict(learned, NGRAM_ORACLE_TOKENS="200000"), 1.6, 1.40)]


def test_ladder_table_groups_rungs_and_variants_and_measures_against_none(ladder_logs, capsys):
    assert plot_ladder.main([*ladder_logs, "--table"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("| 1,024", "none", "2"), ("| 1,024", "learned", "1"), ("| 4,096", "none", "1"), ("| 4,096", "learned", "1"),
        ("| 4,096", "learned+oracle200000", "1"), ("| 4,096", "learned+orders2-11", "1"),
        ("| 4,096", "learned+prior2", "1")]
    # 1,024 tokens: none is the mean of 2.0 and 2.2; learned gains 2.1 - 1.8 and pays 2.05 - 2.1 in neural score
    assert rows[0][3:5] == ["2.1000", "2.1000"] and rows[0][7] == "- |"  # none: no cache
    assert rows[1][5:] == ["+0.3000", "-0.0500", "45.0% |"]  # cache 180 ms over a neural pass of 400 ms
    assert rows[6][3:] == ["1.5200", "1.4200", "+0.0800", "+0.0200", "35.5% |"]


def test_ladder_without_a_none_run_names_the_rung(ladder_logs, capsys):
    assert plot_ladder.main([ladder_logs[0], ladder_logs[4], "--table"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: no USE_MIXER=none run for the rung(s) of 4,096 training tokens: the gain is measured "
                   "against it (compare_mixers.sh MODES=none)"]


def test_ladder_plot_without_matplotlib_prints_the_table_and_says_how(ladder_logs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_ladder.main([*ladder_logs, "--out", str(tmp_path / "l.png")]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("| training tokens |") and "pip install matplotlib" in err
    assert not (tmp_path / "l.png").exists()


def test_ladder_plot_writes_a_png(ladder_logs, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional: pip install matplotlib")
    out = tmp_path / "ladder.png"
    assert plot_ladder.main([*ladder_logs, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
