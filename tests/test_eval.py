"""Evaluation: each token scored once, sliding vs plain, causality, and one vs two processes."""
import dataclasses
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


def _sliding(model, tokens, tables, rt, seq_len=16, stride=4, rank_batch_tokens=64):
    """The run's neural sliding-window score (USE_MIXER=none): batches of `rank_batch_tokens` on every rank."""
    cfg = dataclasses.replace(model.cfg, use_mixer="none", eval_seq_len=seq_len, eval_stride=stride,
                              grad_accum_steps=1, val_batch_size=rank_batch_tokens * rt.world_size)
    return tg.evaluate_sliding_mixed(model.eval_outputs, tokens, tables, cfg, rt, lambda line: None)[0]


def test_sliding_equals_plain_when_stride_is_the_window(cpu_runtime):
    cfg = tiny_config()
    model = perturbed_gpt(cfg, 0.05)
    tokens = torch.randint(0, cfg.vocab_size, (16 * 7 + 1,))
    tables = _uniform_byte_tables(cfg.vocab_size)
    plain = tg.evaluate_plain(model.token_nll, tokens, tables, 16, 64, cpu_runtime)
    sliding = _sliding(model, tokens, tables, cpu_runtime, stride=16)
    assert plain.scored_tokens == sliding.scored_tokens == tokens.numel() - 1
    assert sliding.val_bpb == pytest.approx(plain.val_bpb, abs=1e-6)
    narrow = _sliding(model, tokens, tables, cpu_runtime)
    assert narrow.scored_tokens == tokens.numel() - 1 and narrow.scored_bytes == plain.scored_bytes
    assert narrow.val_bpb != pytest.approx(plain.val_bpb, abs=1e-6)  # more context changes the scores


def _scores_by_target(model, tokens, tables, rt, seq_len=16, stride=4):
    cfg = dataclasses.replace(model.cfg, eval_seq_len=seq_len, eval_stride=stride, grad_accum_steps=1,
                              val_batch_size=64)
    scores = tg.neural_pass(model.eval_outputs, tokens, tables, cfg, rt, torch.zeros(0, dtype=torch.int64))
    assert scores.targets.unique().numel() == scores.targets.numel()
    return dict(zip(scores.targets.tolist(), (-scores.logprob).tolist()))


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
    sliding = _sliding(model, tokens, tables, rt)
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


@pytest.mark.parametrize("num_tokens, seq_len, stride, rows, lo, hi", [
    (100, 8, 4, 3, 1, None), (101, 16, 5, 4, 1, None), (9, 16, 4, 2, 1, None), (300, 32, 7, 5, 40, 211),
    (77, 10, 1, 8, 1, None), (64, 16, 16, 2, 1, None), (200, 32, 8, 3, 1, 20), (200, 32, 8, 3, 180, None),
    (120, 32, 8, 3, 10, 90),
])
def test_window_batches_pick_every_target_once_from_its_span(cpu_runtime, num_tokens, seq_len, stride, rows, lo, hi):
    """Each batch computes `stride` predictions per row and picks the scored ones: together they are the
    targets in [lo, hi), each once, in order, each from the window the spans give it (its longest context)."""
    tokens = torch.arange(num_tokens)
    spans = tg.sliding_window_spans(num_tokens, seq_len, stride)
    span_start = {t: s for s, n, k in spans for t in range(s + n - k + 1, s + n + 1)}
    picked = []
    for batch in tg.sliding_window_batches(tokens, seq_len, stride, rows * seq_len, cpu_runtime, lo, hi):
        assert batch.index.shape == (rows, seq_len + 1) and batch.positions.shape == (rows, stride)
        targets = batch.index.gather(1, batch.positions + 1).flatten()[batch.picked]
        starts = batch.index[:, :1].expand(-1, stride).flatten()[batch.picked]
        picked += list(zip(targets.tolist(), starts.tolist()))
    end = num_tokens if hi is None else hi
    assert [t for t, _ in picked] == list(range(lo, end))
    assert all(start == span_start[t] for t, start in picked)


def _nll_by_target_from_whole_windows(model, tokens, seq_len, stride):
    """The reference: every window's loss at all its positions, then the scored ones taken out."""
    scores = {}
    with torch.no_grad():
        for s, n, k in tg.sliding_window_spans(tokens.numel(), seq_len, stride):
            window = tokens[s:s + n + 1][None]
            nll = model.token_nll(window[:, :-1], window[:, 1:])[0]
            scores.update({s + p + 1: float(nll[p]) for p in range(n - k, n)})
    return scores


@pytest.mark.parametrize("stride", [4, 16])
def test_head_on_the_scored_positions_alone_gives_the_whole_window_scores(cpu_runtime, stride):
    cfg = tiny_config()
    model = perturbed_gpt(cfg, 0.05)
    tables = _uniform_byte_tables(cfg.vocab_size)
    tokens = torch.randint(0, cfg.vocab_size, (150,), generator=torch.Generator().manual_seed(3))
    expected = _nll_by_target_from_whole_windows(model, tokens, 16, stride)
    got = _scores_by_target(model, tokens, tables, cpu_runtime, stride=stride)
    assert sorted(got) == sorted(expected) == list(range(1, 150))
    assert max(abs(got[t] - expected[t]) for t in got) < 1e-5
    audit = torch.tensor([1, 7, 60, 149])
    scores = tg.neural_pass(model.eval_outputs, tokens, tables, dataclasses.replace(cfg, eval_stride=stride),
                            cpu_runtime, audit)
    assert scores.targets.tolist() == list(range(1, 150))
    assert max(abs(-float(v) - expected[t]) for t, v in zip(scores.targets.tolist(), scores.logprob)) < 1e-5
    assert sorted(scores.audit_rows) == audit.tolist()
    for t, row in scores.audit_rows.items():
        assert float(row.exp().sum()) == pytest.approx(1.0, abs=1e-6)
        assert float(row[tokens[t]]) == pytest.approx(-expected[t], abs=1e-5)


SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique")


def _host_syncs(fn) -> int:
    """Host syncs called by fn: reading a value (item, float, int) or a value-dependent shape (boolean
    indexing). Each one stalls a GPU's queue."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.name in SYNC_OPS for event in prof.events())


def test_evaluation_passes_read_nothing_back_per_batch(cpu_runtime):
    """The host syncs of a pass do not grow with its number of batches: sums stay on the device and the
    scored positions are picked with a size known on the host."""
    cfg = tiny_config(use_mixer="learned")
    model = perturbed_gpt(cfg, 0.05)
    tables = _uniform_byte_tables(cfg.vocab_size)
    no_audit = torch.zeros(0, dtype=torch.int64)
    syncs = {}
    for n in (65, 257):  # 1 and 4 batches of four 16-token windows in the plain pass, 4 and 16 sliding
        tokens = torch.randint(0, cfg.vocab_size, (n,))
        syncs[n] = [_host_syncs(lambda: tg.evaluate_plain(model.token_nll, tokens, tables, 16, 64, cpu_runtime)),
                    _host_syncs(lambda: _sliding(model, tokens, tables, cpu_runtime)),
                    _host_syncs(lambda: tg.neural_pass(model.eval_outputs, tokens, tables, cfg, cpu_runtime, no_audit))]
    assert syncs[65] == syncs[257], syncs
