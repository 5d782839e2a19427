"""scripts/make_sample_data.py: on a tiny corpus written here, with a 300-piece tokenizer."""
import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_sample_data.py"
VOCAB = 300
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud "
         "return value index count print open close").split()


def _load_script():
    spec = importlib.util.spec_from_file_location("make_sample_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


msd = _load_script()


def _random_document(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 14)):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
        lines.append(" " * rng.choice([0, 0, 4, 8]) + words + rng.choice([":", ".", ",", "", "()"]))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two dozen small documents in nested folders, plus files the script must skip."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1234)
    (folder / "code").mkdir()
    (folder / "notes" / "deep").mkdir(parents=True)
    for i in range(24):
        sub, suffix = [("", ".txt"), ("code", ".py"), ("notes", ".md"), ("notes/deep", ".rst")][i % 4]
        (folder / sub / f"doc{i:02d}{suffix}").write_text(_random_document(rng), encoding="utf-8")
    # Whitespace at the start, tabs, CRLF and characters outside the training alphabet must survive.
    (folder / "odd_spaces.txt").write_bytes(b"   starts with spaces\n\tthen a tab\r\nand crlf\n")
    (folder / "unicode.md").write_text("caf\u00e9 na\u00efve \u6771\u4eac \U0001f680\nalpha beta\n", encoding="utf-8")
    (folder / "copy.txt").write_bytes((folder / "doc00.txt").read_bytes())
    (folder / "broken.txt").write_bytes(b"\xff\xfe not utf-8 \xc3\x28\n")
    (folder / "empty.txt").write_text("", encoding="utf-8")
    (folder / "ignored.json").write_text('{"alpha": 1}\n', encoding="utf-8")
    return folder


def run(capsys, *argv) -> tuple[int, str, str]:
    code = msd.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def build_args(corpus: Path, where: Path, *extra) -> list:
    return ["--text-dir", corpus, "--out", where / "data", "--tokenizer-out", where / "tok.model",
            "--vocab-size", VOCAB, "--val-fraction", 0.3, *extra]


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("built")
    assert msd.main([str(a) for a in build_args(corpus, where)]) == 0
    return where


def shard_tokens(folder: Path, split: str) -> np.ndarray:
    files = sorted(folder.glob(f"fineweb_{split}_*.bin"))
    assert files, f"no {split} shards in {folder}"
    return np.concatenate([tg.load_shard(f, VOCAB) for f in files])


def decoded_documents(where: Path, split: str) -> list[str]:
    sp = spm.SentencePieceProcessor(model_file=str(where / "tok.model"))
    tokens = shard_tokens(where / "data", split)
    assert tokens[0] == sp.bos_id() == msd.BOS_ID
    starts = np.flatnonzero(tokens == msd.BOS_ID)
    return [sp.decode(doc[1:].tolist()) for doc in np.split(tokens, starts[1:])]


def test_two_runs_give_identical_bytes(corpus, built, tmp_path, capsys):
    assert run(capsys, *build_args(corpus, tmp_path))[0] == 0
    assert (tmp_path / "tok.model").read_bytes() == (built / "tok.model").read_bytes()
    names = sorted(p.name for p in (built / "data").glob("fineweb_*.bin"))
    assert names == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    for name in names:
        assert (tmp_path / "data" / name).read_bytes() == (built / "data" / name).read_bytes()


def test_splits_are_disjoint_and_hold_every_usable_document(corpus, built):
    train, val = decoded_documents(built, "train"), decoded_documents(built, "val")
    assert train and val
    assert not set(val) & set(train)
    usable = {p.read_bytes().decode("utf-8") for p in corpus.rglob("*") if p.suffix in msd.TEXT_SUFFIXES
              and p.name not in ("broken.txt", "empty.txt")}
    assert sorted(train + val) == sorted(usable)  # each once: the copy of doc00 is dropped


def test_val_shard_decodes_to_the_val_documents_exactly(corpus, built):
    collected = msd.collect_documents([corpus], use_stdlib=False)
    assert (collected.not_utf8, collected.empty, collected.duplicate) == (1, 1, 1)
    _, val = msd.split_documents(collected.documents, 0.3, 10**9, 10**9)
    assert decoded_documents(built, "val") == [d.text for d in val]
    everything = decoded_documents(built, "train") + decoded_documents(built, "val")
    assert "   starts with spaces\n\tthen a tab\r\nand crlf\n" in everything
    assert "caf\u00e9 na\u00efve \u6771\u4eac \U0001f680\nalpha beta\n" in everything


def test_tokenizer_has_the_published_control_ids(built):
    sp = spm.SentencePieceProcessor(model_file=str(built / "tok.model"))
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.vocab_size()) == (0, 1, 2, 3, VOCAB)
    assert any("\n" in sp.id_to_piece(i) for i in range(sp.vocab_size()))


def test_byte_accounting_matches_the_decoded_val_text(built):
    sp = spm.SentencePieceProcessor(model_file=str(built / "tok.model"))
    tokens = shard_tokens(built / "data", "val").astype(np.int64)
    import torch

    t = torch.from_numpy(tokens)
    counted = int(tg.target_byte_counts(t[:-1], t[1:], tg.token_byte_tables(sp, VOCAB)).sum())
    assert counted == sum(len(doc.encode("utf-8")) for doc in decoded_documents(built, "val"))


def test_shard_tokens_splits_into_shards_that_concatenate_to_the_single_shard(corpus, built, tmp_path, capsys):
    assert run(capsys, *build_args(corpus, tmp_path, "--shard-tokens", 150))[0] == 0
    for split in ("train", "val"):
        files = sorted((tmp_path / "data").glob(f"fineweb_{split}_*.bin"))
        sizes = [tg.shard_token_count(f) for f in files]
        assert len(files) >= 2 and max(sizes) == 150 and all(s > 0 for s in sizes)
        assert np.array_equal(shard_tokens(tmp_path / "data", split), shard_tokens(built / "data", split))


def test_character_caps_bound_each_split(corpus, tmp_path, capsys):
    assert run(capsys, *build_args(corpus, tmp_path, "--max-train-chars", 2000, "--max-val-chars", 600))[0] == 0
    assert sum(map(len, decoded_documents(tmp_path, "train"))) <= 2000
    assert 0 < sum(map(len, decoded_documents(tmp_path, "val"))) <= 600


def test_tokenizer_sample_spans_the_train_documents():
    docs = [msd.Document("src", f"d{i:02d}", "x" * 100) for i in range(20)]
    assert msd.tokenizer_sample(docs, 0) == docs and msd.tokenizer_sample(docs, 5000) == docs
    assert msd.tokenizer_sample(docs, 500) == docs[::4][:5]  # every 4th: 5 documents, first to last


def test_tokenizer_train_chars_changes_only_the_tokenizer_sample(corpus, built, tmp_path, capsys):
    assert run(capsys, *build_args(corpus, tmp_path, "--tokenizer-train-chars", 10**9))[0] == 0
    assert (tmp_path / "tok.model").read_bytes() == (built / "tok.model").read_bytes()


@pytest.mark.parametrize("extra, option", [
    (["--text-dir", "/no/such/folder"], "--text-dir=/no/such/folder"),
    (["--vocab-size", "259"], "--vocab-size=259"),
    (["--vocab-size", "70000"], "--vocab-size=70000"),
    (["--vocab-size", "5000"], "--vocab-size=5000"),  # more pieces than the corpus has merges for
    (["--val-fraction", "0"], "--val-fraction=0.0"),
    (["--val-fraction", "1.5"], "--val-fraction=1.5"),
    (["--val-fraction", "0.0000001"], "val split is empty"),
    (["--max-val-chars", "5"], "--max-val-chars"),
    (["--max-train-chars", "0"], "--max-train-chars=0"),
    (["--shard-tokens", "0"], "--shard-tokens=0"),
    (["--tokenizer-train-chars", "-1"], "--tokenizer-train-chars=-1"),
    (["--vocab-size", "many"], "--vocab-size"),
])
def test_bad_input_stops_with_one_line_and_exit_2(corpus, tmp_path, capsys, extra, option):
    code, out, err = run(capsys, *build_args(corpus, tmp_path), *extra)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and option in err
    assert not (tmp_path / "tok.model").exists() and not list(tmp_path.rglob("fineweb_*.bin"))


def test_a_folder_without_documents_is_an_error(tmp_path, capsys):
    (tmp_path / "empty_corpus").mkdir()
    (tmp_path / "empty_corpus" / "binary.txt").write_bytes(b"\xff\xff")
    code, _, err = run(capsys, *build_args(tmp_path / "empty_corpus", tmp_path))
    assert code == 2 and err.count("\n") == 1 and "no documents found" in err and "1 not UTF-8" in err


def test_command_line_exit_code(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--val-fraction", "2", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--val-fraction=2.0" in result.stderr


def test_existing_outputs_are_kept_and_partial_or_forced_ones_rebuilt(corpus, tmp_path, capsys):
    args = build_args(corpus, tmp_path)
    code, out, _ = run(capsys, *args)
    assert code == 0 and "skipped_not_utf8:1" in out and "split:val docs:" in out
    shard = tmp_path / "data" / "fineweb_val_000000.bin"
    before = shard.stat().st_mtime_ns, shard.read_bytes()

    code, out, _ = run(capsys, *args)
    assert code == 0 and "exists" in out and shard.stat().st_mtime_ns == before[0]

    shard.unlink()  # a partial output
    code, out, _ = run(capsys, *args)
    assert code == 0 and "split:val" in out and shard.read_bytes() == before[1]

    code, out, _ = run(capsys, *args, "--force")
    assert code == 0 and "split:val" in out and shard.stat().st_mtime_ns != before[0]

    code, out, _ = run(capsys, *args[:-2], "--val-fraction", "0.5")  # other settings: rebuilt
    assert code == 0 and "split:val" in out


def test_stale_and_foreign_shards(corpus, tmp_path, capsys):
    foreign = tmp_path / "data" / "fineweb_train_000007.bin"
    foreign.parent.mkdir()
    msd.write_shard(foreign, np.arange(10, dtype=np.uint16))
    code, _, err = run(capsys, *build_args(corpus, tmp_path))
    assert code == 2 and "--out=" in err and foreign.exists()

    assert run(capsys, *build_args(corpus, tmp_path, "--force"))[0] == 0
    assert not foreign.exists()  # train_gpt would read every fineweb_train_* file it finds
