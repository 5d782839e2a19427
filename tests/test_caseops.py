"""CaseOps end to end on a sample made here: the case transform, the byte sidecar, and runs scored on the
original text's bytes (plain, sliding with TTT, the n-gram mixer and its audit), in one and two processes."""
import json
import random
import re
import sys

import pytest

import train_gpt as tg
from conftest import stdlib_documents
from test_end_to_end import TINY_ENV, failure, run_script
from test_sample_data import msd

VOCAB = 400
PROSE = ("The NASA Launch of iPhone OpenAI and McDonald's: I said HELLO to Ms. O'Neil in PARIS. "
         "Über café 東京 \ue000 \ue003 escaped operators, x86_64 ABCdef aBC.\n")


def random_text(rng: random.Random) -> str:
    alphabet = "aAbBzZ NASA iPhone \ue000\ue001\ue002\ue003é東🚀\n\t1_'-"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))


def test_the_transform_round_trips_every_document_exactly():
    rng = random.Random(0)
    docs = [random_text(rng) for _ in range(2000)] + stdlib_documents(30) + [PROSE, "", "A", "I\ue001", "\ue003\ue003"]
    for doc in docs:
        encoded = msd.case_encode(doc)
        assert msd.case_decode(encoded) == doc
        assert not re.search("[A-Z]", encoded)  # every ASCII capital became an operator
    assert msd.case_encode("The NASA iPhone") == "\ue000the \ue001nasa i\ue002phone"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(data folder, tokenizer, manifest) of a CaseOps sample of standard-library code and capitalised prose."""
    corpus = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(stdlib_documents(60)):
        (corpus / f"doc{i:02d}.py").write_text(doc + PROSE * (i % 3), encoding="utf-8")
    out = tmp_path_factory.mktemp("caseops")
    assert msd.main(["--text-dir", str(corpus), "--out", str(out / "data"), "--tokenizer-out", str(out / "tok.model"),
                     "--vocab-size", str(VOCAB), "--val-fraction", "0.1", "--max-val-chars", "12000", "--caseops"]) == 0
    return out / "data", out / "tok.model", json.loads((out / "data" / "sample_manifest.json").read_text())


def test_the_sidecar_sums_to_the_original_text_and_the_pieces_would_not(sample):
    data, tok, manifest = sample
    sp = tg.load_tokenizer(str(tok))
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(msd.CASE_OPERATORS)
    tokens = tg.load_validation_tokens(data, VOCAB)
    sidecar = tg.validation_byte_sidecar(data, tokens, caseops=True)
    assert int(sidecar.sum()) == manifest["splits"]["val"]["original_bytes"] > 0
    for doc in stdlib_documents(3) + [PROSE, "  leading spaces\ue003"]:
        assert sum(msd.original_byte_counts(sp, sp.encode(msd.case_encode(doc)))) == len(doc.encode("utf-8"))
    # the tokenizer's pieces count each operator as its 3 UTF-8 bytes: why CaseOps needs the sidecar
    pieces = tg.target_byte_counts(tokens[:-1], tokens[1:], tg.token_byte_tables(sp, VOCAB))
    assert int(pieces.sum()) > int(sidecar.sum())


CASEOPS_ENV = dict(TINY_ENV, VOCAB_SIZE=str(VOCAB), CASEOPS_ENABLED="1", ITERATIONS="4", VAL_LOSS_EVERY="0",
                   NGRAM_CHUNK_TOKENS="1024", NGRAM_AUDIT_POSITIONS="8",
                   EVAL_BUDGET_SECONDS="100000")  # TTT adapts on every document, whatever this machine's pace
FINAL = re.compile(r"^(final_\S+) val_loss:\S+ val_bpb:\S+ eval_time:\S+ scored_tokens:(\d+) scored_bytes:(\d+)$", re.M)


@pytest.fixture(scope="module")
def caseops_run(sample, tmp_path_factory):
    data, tok, manifest = sample
    folder = tmp_path_factory.mktemp("run")
    proc = run_script(dict(CASEOPS_ENV, DATA_PATH=str(data), TOKENIZER_PATH=str(tok), RUN_ID="co"), folder)
    assert proc.returncode == 0, failure(proc)
    return folder, (folder / "logs" / "co.txt").read_text()


def test_every_evaluation_path_charges_the_original_texts_bytes(sample, caseops_run):
    _, _, manifest = sample
    _, log = caseops_run
    assert "bytes_from:sidecar" in log
    finals = {name: int(nbytes) for name, _, nbytes in FINAL.findall(log)}
    assert set(finals) == {"final_plain", "final_lora_ttt", "final_lora_ttt_ngram_learned"}
    assert set(finals.values()) == {manifest["splits"]["val"]["original_bytes"]}
    assert "ttt_stopped" not in log and re.search(r"^ttt_done docs:\d+ segments:\d+ phases:\S+ adapted:1 ", log, re.M)
    audit = re.search(r"^ngram_audit positions:(\d+) worst_abs_sum_minus_1:(\S+) min_prob:(\S+)", log, re.M)
    assert int(audit[1]) == 8 and float(audit[2]) < 1e-6 and float(audit[3]) > 0


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_two_processes_score_the_artifact_as_one_does(sample, caseops_run, tmp_path):
    data, tok, _ = sample
    folder, log = caseops_run
    env = dict(CASEOPS_ENV, DATA_PATH=str(data), TOKENIZER_PATH=str(tok), RUN_ID="two",
               EVAL_ARTIFACT=str(folder / "artifacts" / "co.pgqw"))
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    proc = run_script(env, tmp_path, launcher)
    assert proc.returncode == 0, failure(proc)
    two = (tmp_path / "logs" / "two.txt").read_text()
    assert "world_size:2" in two
    bpb = lambda text: dict(re.findall(r"^(final_\S+)_exact val_loss:\S+ val_bpb:(\S+)$", text, re.M))
    one, both = bpb(log), bpb(two)
    assert one.keys() == both.keys() and len(one) == 3
    for name in one:
        assert float(both[name]) == pytest.approx(float(one[name]), abs=1e-6), name


@pytest.mark.parametrize("updates, message", [
    (dict(CASEOPS_ENABLED="0"), r"CASEOPS_ENABLED=0 is not allowed with DATA_PATH=.*set CASEOPS_ENABLED=1"),
    (dict(VOCAB_SIZE="8192"), r"VOCAB_SIZE=8192 is not allowed: the tokenizer has 400 pieces"),
])
def test_caseops_data_read_as_plain_data_stops_at_start(sample, tmp_path, updates, message):
    data, tok, _ = sample
    proc = run_script(dict(CASEOPS_ENV, DATA_PATH=str(data), TOKENIZER_PATH=str(tok), **updates), tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and re.search(message, lines[0]), proc.stderr[-2000:]
    assert "step:" not in proc.stdout
