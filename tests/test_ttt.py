"""Score-first test-time training: chunks are scored before they are trained on, the rules of
../shared/LEGALITY.md still hold, the budget guard stops adaptation, and ranks agree."""
import gc
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import tiny_config
from test_ngram import byte_tables, repetitive_stream, trained_like

CPU = torch.device("cpu")


def ttt_config(**overrides):
    """Chunks of 48 targets, 3 sequences of 16 each; a learning rate large enough that adapting shows."""
    base = dict(ttt_epochs=2, ttt_chunk_tokens=48, ttt_batch_seqs=2, ttt_lr=0.05, ttt_momentum=0.9,
                ngram_chunk_tokens=40, use_mixer="learned")
    base.update(overrides)
    return tiny_config(**base)


def ttt_scores(cfg, tokens, audit_targets=(), rt=None, budget_start=None):
    """(neural EvalResult, mixed EvalResult, AuditStats, log lines, the model after TTT)."""
    rt = rt or tg.Runtime(0, 1, 0, CPU)
    model = trained_like(cfg)
    audit = tg.AuditStats(torch.as_tensor(list(audit_targets), dtype=torch.int64))
    lines = []
    start = time.perf_counter() if budget_start is None else budget_start
    neural_scores = lambda targets: tg.ttt_neural_pass(model, model.eval_outputs, model, tokens,
                                                       byte_tables(cfg.vocab_size), cfg, rt, targets, lines.append,
                                                       start)
    neural, mixed = tg.evaluate_sliding_mixed(model.eval_outputs, tokens, byte_tables(cfg.vocab_size), cfg, rt,
                                              lines.append, audit, neural_scores)
    return neural, mixed, audit, lines, model


def test_ttt_changes_the_weights_and_the_scores_of_later_chunks_only():
    cfg = ttt_config()
    tokens = repetitive_stream(300, cfg.vocab_size)
    before = trained_like(cfg)
    neural, mixed, audit, lines, after = ttt_scores(cfg, tokens, range(1, 300))
    no_ttt = tg.evaluate_sliding_mixed(before.eval_outputs, tokens, byte_tables(cfg.vocab_size),
                                       ttt_config(ttt_epochs=0), tg.Runtime(0, 1, 0, CPU), [].append,
                                       tg.AuditStats(torch.arange(1, 300)))[0]
    assert not torch.equal(before.blocks[1].mlp.fc.weight, after.blocks[1].mlp.fc.weight)
    assert any(l.startswith("ttt_done chunks:7 trained:6 epochs:2 optimizer:sgd ") for l in lines)
    # Repetitive text: adapting on what was scored helps what comes next.
    assert neural.val_loss < no_ttt.val_loss - 0.05, (neural.val_loss, no_ttt.val_loss)
    assert neural.scored_tokens == no_ttt.scored_tokens == 299


@pytest.mark.parametrize("beta", [0.0, 2.0], ids=["plain", "prior"])  # NGRAM_PRIOR_BETA: p_nn in the experts too
def test_a_score_never_depends_on_its_target_or_anything_after_it(beta):
    """Score-first: changing tokens from position p on leaves the score of every target before p as it
    was, though the weights that score the chunks after p's are trained on the changed tokens."""
    cfg = ttt_config(ngram_prior_beta=beta)
    tokens = repetitive_stream(300, cfg.vocab_size)
    _, _, a, _, _ = ttt_scores(cfg, tokens, range(1, 300))
    for p in (49, 120, 200):  # the first target of chunk 1, and two inside chunks
        changed = tokens.clone()
        changed[p:] = repetitive_stream(300 - p, cfg.vocab_size, seed=p)
        _, _, b, _, _ = ttt_scores(cfg, changed, range(1, 300))
        assert all(a.fast_nll[t] == b.fast_nll[t] for t in range(1, p)), p
        assert any(a.fast_nll[t] != b.fast_nll[t] for t in range(p, 300)), p


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_legality_holds_with_ttt(optimizer):
    """Every scored q_t, materialized over the vocabulary, sums to one and holds the scored entry."""
    cfg = ttt_config(ttt_optimizer=optimizer, ttt_lr=0.01 if optimizer == "adamw" else 0.05)
    tokens = repetitive_stream(300, cfg.vocab_size)
    _, mixed, audit, lines, _ = ttt_scores(cfg, tokens, range(1, 300))
    assert audit.positions == 299 and audit.worst_sum_error < 1e-6 and audit.worst_target_diff < 1e-9
    assert sum(audit.fast_nll.values()) == pytest.approx(mixed.val_loss * mixed.scored_tokens, rel=1e-9)


def test_the_budget_guard_stops_adapting():
    cfg = ttt_config(eval_budget_seconds=1e-3)
    tokens = repetitive_stream(300, cfg.vocab_size)
    neural, _, _, lines, after = ttt_scores(cfg, tokens)
    stopped = [l for l in lines if l.startswith("ttt_stopped")]
    assert len(stopped) == 1 and stopped[0].startswith("ttt_stopped chunk:1/7 ")
    assert any(l.startswith("ttt_done chunks:7 trained:0 ") for l in lines)
    assert all(torch.equal(p, q) for p, q in zip(trained_like(cfg).parameters(), after.parameters()))
    # A generous budget adapts on every chunk but the last.
    _, _, _, lines, _ = ttt_scores(ttt_config(eval_budget_seconds=600), tokens)
    assert not any(l.startswith("ttt_stopped") for l in lines)
    assert any(l.startswith("ttt_done chunks:7 trained:6 ") for l in lines)


def test_the_budget_guard_stops_midway_when_the_pace_says_time_will_run_out(monkeypatch):
    """A clock that moves 1 s per reading: each chunk's scoring and training "take" about a second, so
    with a 16 s budget the guard must stop after a few chunks, and the log says where."""
    clock = iter(range(10_000))
    monkeypatch.setattr(tg.time, "perf_counter", lambda: float(next(clock)))
    cfg = ttt_config(eval_budget_seconds=16)
    _, _, _, lines, _ = ttt_scores(cfg, repetitive_stream(300, cfg.vocab_size), budget_start=0.0)
    stopped = [l for l in lines if l.startswith("ttt_stopped")]
    assert len(stopped) == 1
    chunk = int(stopped[0].split()[1].split(":")[1].split("/")[0])
    assert 2 <= chunk <= 5, stopped
    assert any(l.startswith(f"ttt_done chunks:7 trained:{chunk - 1} ") for l in lines), lines


def test_frozen_blocks_and_the_mixer_head_stay_as_trained():
    cfg = ttt_config(ttt_freeze_blocks=2)
    tokens = repetitive_stream(300, cfg.vocab_size)
    before = trained_like(cfg)
    *_, after = ttt_scores(cfg, tokens)
    for name, p in after.named_parameters():
        unchanged = torch.equal(p, dict(before.named_parameters())[name])
        assert unchanged == name.startswith(("blocks.0.", "blocks.1.", "mixer_head.")), name


def test_ttt_adapts_all_but_the_frozen_blocks_and_the_mixer_head():
    cfg = ttt_config(ttt_freeze_blocks=2)
    model = trained_like(cfg)
    adapted = {id(p) for p in tg.ttt_parameters(model, cfg)}
    for name, p in model.named_parameters():
        assert (id(p) in adapted) == (not name.startswith(("blocks.0.", "blocks.1.", "mixer_head."))), name
    assert tg.ttt_lr_at(0, 6, cfg) == cfg.ttt_lr and tg.ttt_lr_at(6, 6, cfg) == pytest.approx(0, abs=1e-12)
    assert any("TTT_PROJ_LR_MULT is no longer a setting" in w for w in tg.unknown_setting_warnings(
        {"TTT_PROJ_LR_MULT": "3"}))


def test_training_sequences_hold_only_scored_tokens_of_the_chunk():
    tokens = torch.arange(200)
    seqs = tg.chunk_training_sequences(tokens, 49, 97, 16)  # targets 49..96 of chunk 1
    assert seqs.shape == (3, 17) and int(seqs.min()) == 48 and int(seqs.max()) == 96
    assert tg.chunk_training_sequences(tokens, 193, 200, 16).shape == (0, 17)


def _ttt_in_process(rank, world, init_file, cfg, tokens, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    neural, mixed, _, _, _ = ttt_scores(cfg, tokens, rt=tg.Runtime(rank, world, rank, CPU))
    if rank == 0:
        np.save(out, np.array([neural.val_bpb, mixed.val_bpb, mixed.scored_bytes]))
    dist.barrier()  # neither rank tears the group down while the other still uses it
    gc.collect()  # and nothing left holds it for the collection at exit (see train_gpt.main)
    dist.destroy_process_group()


def test_one_and_two_processes_give_the_same_val_bpb(tmp_path):
    cfg = ttt_config(ttt_batch_seqs=3, val_batch_size=48)  # batches of 3 split 2 + 1 between two ranks
    tokens = repetitive_stream(300, cfg.vocab_size)
    results = []
    for world in (1, 2):
        out = tmp_path / f"r{world}.npy"
        mp.spawn(_ttt_in_process, args=(world, str(tmp_path / f"init{world}"), cfg, tokens, str(out)), nprocs=world)
        results.append(np.load(out))
    np.testing.assert_allclose(results[1], results[0], rtol=0, atol=1e-6)


def test_final_evaluation_trains_through_a_compiled_module():
    """A compiled module cannot be truth-tested (it forwards len() to the GPT, which has none): the
    final evaluation must take it as it is. backend="eager" wraps it as COMPILE=1 does, without inductor."""
    cfg = ttt_config(ttt_epochs=1)
    tokens = repetitive_stream(300, cfg.vocab_size)
    model = trained_like(cfg)
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(TypeError):
        bool(compiled)
    lines = []
    result = tg.evaluate_final(model, model.token_nll, model.eval_outputs, tokens, byte_tables(cfg.vocab_size), cfg,
                               tg.Runtime(0, 1, 0, CPU), lines.append, compiled)
    assert result.scored_tokens == 299 and any(l.startswith("ttt_done chunks:7 trained:6 ") for l in lines)


def _ttt_with_own_clock(rank, world, init_file, cfg, tokens, out):
    """Rank 1's clock runs a thousand times faster than rank 0's: the figures each measures differ."""
    import datetime

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    clock = iter(range(100_000))
    tick = 1.0 if rank == 1 else 0.001
    tg.time.perf_counter = lambda: tick * next(clock)
    *_, lines, _ = ttt_scores(cfg, tokens, rt=tg.Runtime(rank, world, rank, CPU), budget_start=0.0)
    Path(out.format(rank=rank)).write_text("\n".join(l for l in lines if l.startswith("ttt_stopped")))
    dist.barrier()  # neither rank tears the group down while the other still uses it
    gc.collect()  # and nothing left holds it for the collection at exit (see train_gpt.main)
    dist.destroy_process_group()


def test_ranks_with_different_clocks_take_the_same_stop_decision(tmp_path):
    """Every decision taken from a clock is agreed: a rank that measures its chunks as slow and one that
    measures them as fast stop adapting at the same chunk, and neither waits on a collective the other
    skipped (with NCCL that is a hang until the watchdog kills the job)."""
    cfg = ttt_config(eval_budget_seconds=16)
    tokens = repetitive_stream(300, cfg.vocab_size)
    out = str(tmp_path / "stopped{rank}.txt")
    mp.spawn(_ttt_with_own_clock, args=(2, str(tmp_path / "init"), cfg, tokens, out), nprocs=2)
    stopped = [Path(out.format(rank=r)).read_text() for r in (0, 1)]
    assert stopped[0] == stopped[1] and stopped[0].startswith("ttt_stopped chunk:"), stopped
