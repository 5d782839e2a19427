"""data/cached_challenge_fineweb.py without network: paths, resume logic, errors, and a full
run with a fake downloader."""
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import train_gpt as tg
from make_sample_data import write_shard

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("cached_challenge_fineweb",
                                                  ROOT / "data" / "cached_challenge_fineweb.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the module is still executing.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


dl = load_script()

SHARDS = "datasets/datasets/fineweb10B_sp1024"


def fake_fetch(calls: list, bad: str | None = None, sidecar_tokens: int = 10):
    """A downloader that writes a small valid shard (or a truncated one for `bad`; a sidecar of
    `sidecar_tokens`) or a tokenizer stub, and records what it was asked for."""
    def fetch(repo_id: str, remote: str, destination: Path) -> None:
        calls.append((repo_id, remote, destination))
        if remote == bad:
            destination.write_bytes(b"\0" * 100)
        elif remote.endswith(".bin"):
            write_shard(destination, np.arange(sidecar_tokens if "_bytes_" in remote else 10, dtype=np.uint16))
        else:
            destination.write_bytes(b"tokenizer " + remote.encode())
    return fetch


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(dl.TEMPORARY_SUFFIX)]


def test_remote_files_lists_val_then_first_train_shards_then_tokenizer():
    assert dl.remote_files("sp1024", 3) == [
        f"{SHARDS}/fineweb_val_000000.bin",
        f"{SHARDS}/fineweb_train_000000.bin",
        f"{SHARDS}/fineweb_train_000001.bin",
        f"{SHARDS}/fineweb_train_000002.bin",
        "datasets/tokenizers/fineweb_1024_bpe.model",
        "datasets/tokenizers/fineweb_1024_bpe.vocab",
    ]


def test_zero_train_shards_still_fetches_validation_and_tokenizer():
    files = dl.remote_files("sp1024", 0)
    assert [f for f in files if "fineweb_train_" in f] == []
    assert f"{SHARDS}/fineweb_val_000000.bin" in files
    assert len(dl.remote_files("sp1024", 195)) == 1 + 195 + 2


def test_local_paths_drop_the_remote_root_and_sit_next_to_the_script(tmp_path):
    assert dl.DATA_DIR == ROOT / "data"
    assert dl.local_path_for(f"{SHARDS}/fineweb_train_000007.bin", tmp_path) == \
        tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000007.bin"
    assert dl.local_path_for("datasets/tokenizers/fineweb_1024_bpe.model", tmp_path) == \
        tmp_path / "tokenizers" / "fineweb_1024_bpe.model"
    with pytest.raises(ValueError, match="not under the published folder"):
        dl.local_path_for("elsewhere/fineweb_val_000000.bin", tmp_path)


def test_files_to_fetch_skips_complete_files_and_refetches_truncated_shards(tmp_path):
    wanted = dl.remote_files("sp1024", 3)
    shard_dir = tmp_path / "datasets" / "fineweb10B_sp1024"
    shard_dir.mkdir(parents=True)
    write_shard(shard_dir / "fineweb_val_000000.bin", np.arange(50, dtype=np.uint16))
    write_shard(shard_dir / "fineweb_train_000000.bin", np.arange(20, dtype=np.uint16))
    # A download cut short: the header promises 100 tokens, the file holds 10.
    header = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (tg.SHARD_MAGIC, tg.SHARD_VERSION, 100)
    (shard_dir / "fineweb_train_000001.bin").write_bytes(header.tobytes() + np.arange(10, dtype="<u2").tobytes())
    (tmp_path / "tokenizers").mkdir()
    (tmp_path / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model")

    assert dl.files_to_fetch(wanted, tmp_path) == [
        f"{SHARDS}/fineweb_train_000001.bin",
        f"{SHARDS}/fineweb_train_000002.bin",
        "datasets/tokenizers/fineweb_1024_bpe.vocab",
    ]


def test_full_run_places_files_and_leaves_no_temporary_files(tmp_path, capsys):
    calls = []
    assert dl.main(["--variant", "sp1024", "--train-shards", "2", "--local-dir", str(tmp_path)],
                   fetch=fake_fetch(calls)) == 0
    shard_dir = tmp_path / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in shard_dir.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    assert sorted(p.name for p in (tmp_path / "tokenizers").iterdir()) == [
        "fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab"]
    assert tg.shard_token_count(shard_dir / "fineweb_val_000000.bin") == 10
    assert leftovers(tmp_path) == []
    # Every fetch wrote to a temporary name beside its final one, never to the final name.
    assert all(dest.name.endswith(dl.TEMPORARY_SUFFIX) for _, _, dest in calls)
    assert {repo for repo, _, _ in calls} == {"willdepueoai/parameter-golf"}

    # Run again with one more shard: only the new shard is fetched.
    calls.clear()
    assert dl.main(["--train-shards", "3", "--local-dir", str(tmp_path)], fetch=fake_fetch(calls)) == 0
    assert [remote for _, remote, _ in calls] == [f"{SHARDS}/fineweb_train_000002.bin"]


def test_truncated_download_fails_without_leaving_a_file(tmp_path, capsys):
    bad = f"{SHARDS}/fineweb_train_000000.bin"
    assert dl.main(["--train-shards", "1", "--local-dir", str(tmp_path)], fetch=fake_fetch([], bad=bad)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fineweb_train_000000.bin" in err[0] and "not a whole shard" in err[0]
    assert not dl.local_path_for(bad, tmp_path).exists()
    assert leftovers(tmp_path) == []


def test_repo_id_comes_from_option_then_environment(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv(dl.REPO_ID_ENV, "someone/mirror")
    dl.main(["--train-shards", "0", "--local-dir", str(tmp_path / "a")], fetch=fake_fetch(calls))
    dl.main(["--train-shards", "0", "--local-dir", str(tmp_path / "b"), "--repo-id", "me/copy"],
            fetch=fake_fetch(calls))
    assert [repo for repo, _, _ in calls] == ["someone/mirror"] * 3 + ["me/copy"] * 3


def test_missing_huggingface_hub_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert dl.main(["--train-shards", "1", "--local-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["huggingface_hub is not installed: pip install huggingface_hub"]
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_hub_fetch_asks_the_dataset_repo_and_copies_the_cached_file(tmp_path, monkeypatch):
    cached = tmp_path / "cache" / "blob"
    cached.parent.mkdir()
    write_shard(cached, np.arange(5, dtype=np.uint16))
    asked = {}

    def hf_hub_download(**kwargs):
        asked.update(kwargs)
        return str(cached)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    destination = tmp_path / "out.bin.tmp"
    dl.hub_fetch("org/repo", f"{SHARDS}/fineweb_val_000000.bin", destination)
    assert asked == {"repo_id": "org/repo", "filename": f"{SHARDS}/fineweb_val_000000.bin", "repo_type": "dataset"}
    assert destination.read_bytes() == cached.read_bytes()


def test_hub_errors_become_one_line_download_failures(tmp_path, monkeypatch, capsys):
    def hf_hub_download(**kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    assert dl.main(["--train-shards", "0", "--local-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fineweb_val_000000.bin" in err[0] and "no route to host" in err[0]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("argv, option, allowed", [
    (["--variant", "sp9"], "--variant", "sp1024"),
    (["--train-shards", "-1"], "--train-shards", "0..195"),
    (["--train-shards", "196"], "--train-shards", "0..195"),
    (["--train-shards", "ten"], "--train-shards", "int"),
])
def test_bad_arguments_exit_2_with_one_line(argv, option, allowed, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dl.main(argv + ["--local-dir", str(tmp_path)], fetch=fake_fetch([]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option in err[0] and allowed in err[0]
    assert list(tmp_path.iterdir()) == []


CASEOPS = "sp8192_lossless_caps_caseops_v1_reserved"


@pytest.mark.parametrize("variant, repo, train, tokenizer", [
    ("sp4096", "kevclark/parameter-golf", 143, "fineweb_4096_bpe"),
    ("sp8192", "kevclark/parameter-golf", 128, "fineweb_8192_bpe"),
    (CASEOPS, "romeerp/parameter-golf-caseops-v1", 80, f"fineweb_8192_bpe_{CASEOPS[7:]}"),
])
def test_each_variant_is_fetched_whole_from_the_repository_that_publishes_it(variant, repo, train, tokenizer,
                                                                             tmp_path, monkeypatch):
    monkeypatch.delenv(dl.REPO_ID_ENV, raising=False)
    shards = f"datasets/datasets/fineweb10B_{variant}"
    sidecar = [f"{shards}/fineweb_val_bytes_000000.bin"] if variant == CASEOPS else []
    assert dl.remote_files(variant, 1) == [f"{shards}/fineweb_val_000000.bin", *sidecar,
                                           f"{shards}/fineweb_train_000000.bin",
                                           f"datasets/tokenizers/{tokenizer}.model",
                                           f"datasets/tokenizers/{tokenizer}.vocab"]
    assert dl.VARIANTS[variant].train_shards == train
    calls = []
    assert dl.main(["--variant", variant, "--train-shards", "1", "--local-dir", str(tmp_path)],
                   fetch=fake_fetch(calls)) == 0
    assert {r for r, _, _ in calls} == {repo} and len(calls) == 4 + len(sidecar)
    # where train_gpt.py looks for this vocabulary (and CaseOps) when DATA_PATH and TOKENIZER_PATH are unset
    data, tok = tg.default_data_paths(int(variant[2:6]), variant == CASEOPS)
    assert (tmp_path / data.removeprefix("./data/") / "fineweb_train_000000.bin").is_file()
    assert (tmp_path / tok.removeprefix("./data/")).is_file()


@pytest.mark.parametrize("argv, env, message", [
    (["--variant", "sp8192", "--repo-id", "willdepueoai/parameter-golf"], None,
     "sp8192 is not published in willdepueoai/parameter-golf (from --repo-id) but in kevclark/parameter-golf"),
    (["--variant", "sp1024"], "kevclark/parameter-golf",
     "sp1024 is not published in kevclark/parameter-golf (from MATCHED_FINEWEB_REPO_ID) but in "
     "willdepueoai/parameter-golf: pass --repo-id willdepueoai/parameter-golf or unset MATCHED_FINEWEB_REPO_ID"),
    (["--variant", CASEOPS, "--repo-id", "kevclark/parameter-golf"], None,
     f"{CASEOPS} is not published in kevclark/parameter-golf (from --repo-id) but in romeerp/parameter-golf-caseops-v1"),
    (["--variant", "sp8192", "--train-shards", "129"], None, "129 is not in 0..128"),
])
def test_a_variant_asked_of_a_repository_that_does_not_publish_it_is_one_line(argv, env, message, tmp_path,
                                                                              monkeypatch, capsys):
    monkeypatch.delenv(dl.REPO_ID_ENV, raising=False)
    if env:
        monkeypatch.setenv(dl.REPO_ID_ENV, env)
    calls = []
    with pytest.raises(SystemExit) as exit_info:
        dl.main(argv + ["--local-dir", str(tmp_path)], fetch=fake_fetch(calls))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_a_mirror_of_unknown_name_is_trusted_with_any_variant(tmp_path):
    calls = []
    assert dl.main(["--variant", "sp8192", "--train-shards", "0", "--repo-id", "me/mirror", "--local-dir",
                    str(tmp_path)], fetch=fake_fetch(calls)) == 0
    assert {r for r, _, _ in calls} == {"me/mirror"}


def test_a_sidecar_of_another_length_than_its_shard_fails_and_is_fetched_again(tmp_path, capsys):
    argv = ["--variant", CASEOPS, "--train-shards", "0", "--local-dir", str(tmp_path)]
    assert dl.main(argv, fetch=fake_fetch([], sidecar_tokens=9)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fineweb_val_bytes_000000.bin: 9 byte counts for the 10 tokens of fineweb_val_000000.bin" \
        in err[0]
    calls = []
    assert dl.main(argv, fetch=fake_fetch(calls)) == 0
    assert [remote.rsplit("/", 1)[1] for _, remote, _ in calls] == ["fineweb_val_bytes_000000.bin"]
