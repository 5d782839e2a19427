"""train_gpt.py as users run it: plain python and torchrun with two CPU processes, and bad settings."""
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train_gpt as tg
from make_sample_data import write_shard
from conftest import ROOT, stdlib_documents

TINY_ENV = dict(VOCAB_SIZE="400", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2",
                ROPE_DIMS="8", XSA_LAST_N="1", BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="8", VE_DIM="8", VE_LAYERS="1",
                TRAIN_SEQ_LEN="32", EVAL_SEQ_LEN="32", EVAL_STRIDE="8", TRAIN_BATCH_TOKENS="256",
                VAL_BATCH_SIZE="256", ITERATIONS="6", LR_WARMUP_STEPS="2", WARMDOWN_ITERS="2", TRAIN_LOG_EVERY="2",
                VAL_LOSS_EVERY="3", MAX_WALLCLOCK_SECONDS="0", GRAD_ACCUM_STEPS="1", EMA_DECAY="0.5",
                QUANT_MIN_NUMEL="512",  # the tiny model's matrices do get quantized
                GPTQ_CALIB_SEQS="4", GPTQ_CALIB_SEQ_LEN="32", TTT_BATCH_SIZE="4", TTT_LORA_RANK="8")


@pytest.fixture(scope="module")
def dataset(real_text_tokenizer, tmp_path_factory):
    sp, model_path = real_text_tokenizer
    folder = tmp_path_factory.mktemp("data")
    docs = stdlib_documents(47)
    train = np.concatenate([[sp.bos_id()] + sp.encode(d) for d in docs[:45]])
    text = np.concatenate([sp.encode(d) for d in docs[45:]])  # val: 6 documents of 1,000 tokens, BOS first
    val = np.concatenate([[sp.bos_id()] + text[i * 999:(i + 1) * 999].tolist() for i in range(6)])
    for split, ids in (("train", train), ("val", val)):
        write_shard(folder / f"fineweb_{split}_000000.bin", ids.astype(np.uint16))
    return folder, model_path


def run_script(env_updates, cwd, launcher=(sys.executable,), timeout=300, script=ROOT / "train_gpt.py"):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(env_updates)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([*launcher, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


PREFLIGHT = ROOT / "scripts" / "preflight.py"


def failure(proc):
    """The lines of a failed run that say what went wrong (a child's traceback sits above torchrun's summary)."""
    lines = proc.stderr.splitlines()
    return "\n".join(l for l in lines if "Error" in l or "error" in l or l.startswith("  File"))[-4000:]


def final_bpb(log_text, name):
    return float(re.search(rf"^{name}_exact val_loss:\S+ val_bpb:(\S+)$", log_text, re.M).group(1))


FINAL_LINE = re.compile(r"^final_\S+_exact val_loss:\S+ val_bpb:\S+$", re.M)


@pytest.fixture(scope="module")
def single_run(dataset, tmp_path_factory):
    """(folder the run ran in, its log, its stdout) of one plain `python3 train_gpt.py` run."""
    data, tok = dataset
    folder = tmp_path_factory.mktemp("single")
    proc = run_script(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, RUN_ID="single"), folder)
    assert proc.returncode == 0, failure(proc)
    return folder, (folder / "logs" / "single.txt").read_text(), proc.stdout


def test_one_process_run_logs_settings_steps_and_final_lines(single_run):
    folder, log, stdout = single_run
    assert log == stdout
    sha, size = tg.script_identity()
    assert f"script_sha256:{sha} code_bytes:{size}" in log
    assert "setting NUM_LAYERS=2" in log and "setting VE_LAYERS=1" in log
    assert re.search(r"^step:6/6 train_loss:[\d.]+ train_time:\d+ms step_avg:[\d.]+ms eta:0ms$", log, re.M)
    # eta: the steps left at the pace of the steps so far, whose time is at most the step_avg's (that one
    # also counts the oracle's prefill); not asserted monotonic, since a loaded machine slows the pace
    lines = re.findall(r"^step:(\d)/6 train_loss:.* step_avg:([\d.]+)ms eta:(\d+)ms$", log, re.M)
    assert len(lines) >= 2
    for step, avg, eta in ((int(s), float(a), int(e)) for s, a, e in lines if s != "6"):
        assert 0 < eta <= (6 - step) * avg + 1, (step, avg, eta)
    phases = re.search(r"^eval_phases compile_warmup:(\d+)ms plain:(\d+)ms neural:(\d+)ms ttt_train:(\d+)ms "
                       r"cache:(\d+)ms$", log, re.M)
    assert phases and int(phases.group(3)) > 0 and int(phases.group(4)) == 0
    assert re.search(r"^step:3/6 val_loss:[\d.]+ val_bpb:[\d.]+ ", log, re.M)
    last_bpb = re.findall(r"val_bpb:(\S+)", log)[-1]
    assert log.rstrip().splitlines()[-1].startswith("eval_done eval_time:")
    assert re.search(r"^ngram_oracle tokens:\d+ orders:2,3,4,5,6,7 bytes:\d+ time:\d+ms$", log, re.M)
    assert float(last_bpb) == final_bpb(log, "final_lora_ttt_ngram_learned") > 0  # TTT_ENABLED=1: the default
    assert final_bpb(log, "final_lora_ttt") > 0
    assert re.search(r"^ttt_done docs:6 segments:\d+ phases:0/0 adapted:1 lora:[\d.]+s global_sgd:0.0s padding:",
                     log, re.M)  # 6 documents, fewer than PHASED_TTT_PREFIX_DOCS: no phase would score after one


@pytest.fixture(scope="module")
def wrapper_script(tmp_path_factory):
    """The submission's counted train_gpt.py: the self-extracting wrapper of this source."""
    path = tmp_path_factory.mktemp("wrapper") / "train_gpt.py"
    path.write_bytes(tg.self_extracting_wrapper((ROOT / "train_gpt.py").read_bytes()))
    return path


def test_the_wrapper_runs_this_source_and_counts_its_own_size(single_run, wrapper_script, dataset, tmp_path):
    """Code bytes are the self-extracting wrapper's (the records' count since PR #1530): a run of the
    readable file logs the wrapper's size, and the wrapper, run, logs the readable source's sha256, its
    own size, and the same final lines."""
    _, log, _ = single_run
    data, tok = dataset
    source = (ROOT / "train_gpt.py").read_bytes()
    wrapper = wrapper_script.read_bytes()
    assert tg.wrapped_source(wrapper) == source and tg.self_extracting_wrapper(source) == wrapper
    assert len(wrapper) < len(source) / 2 and wrapper.count(b"\n") == 1
    proc = run_script(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, RUN_ID="wrapped"), tmp_path,
                      script=wrapper_script)
    assert proc.returncode == 0, failure(proc)
    wrapped = (tmp_path / "logs" / "wrapped.txt").read_text()
    header = f"script_sha256:{hashlib.sha256(source).hexdigest()} code_bytes:{len(wrapper)}"
    assert header in log and header in wrapped
    assert re.search(rf"^Total submission size quantized\+\w+: \d+ bytes \(code {len(wrapper)}, ", wrapped, re.M)
    assert FINAL_LINE.findall(wrapped) == FINAL_LINE.findall(log) and len(FINAL_LINE.findall(log)) == 3


def test_run_scores_the_artifact_it_wrote_and_states_its_size(single_run):
    folder, log, _ = single_run
    artifact = folder / "artifacts" / "single.pgqw"
    size = re.search(r"^Total submission size quantized\+\w+: (\d+) bytes \(code (\d+), artifact (\d+)\)$", log, re.M)
    assert size and int(size.group(3)) == artifact.stat().st_size
    assert int(size.group(1)) == int(size.group(2)) + int(size.group(3)) and int(size.group(2)) == tg.script_identity()[1]
    assert re.search(r"^gptq_hessians matrices:\d+ calib_seqs:4 ", log, re.M)
    assert re.search(r"^artifact_try step:\S+ prune:0.00 mlp:int\d@\S+ attn:int\d@\S+ .*compressor:brotli .* fits:1 ",
                     log, re.M)
    assert re.search(r"^artifact_fit chose step:\S+ prune:0.00 ", log, re.M)
    # Order: training, the float model's score, the artifact, then every final line from the artifact.
    lines = log.splitlines()
    at = {key: next(i for i, l in enumerate(lines) if l.startswith(key))
          for key in ("train_done", "prequant_plain", "artifact_saved", "artifact_loaded", "final_plain")}
    assert at["train_done"] < at["prequant_plain"] < at["artifact_saved"] < at["artifact_loaded"] < at["final_plain"]
    assert f"sha256:{hashlib.sha256(artifact.read_bytes()).hexdigest()}" in lines[at["artifact_loaded"]]


def test_artifact_alone_in_a_fresh_process_gives_the_same_scores(single_run, dataset, tmp_path):
    """EVAL_ARTIFACT: no training, no training shards; the artifact file is all the model there is."""
    folder, log, _ = single_run
    data, tok = dataset
    val_only = tmp_path / "val_only"
    val_only.mkdir()
    (val_only / "fineweb_val_000000.bin").write_bytes((data / "fineweb_val_000000.bin").read_bytes())
    proc = run_script(dict(TINY_ENV, DATA_PATH=str(val_only), TOKENIZER_PATH=tok, RUN_ID="reeval",
                           EVAL_ARTIFACT=str(folder / "artifacts" / "single.pgqw")), tmp_path)
    assert proc.returncode == 0, failure(proc)
    again = (tmp_path / "logs" / "reeval.txt").read_text()
    assert "train_done" not in again and "ngram_oracle" not in again
    assert FINAL_LINE.findall(again) == FINAL_LINE.findall(log) and len(FINAL_LINE.findall(log)) == 3


def test_phases_and_the_sliding_window_from_the_artifact(single_run, dataset, tmp_path):
    """One phase after the first document (its global SGD its own eval phase, within the evaluation's time), and
    TTT_ENABLED=0: the stream's sliding window, named so in the last final line."""
    folder, log, _ = single_run
    data, tok = dataset
    artifact = str(folder / "artifacts" / "single.pgqw")
    proc = run_script(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, RUN_ID="phased", EVAL_ARTIFACT=artifact,
                           PHASED_TTT_PREFIX_DOCS="1", GLOBAL_TTT_CHUNK_TOKENS="1024"), tmp_path)
    assert proc.returncode == 0, failure(proc)
    phased = (tmp_path / "logs" / "phased.txt").read_text()
    assert re.search(r"^ttt_done docs:6 segments:\d+ phases:1/1 adapted:1 ", phased, re.M)
    phases = dict(re.findall(r"(\w+):(\d+)ms", re.search(r"^eval_phases .*$", phased, re.M).group(0)))
    eval_ms = int(re.search(r"^eval_done eval_time:(\d+)ms", phased, re.M).group(1))
    assert int(phases["ttt_train"]) > 0 and int(phases["neural"]) > 0
    assert int(phases["plain"]) + int(phases["neural"]) + int(phases["ttt_train"]) + int(phases["cache"]) <= eval_ms + 4
    assert final_bpb(phased, "final_lora_ttt") != final_bpb(log, "final_lora_ttt")
    proc = run_script(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, RUN_ID="sliding", EVAL_ARTIFACT=artifact,
                           TTT_ENABLED="0"), tmp_path)
    assert proc.returncode == 0, failure(proc)
    sliding = (tmp_path / "logs" / "sliding.txt").read_text()
    finals = [line.split()[0] for line in FINAL_LINE.findall(sliding)]
    assert finals == ["final_plain_exact", "final_sliding_window_exact", "final_sliding_window_ngram_learned_exact"]
    assert final_bpb(sliding, "final_plain") == final_bpb(log, "final_plain")  # TTT acts after plain scoring
    assert "ttt_done" not in sliding and final_bpb(sliding, "final_sliding_window") != final_bpb(log, "final_lora_ttt")


def test_training_and_evaluation_with_the_neural_prior(dataset, tmp_path):
    """NGRAM_PRIOR_BETA end to end: the oracle's smoothed experts in the mixer's training loss, the cache's in
    evaluation, and the audit of the real evaluation building their whole rows."""
    data, tok = dataset
    proc = run_script(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, RUN_ID="prior", ITERATIONS="2",
                           VAL_LOSS_EVERY="0", NGRAM_PRIOR_BETA="2", NGRAM_AUDIT_POSITIONS="16"), tmp_path)
    assert proc.returncode == 0, failure(proc)
    log = (tmp_path / "logs" / "prior.txt").read_text()
    assert "setting NGRAM_PRIOR_BETA=2.0" in log and re.search(r"^step:2/2 train_loss:[\d.]+ ", log, re.M)
    audits = re.findall(r"^ngram_audit positions:[1-9]\d* worst_abs_sum_minus_1:(\S+) min_prob:(\S+) "
                        r"worst_target_diff:(\S+)$", log, re.M)
    assert audits and all(float(s) < 1e-6 and float(p) > 0 and float(d) < 1e-9 for s, p, d in audits)
    assert final_bpb(log, "final_lora_ttt_ngram_learned") > 0


def test_a_damaged_artifact_stops_the_evaluation_with_one_line(single_run, dataset, tmp_path):
    folder, _, _ = single_run
    data, tok = dataset
    damaged = tmp_path / "damaged.pgqw"
    damaged.write_bytes((folder / "artifacts" / "single.pgqw").read_bytes()[:-10])
    proc = run_script(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, EVAL_ARTIFACT=str(damaged)), tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "artifact truncated" in lines[0], proc.stderr


def test_an_artifact_that_cannot_fit_stops_before_evaluation(dataset, tmp_path):
    data, tok = dataset
    proc = run_script(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, ITERATIONS="1", VAL_LOSS_EVERY="0",
                           TARGET_BYTES="1000"), tmp_path)
    assert proc.returncode == 2 and "artifact cannot fit" in proc.stderr.strip().splitlines()[-1]
    assert "final_" not in proc.stdout and not (tmp_path / "artifacts").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_an_artifact_failure_stops_every_rank_with_one_line(dataset, tmp_path):
    """Rank 0 builds the artifact alone; the others wait for its outcome, so they stop with it, not hang."""
    data, tok = dataset
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    proc = run_script(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, ITERATIONS="1", VAL_LOSS_EVERY="0",
                           TARGET_BYTES="1000"), tmp_path, launcher, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "artifact cannot fit" in errors[0], proc.stderr[-2000:]
    assert "final_" not in proc.stdout and not (tmp_path / "artifacts").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_torchrun_two_cpu_processes_match_one(dataset, tmp_path):
    data, tok = dataset
    env = dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, ITERATIONS="3", VAL_LOSS_EVERY="0")
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    two = run_script(dict(env, RUN_ID="two"), tmp_path, launcher)
    assert two.returncode == 0, failure(two)
    log_two = (tmp_path / "logs" / "two.txt").read_text()
    assert "world_size:2" in log_two
    one = run_script(dict(env, RUN_ID="one"), tmp_path)
    assert one.returncode == 0, failure(one)
    log_one = (tmp_path / "logs" / "one.txt").read_text()
    # Same global batch and seed: each step trains on the same sequences in one process and in two (only the
    # sums' rounding differs); the evaluation itself is world-size independent to 1e-6 (tests/test_eval.py).
    for name in ("final_lora_ttt", "final_lora_ttt_ngram_learned"):
        assert final_bpb(log_two, name) == pytest.approx(final_bpb(log_one, name), abs=1e-4)


@pytest.mark.parametrize("updates, message", [
    (dict(MODEL_DIM="33"), "MODEL_DIM=33 is not allowed: a multiple of NUM_HEADS"),
    (dict(NUM_KV_HEADS="3", NUM_HEADS="4", MODEL_DIM="32"), "NUM_KV_HEADS=3 is not allowed"),
    (dict(TIE_EMBEDDINGS="yes"), "TIE_EMBEDDINGS='yes' is not allowed: use 0 or 1"),
    (dict(ITERATIONS="ten"), "ITERATIONS='ten' is not allowed: use an integer"),
    (dict(VE_LAYERS="1,7"), "VE_LAYERS='1,7' is not allowed"),
    (dict(EVAL_STRIDE="64"), "EVAL_STRIDE=64 is not allowed: 1..EVAL_SEQ_LEN"),
    (dict(DATA_PATH="/no/such/dir"), "DATA_PATH='/no/such/dir' is not a directory"),
    (dict(TOKENIZER_PATH="/no/such.model"), "TOKENIZER_PATH='/no/such.model' is not a file"),
    (dict(TRAIN_BATCH_TOKENS="100"), "TRAIN_BATCH_TOKENS=100 is not allowed"),
    (dict(VOCAB_SIZE="300"), "VOCAB_SIZE=300 is not allowed: the tokenizer has 400 pieces"),
    (dict(MATRIX_BITS="9"), "MATRIX_BITS=9 is not allowed: 2..8"),
    (dict(LOOP_END="5"), "LOOP_END=5 is not allowed: LOOP_START \\(0\\)..1"),
    (dict(TTT_OPTIMIZER="adamw"), "TTT_OPTIMIZER='adamw' is not allowed: adam or sgd"),
    (dict(TTT_CHUNK_SIZE="48"), "TTT_CHUNK_SIZE=48 is not allowed: 1..EVAL_SEQ_LEN \\(32\\)"),
    (dict(EVAL_ARTIFACT="/no/such.pgqw"), "EVAL_ARTIFACT='/no/such.pgqw' is not allowed"),
    (dict(PREFLIGHT="1"), "PREFLIGHT=1 is not allowed here: the preflight is its own script.* scripts/preflight.py"),
    (dict(DEVICE="gpu"), "DEVICE='gpu' is not allowed: auto or cuda or cpu"),
    (dict(XSA_LAST_N="3"), "XSA_LAST_N=3 is not allowed: 0..NUM_LAYERS \\(2\\)"),
])
def test_bad_settings_stop_with_one_line(dataset, tmp_path, updates, message):
    data, tok = dataset
    env = dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok)
    env.update(updates)
    proc = run_script(env, tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), proc.stderr


def test_bad_shard_stops_with_its_name(dataset, tmp_path):
    data, tok = dataset
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "fineweb_train_000000.bin").write_bytes((data / "fineweb_train_000000.bin").read_bytes())
    (bad / "fineweb_val_000000.bin").write_bytes(b"\0" * 2000)
    proc = run_script(dict(TINY_ENV, DATA_PATH=str(bad), TOKENIZER_PATH=tok), tmp_path, timeout=120)
    assert proc.returncode == 2 and "fineweb_val_000000.bin: magic number 0" in proc.stderr


PREFLIGHT_ROW = re.compile(r"^preflight_(\w+) (.*) projected:(\S+) budget:(\S+) status:(ok|over)$", re.M)


def preflight_rows(log):
    return {m.group(1): m for m in PREFLIGHT_ROW.finditer(log)}


def test_preflight_measures_projects_and_keeps_nothing(dataset, tmp_path):
    data, tok = dataset
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "pre.txt").write_text("the log of an earlier run\n")
    proc = run_script(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, RUN_ID="pre",
                           PHASED_TTT_PREFIX_DOCS="1", GLOBAL_TTT_CHUNK_TOKENS="1024"), tmp_path, script=PREFLIGHT)
    assert proc.returncode == 0, failure(proc)
    log = (tmp_path / "logs" / "pre_preflight.txt").read_text()
    assert log == proc.stdout
    rows = preflight_rows(log)
    assert list(rows) == ["oracle", "steps", "artifact", "training_phase", "evaluation", "host_memory"]
    assert all(row.group(5) == "ok" for row in rows.values())
    assert re.search(r"\npreflight verdict:ok time:\d+s\n$", log)
    # MAX_WALLCLOCK_SECONDS=0: no cap, so every one of the ITERATIONS steps fits and training has no budget
    assert rows["steps"].group(3) == "6" and rows["training_phase"].group(4) == "none"
    assert float(rows["oracle"].group(3).rstrip("s")) > 0
    evaluation = rows["evaluation"].group(2)
    assert "tokens:5999 documents:6 " in evaluation
    assert float(re.search(r"phases_projected:(\S+)s", evaluation).group(1)) > 0
    assert rows["evaluation"].group(4) == "540.0s"
    # nothing kept: no artifact, no score line, the run's own log untouched
    assert not (tmp_path / "artifacts").exists()
    assert "val_bpb" not in log and "Total submission size" not in log
    assert (tmp_path / "logs" / "pre.txt").read_text() == "the log of an earlier run\n"


def test_preflight_names_what_is_over_and_exits_3(dataset, tmp_path):
    data, tok = dataset
    # no reserve left for the artifact after the wall-clock stop, and an evaluation budget of 1 ms
    proc = run_script(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, RUN_ID="over",
                           MAX_WALLCLOCK_SECONDS="600", GPTQ_RESERVE_SECONDS="0", EVAL_BUDGET_SECONDS="0.001"),
                      tmp_path, script=PREFLIGHT)
    assert proc.returncode == 3, failure(proc)
    rows = preflight_rows(proc.stdout)
    assert {name for name, row in rows.items() if row.group(5) == "over"} == {"artifact", "evaluation"}
    assert rows["artifact"].group(4) == "0.0s" and rows["training_phase"].group(4) == "600.0s"
    assert proc.stdout.splitlines()[-1].startswith("preflight verdict:over over:artifact,evaluation ")


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_compiled_preflight_under_torchrun_two_processes(dataset, tmp_path):
    """The path of a paid run: torchrun, compiled, every rank measuring and agreeing on the figures."""
    data, tok = dataset
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    proc = run_script(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, RUN_ID="pre2", PHASED_TTT_PREFIX_DOCS="1",
                           GLOBAL_TTT_CHUNK_TOKENS="1024", COMPILE="1", WARMUP_STEPS="1"),
                      tmp_path, launcher, timeout=900, script=PREFLIGHT)
    assert proc.returncode == 0, failure(proc)
    log = (tmp_path / "logs" / "pre2_preflight.txt").read_text()
    assert "world_size:2" in log and "processes_here:2" in log
    assert re.search(r"^compile_warmup phase:train steps:2 graphs:[1-9]\d* ", log, re.M)
    assert preflight_rows(log)["steps"].group(2).endswith(" recompiles:0")
    assert re.search(r"^eval_done eval_time:\d+ms recompiles:0$", log, re.M)
    assert log.splitlines()[-1].startswith("preflight verdict:ok ")
    assert not (tmp_path / "artifacts").exists()


def test_training_shards_of_another_vocabulary_stop_the_run_before_training(dataset, tmp_path):
    """The user's slip: VOCAB_SIZE=400 with its tokenizer over shards of a larger vocabulary (e.g. sp8192)."""
    data, tok = dataset
    other = tmp_path / "data"
    other.mkdir()
    (other / "fineweb_val_000000.bin").write_bytes((data / "fineweb_val_000000.bin").read_bytes())
    write_shard(other / "fineweb_train_000000.bin", np.array([1, 5, 7000, 9] * 100, dtype=np.uint16))
    proc = run_script(dict(TINY_ENV, DATA_PATH=str(other), TOKENIZER_PATH=tok), tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert re.search(r"^error: .*fineweb_train_000000\.bin: token id 7000 at position 2 is not below VOCAB_SIZE=400, "
                     r"the tokenizer's piece count", lines[0])
    assert "step:" not in proc.stdout
