"""Evaluation: each token scored once, sliding vs plain, causality, and one vs two processes."""
import gc
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import perturbed_gpt, tiny_config


@pytest.mark.parametrize("num_tokens, seq_len, stride", [
    (2, 8, 4), (5, 8, 4), (9, 8, 4), (10, 8, 4), (100, 8, 4), (101, 16, 5), (1000, 64, 64), (77, 10, 1),
])
def test_every_target_is_scored_exactly_once_with_the_longest_context(num_tokens, seq_len, stride):
    spans = tg.sliding_window_spans(num_tokens, seq_len, stride)
    scored = []
    for start, length, count in spans:
        assert 1 <= count <= length <= seq_len and start >= 0 and start + length < num_tokens + 0
        assert length == min(seq_len, num_tokens - 1)
        targets = range(start + length - count + 1, start + length + 1)
        for t in targets:
            # context of target t: tokens start..t-1; at least seq_len - stride + 1 unless the stream starts
            assert t - start >= min(t, seq_len - stride + 1)
        scored.extend(targets)
    assert scored == list(range(1, num_tokens))


def _uniform_byte_tables(vocab):
    return tg.TokenByteTables(torch.arange(vocab) % 3 + 1, torch.arange(vocab) % 2 == 0,
                              torch.arange(vocab) < 2)


def test_sliding_equals_plain_when_stride_is_the_window(cpu_runtime):
    cfg = tiny_config()
    model = perturbed_gpt(cfg, 0.05)
    tokens = torch.randint(0, cfg.vocab_size, (16 * 7 + 1,))
    tables = _uniform_byte_tables(cfg.vocab_size)
    plain = tg.evaluate_plain(model.token_nll, tokens, tables, 16, 64, cpu_runtime)
    sliding = tg.evaluate_sliding(model.token_nll, tokens, tables, 16, 16, 64, cpu_runtime)
    assert plain.scored_tokens == sliding.scored_tokens == tokens.numel() - 1
    assert sliding.val_bpb == pytest.approx(plain.val_bpb, abs=1e-6)
    narrow = tg.evaluate_sliding(model.token_nll, tokens, tables, 16, 4, 64, cpu_runtime)
    assert narrow.scored_tokens == tokens.numel() - 1 and narrow.scored_bytes == plain.scored_bytes
    assert narrow.val_bpb != pytest.approx(plain.val_bpb, abs=1e-6)  # more context changes the scores


def _scores_by_target(model, tokens, tables, rt, seq_len=16, stride=4):
    scores = {}
    with torch.no_grad():
        for targets, nll, nbytes in tg.sliding_window_scores(model.token_nll, tokens, tables, seq_len, stride, 64, rt):
            for t, v in zip(targets.tolist(), nll.tolist()):
                assert t not in scores
                scores[t] = v
    return scores


def test_scores_of_earlier_tokens_ignore_later_tokens(cpu_runtime):
    cfg = tiny_config()
    model = perturbed_gpt(cfg, 0.05)
    tables = _uniform_byte_tables(cfg.vocab_size)
    tokens = torch.randint(0, cfg.vocab_size, (120,))
    for t in (5, 40, 70, 118):
        changed = tokens.clone()
        changed[t:] = (tokens[t:] + 1 + torch.randint(0, cfg.vocab_size - 1, (tokens.numel() - t,))) % cfg.vocab_size
        before, after = _scores_by_target(model, tokens, tables, cpu_runtime), \
            _scores_by_target(model, changed, tables, cpu_runtime)
        assert sorted(before) == list(range(1, 120))
        assert all(before[i] == after[i] for i in range(1, t)), t   # q_i for i < t reads x_<i only
        assert before[t] != after[t]                                  # the target itself changed


def _eval_in_process(rank, world_size, init_file, tokens, cfg, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    rt = tg.Runtime(rank, world_size, rank, torch.device("cpu"))
    model = perturbed_gpt(cfg, 0.05)
    tables = _uniform_byte_tables(cfg.vocab_size)
    plain = tg.evaluate_plain(model.token_nll, tokens, tables, 16, 64, rt)
    sliding = tg.evaluate_sliding(model.token_nll, tokens, tables, 16, 4, 64, rt)
    if rank == 0:
        np.save(result_file, np.array([plain.val_bpb, sliding.val_bpb, sliding.scored_tokens, sliding.scored_bytes]))
    dist.barrier()  # neither rank tears the group down while the other still uses it
    gc.collect()  # and nothing left holds it for the collection at exit (see train_gpt.main)
    dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 3])
def test_val_bpb_is_the_same_from_one_and_several_processes(tmp_path, world_size):
    cfg = tiny_config()
    tokens = torch.randint(0, cfg.vocab_size, (333,), generator=torch.Generator().manual_seed(1))
    results = {}
    for n in (1, world_size):
        out = tmp_path / f"result_{n}.npy"
        mp.spawn(_eval_in_process, args=(n, str(tmp_path / f"init_{n}"), tokens, cfg, str(out)), nprocs=n)
        results[n] = np.load(out)
    assert results[1][2] == results[world_size][2] == 332
    assert results[1][3] == results[world_size][3]
    np.testing.assert_allclose(results[1][:2], results[world_size][:2], rtol=0, atol=1e-6)
