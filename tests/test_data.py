"""Shard format, the training stream, and bits-per-byte accounting."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from make_sample_data import write_shard
from conftest import stdlib_documents


def test_shard_round_trip(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 300
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    assert tg.shard_token_count(tmp_path / "fineweb_train_000000.bin") == 1000
    np.testing.assert_array_equal(tg.load_shard(tmp_path / "fineweb_train_000000.bin", 300), tokens)
    assert not list(tmp_path.glob("*.tmp"))


def _header(magic=tg.SHARD_MAGIC, version=tg.SHARD_VERSION, count=10):
    header = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (magic, version, count)
    return header.tobytes()


@pytest.mark.parametrize("content, message", [
    (_header(magic=123) + b"\0" * 20, "magic number 123"),
    (_header(version=7) + b"\0" * 20, "shard version 7"),
    (_header(count=10) + b"\0" * 18, "declares 10 tokens"),
    (_header(count=10) + b"\0" * 22, "declares 10 tokens"),
    (b"\0" * 100, "shorter than"),
])
def test_bad_shards_are_refused_with_their_name(tmp_path, content, message):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(content)
    with pytest.raises(tg.ShardError) as err:
        tg.load_shard(path, 1024)
    assert message in str(err.value) and str(path) in str(err.value)


def test_token_id_outside_vocabulary_is_refused(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.array([1, 5, 1024, 3], dtype=np.uint16))
    with pytest.raises(tg.ShardError, match=r"token id 1024 at position 2 .*VOCAB_SIZE=1024"):
        tg.load_shard(path, 1024)


def test_missing_shards_say_how_to_get_data(tmp_path):
    with pytest.raises(tg.ShardError, match="cached_challenge_fineweb.py.*make_sample_data.py"):
        tg.shard_files(tmp_path, "train")


def test_validation_split_is_every_val_file_in_order(tmp_path):
    write_shard(tmp_path / "fineweb_val_000001.bin", np.array([7, 8], dtype=np.uint16))
    write_shard(tmp_path / "fineweb_val_000000.bin", np.array([4, 5, 6], dtype=np.uint16))
    write_shard(tmp_path / "fineweb_train_000000.bin", np.array([9, 9], dtype=np.uint16))
    assert tg.load_validation_tokens(tmp_path, 16).tolist() == [4, 5, 6, 7, 8]


def _write_train_shards(folder, sizes):
    start = 0
    for i, size in enumerate(sizes):
        write_shard(folder / f"fineweb_train_{i:06d}.bin", (np.arange(start, start + size) % 60000).astype(np.uint16))
        start += size


def test_batches_are_deterministic_for_a_seed_and_split_between_ranks(tmp_path):
    _write_train_shards(tmp_path, [500, 300, 700])
    files = tg.shard_files(tmp_path, "train")

    def batches(seed, rank, world):
        loader = tg.DistributedBatchLoader(files, 60000, seed, rank, world)
        return [loader.step_batches(64, 1, 8, torch.device("cpu"))[0] for _ in range(30)]

    again = batches(1, 0, 1)
    for b1, b2 in zip(batches(1, 0, 1), again):
        assert torch.equal(b1.inputs, b2.inputs) and torch.equal(b1.targets, b2.targets)
    assert any(not torch.equal(a.inputs, b.inputs) for a, b in zip(batches(1, 0, 1), batches(2, 0, 1)))
    for r0, r1 in zip(batches(1, 0, 2), batches(1, 1, 2)):
        (x0, y0), (x1, y1) = (r0.inputs, r0.targets), (r1.inputs, r1.targets)
        assert x0.shape == x1.shape == (4, 8)
        assert not set(x0.flatten().tolist()) & set(x1.flatten().tolist())
        # targets are the inputs shifted by one within each rank's contiguous span
        assert torch.equal(x0.flatten()[1:], y0.flatten()[:-1])


def test_a_step_trains_on_the_same_sequences_for_any_world_size_and_accumulation(tmp_path):
    """Each step reads TRAIN_BATCH_TOKENS + 1 tokens and cuts them into WORLD_SIZE x accum pieces: the
    step's (input, target) rows are the same whether 1, 2 or 8 processes take them, with or without
    accumulation, so a 1-GPU trial trains on the 8-GPU run's tokens."""
    _write_train_shards(tmp_path, [500, 300, 700])
    files = tg.shard_files(tmp_path, "train")

    def step_rows(world, accum, steps=12):
        loaders = [tg.DistributedBatchLoader(files, 60000, 5, rank, world) for rank in range(world)]
        out = []
        for _ in range(steps):
            batches = [b for loader in loaders for b in loader.step_batches(128, accum, 8, torch.device("cpu"))]
            out.append(sorted(map(tuple, torch.cat([torch.cat((b.inputs, b.targets[:, -1:]), 1) for b in batches]).tolist())))
        return out

    reference = step_rows(1, 1)
    assert len(reference[0]) == 16 and len({row for step in reference for row in step}) > 100
    for world, accum in ((1, 8), (2, 4), (8, 1), (4, 2), (2, 1)):
        assert step_rows(world, accum) == reference, (world, accum)


def test_stream_crosses_shards_and_revisits_them_all(tmp_path):
    _write_train_shards(tmp_path, [100, 50, 70])
    stream = tg.TokenStream(tg.shard_files(tmp_path, "train"), 60000, seed=3)
    first_pass, places = stream.take(220)
    assert sorted(first_pass.tolist()) == list(range(220))
    # tokens were written as their own position in name order, so the positions must equal them
    assert places.tolist() == first_pass.tolist()


def _token_stream_with_documents(sp, docs):
    ids = []
    for doc in docs:
        ids += [sp.bos_id()] + sp.encode(doc)
    return torch.tensor(ids)


def test_byte_count_equals_utf8_length_of_decoded_text(real_text_tokenizer):
    sp, _ = real_text_tokenizer
    # Documents the tokenizer never saw, with non-ASCII text so byte-fallback pieces occur too.
    docs = stdlib_documents(60)[45:60] + ["naïve café — 東京 🚀 résumé\n  indented  twice", "  leading spaces"]
    tokens = _token_stream_with_documents(sp, docs)
    tables = tg.token_byte_tables(sp, 400)
    counted = int(tg.target_byte_counts(tokens[:-1], tokens[1:], tables).sum())
    expected = sum(len(sp.decode(sp.encode(doc)).encode("utf-8")) for doc in docs)
    assert counted == expected
    assert any(sp.is_byte(int(t)) for t in tokens)


@pytest.mark.parametrize("vocab", [100, 480])
def test_a_tokenizer_of_another_size_than_vocab_size_is_refused(real_text_tokenizer, vocab):
    sp, _ = real_text_tokenizer
    with pytest.raises(tg.ConfigError, match=rf"^VOCAB_SIZE={vocab} is not allowed: the tokenizer has 400 pieces; "
                                             "VOCAB_SIZE must equal that"):
        tg.token_byte_tables(sp, vocab)
    assert tg.token_byte_tables(sp, 400).base_bytes.numel() == 400


@pytest.mark.parametrize("env, data, tokenizer", [
    ({}, "./data/datasets/fineweb10B_sp1024", "./data/tokenizers/fineweb_1024_bpe.model"),
    ({"VOCAB_SIZE": "8192"}, "./data/datasets/fineweb10B_sp8192", "./data/tokenizers/fineweb_8192_bpe.model"),
    ({"VOCAB_SIZE": "4096"}, "./data/datasets/fineweb10B_sp4096", "./data/tokenizers/fineweb_4096_bpe.model"),
    ({"VOCAB_SIZE": "8192", "CASEOPS_ENABLED": "1"},
     "./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
     "./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"),
    ({"VOCAB_SIZE": "8192", "DATA_PATH": "/d", "TOKENIZER_PATH": "/t.model"}, "/d", "/t.model"),
    ({"VOCAB_SIZE": "8192", "DATA_PATH": "/d"}, "/d", "./data/tokenizers/fineweb_8192_bpe.model"),
])
def test_data_and_tokenizer_paths_follow_vocab_size_unless_given(env, data, tokenizer):
    cfg = tg.Hyperparameters.from_env(env, cuda=False)
    assert (cfg.data_path, cfg.tokenizer_path) == (data, tokenizer)
    assert f"setting DATA_PATH={data}" in cfg.as_log_lines()


def test_validation_shards_are_digits_only_and_a_sidecar_is_never_read_as_tokens(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 5, 6], dtype=np.uint16))
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.array([0, 3, 4], dtype=np.uint16))
    assert [Path(f).name for f in tg.shard_files(tmp_path, "val")] == ["fineweb_val_000000.bin"]
    assert tg.load_validation_tokens(tmp_path, 16).tolist() == [1, 5, 6]
    assert [Path(f).name for f in tg.shard_files(tmp_path, "val_bytes")] == ["fineweb_val_bytes_000000.bin"]


def _caseops_split(folder, shards, sidecars):
    for i, tokens in enumerate(shards):
        write_shard(folder / f"fineweb_val_{i:06d}.bin", np.array(tokens, dtype=np.uint16))
    for i, counts in enumerate(sidecars):
        write_shard(folder / f"fineweb_val_bytes_{i:06d}.bin", np.array(counts, dtype=np.uint16))
    return tg.load_validation_tokens(folder, 16)


def test_the_sidecar_is_read_in_shard_order_and_scores_every_evaluation_path(tmp_path, cpu_runtime):
    tokens = _caseops_split(tmp_path, [[1, 5, 6, 7], [8, 1, 9]], [[0, 2, 3, 4], [5, 0, 6]])
    sidecar = tg.validation_byte_sidecar(tmp_path, tokens, caseops=True)
    assert sidecar.tolist() == [0, 2, 3, 4, 5, 0, 6]
    assert tg.validation_byte_sidecar(tmp_path / "none", tokens, caseops=False) is None
    tables = dataclasses.replace(tg.TokenByteTables(torch.full((16,), 9), torch.zeros(16, dtype=torch.bool),
                                                    torch.zeros(16, dtype=torch.bool)), sidecar=sidecar)
    positions = torch.tensor([[3, 6], [1, 2]])
    assert tg.target_byte_counts(tokens[positions - 1], tokens[positions], tables, positions).tolist() == [[4, 6], [2, 3]]


@pytest.mark.parametrize("shards, sidecars, caseops, message", [
    ([[1, 5]], [[0, 2]], False, r"^CASEOPS_ENABLED=0 is not allowed with DATA_PATH=.*byte sidecars .*CASEOPS_ENABLED=1"),
    ([[1, 5]], [], True, r"^CASEOPS_ENABLED=1 is not allowed with DATA_PATH=.* has no fineweb_val_bytes_\*\.bin"),
    ([[1, 5], [6]], [[0, 2]], True, r"do not pair with validation shards .*one fineweb_val_bytes_N\.bin per"),
    ([[1, 5, 6]], [[0, 2]], True, r"fineweb_val_bytes_000000\.bin: 2 byte counts, but fineweb_val_000000\.bin has 3"),
    ([[5, 1, 6]], [[2, 0, 3]], True, r"must start with BOS \(id 1.*starts with id 5"),
    ([[1, 5, 1, 6]], [[0, 2, 1, 3]], True, r"must start with BOS.*gives 1 bytes to BOS tokens"),
])
def test_caseops_data_that_cannot_be_scored_is_refused_with_one_line(tmp_path, shards, sidecars, caseops, message):
    tokens = _caseops_split(tmp_path, shards, sidecars)
    with pytest.raises((tg.ConfigError, tg.ShardError), match=message) as err:
        tg.validation_byte_sidecar(tmp_path, tokens, caseops)
    assert "\n" not in str(err.value)


def test_settings_of_other_scripts_and_typos_are_named_not_ignored():
    env = {"MATRIX_LRR": "0.5", "TTT_EPOCHS": "1", "SKIP_SLIDING": "1", "MATRIX_LR": "0.02", "PATH": "/bin",
           "RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0", "TORCHELASTIC_RUN_ID": "x",
           "NCCL_DEBUG": "WARN", "PYTHONPATH": ".", "HOME": "/root", "NUM_LAYER": "9"}
    lines = tg.unknown_setting_warnings(env)
    assert lines == [
        "warning: MATRIX_LRR is not a setting and changes nothing; did you mean MATRIX_LR?",
        "warning: NUM_LAYER is not a setting and changes nothing; did you mean NUM_LAYERS?",
        "warning: SKIP_SLIDING is a setting of other parameter-golf scripts, not of this one, and changes nothing "
        "here; use instead: TTT_ENABLED=0 (the stream's sliding window is the score)",
        "warning: TTT_EPOCHS is no longer a setting and changes nothing; the full-weight TTT is gone: use "
        "TTT_ENABLED (per-document LoRA) and GLOBAL_TTT_*",
    ]
    assert all(tg.unknown_setting_warnings({name: "1"}) == [] for name in tg.FOREIGN_SETTINGS.values()
               if name.isupper() and "_" in name and " " not in name)


def test_layer_indexed_defaults_follow_num_layers_and_explicit_values_are_checked():
    assert (tg.Hyperparameters().xsa_last_n, tg.Hyperparameters().ve_layers) == (11, (9, 10))
    two = tg.Hyperparameters.from_env({"NUM_LAYERS": "2"}, cuda=False)
    assert (two.xsa_last_n, two.ve_layers) == (2, (1,))  # layer 0 has no attention to add values to
    assert "setting XSA_LAST_N=2" in two.as_log_lines() and "setting VE_LAYERS=1" in two.as_log_lines()
    one = tg.Hyperparameters.from_env({"NUM_LAYERS": "1", "VE_LAYERS": ""}, cuda=False)
    assert (one.xsa_last_n, one.ve_layers) == (1, ())
    with pytest.raises(tg.ConfigError, match=r"^VE_LAYERS='9' is not allowed: distinct indices of layers with attention, 1\.\.1$"):
        tg.Hyperparameters.from_env({"NUM_LAYERS": "2", "VE_LAYERS": "9"}, cuda=False)


def test_a_node_whose_cuda_fails_is_refused_unless_the_cpu_is_asked_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tg.glob, "glob", lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else [])
    with pytest.raises(tg.ConfigError, match=r"^DEVICE=auto is not allowed here: CUDA is not available on this "
                                             r"machine, although it has NVIDIA devices \(/dev/nvidia0\).*DEVICE=cpu"):
        tg.runtime_device({}, 0)
    assert tg.runtime_device({"DEVICE": "cpu"}, 0).type == "cpu"
    assert tg.runtime_device({"CUDA_VISIBLE_DEVICES": ""}, 0).type == "cpu"  # GPUs hidden on purpose
    with pytest.raises(tg.ConfigError, match="^DEVICE=cuda is not allowed here"):
        tg.runtime_device({"DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""}, 0)
    monkeypatch.setattr(tg.glob, "glob", lambda pattern: [])
    assert tg.runtime_device({}, 0).type == "cpu"  # a machine without NVIDIA devices: the CPU, as before


def test_warmup_steps_means_compile_priming_and_old_names_are_pointed_at_new_ones():
    cfg = tg.Hyperparameters.from_env({"WARMUP_STEPS": "20"}, cuda=False)
    assert cfg.warmup_steps == 20 and cfg.lr_warmup_steps == 20 and not cfg.compile
    lines = tg.unknown_setting_warnings({"WARMUP_STEPS": "20", "COMPILE_WARMUP_STEPS": "2"}, cfg)
    assert lines == ["warning: WARMUP_STEPS primes the compiled graphs before the clock (as upstream) and does "
                     "nothing with COMPILE=0; the learning-rate warm-up is LR_WARMUP_STEPS",
                     "warning: COMPILE_WARMUP_STEPS is no longer a setting and changes nothing; use WARMUP_STEPS"]
    compiled = tg.Hyperparameters.from_env({"WARMUP_STEPS": "20", "COMPILE": "1"}, cuda=False)
    assert tg.unknown_setting_warnings({"WARMUP_STEPS": "20"}, compiled) == []


def test_val_batch_size_is_all_ranks_together_as_upstream():
    cfg = tg.Hyperparameters()
    assert [tg.eval_batch_tokens(cfg, w) for w in (1, 2, 8)] == [65536, 65536, 65536]
    assert tg.eval_batch_tokens(dataclasses.replace(cfg, grad_accum_steps=1), 1) == 524288
