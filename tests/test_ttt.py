"""Per-document LoRA test-time training and phased global SGD: the LoRA path with zero adapters is the base model,
every matrix is adapted, no update reads a token before it is scored, earlier scores ignore later tokens across
document and phase boundaries, the rules of ../shared/LEGALITY.md hold with the cache on top, 1, 2 and 3 processes
agree, and the budget guard hands the rest of the stream to the sliding window, on every rank at once."""
import bisect
import dataclasses
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
NO_AUDIT = torch.zeros(0, dtype=torch.int64)


def lora_config(**overrides):
    """Chunks of 5 targets, windows of 16, 3 documents a batch; rates large enough that adapting shows."""
    base = dict(ttt_chunk_size=5, ttt_batch_size=3, ttt_lora_rank=4, ttt_lora_lr=0.01, phased_ttt_num_phases=2,
                phased_ttt_prefix_docs=6, global_ttt_chunk_tokens=32, global_ttt_batch_seqs=2, global_ttt_lr=0.05,
                ngram_chunk_tokens=40, use_mixer="learned", eval_budget_seconds=1e6)
    base.update(overrides)
    return tiny_config(**base)


def stream_with_documents(n, vocab, seed=0):
    """A repetitive stream cut by BOS into documents of 1 to ~60 tokens."""
    tokens = repetitive_stream(n, vocab, seed)
    tokens[torch.randint(1, n, (n // 30,), generator=torch.Generator().manual_seed(seed))] = tg.BOS_ID
    tokens[0] = tg.BOS_ID
    return tokens


def lora_scores(cfg, tokens, rt=None, probe=lambda *event: None, model=None, budget_start=None):
    """(NeuralScores, log lines, the model after the phases)."""
    model, lines = model or trained_like(cfg), []
    rt = rt or tg.Runtime(0, 1, 0, CPU)
    start = time.perf_counter() if budget_start is None else budget_start
    scores = tg.lora_neural_pass(model, model.eval_outputs, model, tg.DocAdapters(model, cfg, CPU), tokens,
                                 byte_tables(cfg.vocab_size), cfg, rt, NO_AUDIT, lines.append, start,
                                 {"ttt_train": 0.0}, probe)
    return scores, lines, model


def test_documents_cover_every_target_once():
    tokens = torch.tensor([1, 5, 6, 1, 7, 1, 1, 8, 9, 1])
    assert tg.document_spans(tokens) == [(0, 3), (3, 5), (5, 6), (6, 9)]  # the last BOS: a target, no document
    assert tg.document_spans(torch.tensor([4, 5, 1, 6])) == [(0, 2), (2, 3)]
    windows = [tg.chunk_window((10, 30), c, lora_config(eval_seq_len=8)) for c in range(4)]
    assert windows == [(10, 0, 5), (12, 3, 8), (17, 3, 8), (22, 3, 8)]  # within the document, at most 8 inputs


def test_zero_adapters_add_exactly_nothing_on_every_path():
    """Lanes, loops, gates, smear, BigramHash, value embeddings, the tied head: attached with B = 0, the model's
    outputs are bit for bit the base model's."""
    cfg = lora_config(parallel_start_layer=3, num_loops=1, loop_start=1, loop_end=2)
    model = trained_like(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (cfg.ttt_batch_size, 16), generator=torch.Generator().manual_seed(0))
    base = model.eval_outputs(tokens)
    adapters = tg.DocAdapters(model, cfg, CPU)
    with adapters.attached():
        adapted = model.eval_outputs(tokens)
    assert torch.equal(adapted[0], base[0]) and torch.equal(adapted[1], base[1])
    assert "head_adapter" not in vars(model) and not any("adapter" in vars(m) for m in adapters.sites)  # as before


def test_every_matrix_the_forward_uses_is_adapted():
    """With B away from 0, every adapter gets a gradient: none sits on a matrix the forward skips, and every Linear
    that runs (lanes, loops, gates, smear, BigramHash, value embeddings) and the head has one (#1787's pitfall)."""
    cfg = lora_config(parallel_start_layer=3, num_loops=1, loop_start=1, loop_end=2)
    model = trained_like(cfg)
    adapters = tg.DocAdapters(model, cfg, CPU)
    linears = [name for name, m in model.named_modules() if isinstance(m, tg.Linear) and name != "mixer_head"]
    assert len(adapters.sites) == len(linears) and len(adapters.params) == 2 * (len(linears) + 1)
    assert {"smear_gate", "bigram.proj", "value_embed_proj", "blocks.3.attn.out_gate"} <= set(linears)
    with torch.no_grad():
        for p in adapters.params[len(adapters.params) // 2:]:
            p.normal_(0, 0.1)
    tokens = torch.randint(2, cfg.vocab_size, (cfg.ttt_batch_size, 16), generator=torch.Generator().manual_seed(1))
    with adapters.attached():
        model.eval_outputs(tokens)[0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.params)


def test_lora_with_no_step_scores_each_document_alone_as_the_base_model():
    """At learning rate 0 and no phase, each target's score is the base model's on its own document's window:
    from the document's start, sliding within it by chunks; batched, padded and sorted as the pass runs it."""
    cfg = lora_config(ttt_lora_lr=0.0, phased_ttt_num_phases=0)
    tokens = stream_with_documents(300, cfg.vocab_size)
    scores, lines, model = lora_scores(cfg, tokens)
    assert torch.equal(scores.targets, torch.arange(1, 300))
    reference = []
    with torch.no_grad():
        for doc in tg.document_spans(tokens):
            for t in range(doc[0] + 1, doc[1] + 1):
                start, first, end = tg.chunk_window(doc, (t - doc[0] - 1) // cfg.ttt_chunk_size, cfg)
                logprobs = model.eval_outputs(tokens[start:t][None])[0]
                reference.append(float(logprobs[0, -1, tokens[t]]))
    np.testing.assert_allclose(scores.logprob.numpy(), reference, rtol=0, atol=1e-5)
    assert any(line.startswith("ttt_done docs:") and " phases:0/0 adapted:1 " in line for line in lines)


def test_adapting_and_phases_lower_the_loss_and_leave_the_mixer_head():
    cfg = lora_config()
    tokens = stream_with_documents(300, cfg.vocab_size)
    base, _, _ = lora_scores(dataclasses.replace(cfg, ttt_lora_lr=0.0, phased_ttt_num_phases=0), tokens)
    lora, _, _ = lora_scores(dataclasses.replace(cfg, phased_ttt_num_phases=0), tokens)
    before = trained_like(cfg)
    phased, lines, after = lora_scores(cfg, tokens)
    assert -phased.logprob.mean() < -lora.logprob.mean() < -base.logprob.mean() - 0.05
    assert any(" phases:2/2 adapted:1 " in line for line in lines), lines
    assert not phased.mixer_logits.requires_grad  # the scores keep no autograd graph (each would hold a forward's)
    for name, p in after.named_parameters():  # global SGD trains every base weight but the mixer head's
        assert torch.equal(p, dict(before.named_parameters())[name]) == name.startswith("mixer_head."), name


def test_no_update_reads_a_token_before_it_is_scored():
    """Instrumented: an adapter step reads its own document only, up to the chunk it has just scored (its first
    input, the BOS that opens it, is the document before's last target: context, never learned from for that
    target's score); a phase reads only scored tokens (and position 0, never a target), and every target scored
    after it lies beyond what it read. Every target is scored once."""
    cfg = lora_config()
    tokens = stream_with_documents(300, cfg.vocab_size)
    starts = [s for s, _ in tg.document_spans(tokens)]
    doc_of = lambda target: bisect.bisect_left(starts, target) - 1  # the document whose targets hold it
    last_scored, scored, phase_read, updates = {}, set(), 0, 0

    def probe(kind, positions, mask):
        nonlocal phase_read, updates
        if kind == "score":
            targets = positions.tolist()
            assert not set(targets) & scored and min(targets) > phase_read
            scored.update(targets)
            for t in targets:
                last_scored[doc_of(t)] = max(t, last_scored.get(doc_of(t), 0))
        elif mask is None:  # a phase
            assert set(range(1, int(positions.max()) + 1)) <= scored and int(positions.min()) == 0
            phase_read = int(positions.max())
        else:
            for row, keep in zip(positions, mask):
                if keep.any():
                    read = row[keep]
                    doc = doc_of(int(read.max()) + 1)
                    assert starts[doc] <= int(read.min()) and int(read.max()) + 1 <= last_scored[doc] + 1
            updates += 1
    lora_scores(cfg, tokens, probe=probe)
    assert scored == set(range(1, 300)) and updates > 20 and phase_read > 0


@pytest.mark.parametrize("changed", [40, 150, 290])
def test_changing_a_token_leaves_every_earlier_score_unchanged(changed):
    """Within the phases' prefix, after it, and near the end; the neural scores and the mixed ones."""
    cfg = lora_config()
    tokens = stream_with_documents(300, cfg.vocab_size)
    other = tokens.clone()
    other[changed:] = torch.where(tokens[changed:] == tg.BOS_ID, tg.BOS_ID, (tokens[changed:] + 7) % 62 + 2)
    results = []
    for stream in (tokens, other):
        scores = lora_scores(cfg, stream)[0]
        results.append((scores.logprob, tg.cache_pass(scores, stream, cfg, tg.Runtime(0, 1, 0, CPU),
                                                      tg.AuditStats(NO_AUDIT))))
    (a, mixed_a), (b, mixed_b) = results
    assert torch.equal(a[:changed - 1], b[:changed - 1]) and torch.equal(mixed_a[:changed - 1], mixed_b[:changed - 1])
    assert not torch.equal(a, b)


@pytest.mark.parametrize("mixer", ["learned", "hedge"])
def test_the_audit_holds_with_lora_and_the_cache(mixer):
    cfg = lora_config(ngram_audit_positions=40, use_mixer=mixer)
    tokens = stream_with_documents(300, cfg.vocab_size)
    model, lines = trained_like(cfg), []
    adapters = tg.DocAdapters(model, cfg, CPU)
    audit = tg.AuditStats(torch.randint(1, 300, (40,), generator=torch.Generator().manual_seed(3)))
    neural_scores = lambda targets: tg.lora_neural_pass(model, model.eval_outputs, model, adapters, tokens,
                                                        byte_tables(cfg.vocab_size), cfg, tg.Runtime(0, 1, 0, CPU),
                                                        targets, lines.append, time.perf_counter(), {"ttt_train": 0.0})
    neural, mixed = tg.evaluate_sliding_mixed(model.eval_outputs, tokens, byte_tables(cfg.vocab_size), cfg,
                                              tg.Runtime(0, 1, 0, CPU), lines.append, audit, neural_scores)
    assert audit.positions == len(set(audit.targets.tolist())) > 20
    assert audit.worst_sum_error < 1e-6 and audit.worst_target_diff < 1e-6 and audit.min_prob > 0
    assert mixed.scored_tokens == neural.scored_tokens == 299 and mixed.val_loss < neural.val_loss


def test_the_budget_guard_hands_the_rest_to_the_sliding_window(monkeypatch):
    """A clock that moves 1 s a reading and a 12 s budget: adapting stops at a segment boundary, the log says
    where, and the documents after it score exactly as the stream's sliding window scores them."""
    clock = iter(range(100_000))
    monkeypatch.setattr(tg.time, "perf_counter", lambda: float(next(clock)))
    cfg = lora_config(eval_budget_seconds=12)
    tokens = stream_with_documents(300, cfg.vocab_size)
    scores, lines, model = lora_scores(cfg, tokens, budget_start=0.0)
    stopped = [line for line in lines if line.startswith("ttt_stopped")]
    assert len(stopped) == 1 and any(" adapted:0 " in line for line in lines), lines
    doc = int(stopped[0].split()[1].split(":")[1].split("/")[0])
    first = tg.document_spans(tokens)[doc][0] + 1
    sliding = tg.neural_pass(model.eval_outputs, tokens, byte_tables(cfg.vocab_size), cfg, tg.Runtime(0, 1, 0, CPU),
                             NO_AUDIT, first)
    assert torch.equal(scores.targets, torch.arange(1, 300))
    assert torch.equal(scores.logprob[first - 1:], sliding.logprob)


def _lora_in_process(rank, world, init_file, configs, tokens, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rt, results = tg.Runtime(rank, world, rank, CPU), []
    for cfg in configs:
        model = trained_like(cfg)
        neural, mixed = tg.evaluate_sliding_mixed(model.eval_outputs, tokens, byte_tables(cfg.vocab_size), cfg, rt,
                                                  [].append, tg.AuditStats(NO_AUDIT),
                                                  lambda targets: lora_scores(cfg, tokens, rt, model=model)[0])
        results.append([neural.val_bpb, mixed.val_bpb, mixed.scored_bytes])
    if rank == 0:
        np.save(out, np.array(results))
    dist.barrier()  # neither rank tears the group down while the other still uses it
    gc.collect()  # and nothing left holds it for the collection at exit (see train_gpt.main)
    dist.destroy_process_group()


def test_one_two_and_three_processes_give_the_same_val_bpb(tmp_path):
    """Adapters alone: the same scores to the last bit (a document's work does not depend on the rank doing it).
    Phases alone: to 1e-6, the all-reduced gradient summing in another order. (Both together drift further: Adam's
    first step with beta1 = 0 moves each weight by the learning rate whatever its gradient's size, so a rounding
    difference in a near-zero gradient flips a whole step.)"""
    configs = [lora_config(phased_ttt_num_phases=0, ttt_batch_size=2), lora_config(ttt_lora_lr=0.0,
                                                                                   global_ttt_batch_seqs=3)]
    tokens = stream_with_documents(300, 64)
    results = []
    for world in (1, 2, 3):
        out = tmp_path / f"r{world}.npy"
        mp.spawn(_lora_in_process, args=(world, str(tmp_path / f"init{world}"), configs, tokens, str(out)),
                 nprocs=world)
        results.append(np.load(out))
    for other in results[1:]:
        np.testing.assert_array_equal(other[0], results[0][0])
        np.testing.assert_allclose(other[1], results[0][1], rtol=0, atol=1e-6)


def _lora_with_own_clock(rank, world, init_file, cfg, tokens, out):
    """Rank 1's clock runs a thousand times faster than rank 0's: the figures each measures differ."""
    import datetime

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    clock = iter(range(100_000))
    tick = 1.0 if rank == 1 else 0.001
    tg.time.perf_counter = lambda: tick * next(clock)
    _, lines, _ = lora_scores(cfg, tokens, rt=tg.Runtime(rank, world, rank, CPU), budget_start=0.0)
    Path(out.format(rank=rank)).write_text("\n".join(l for l in lines if l.startswith("ttt_stopped")))
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def test_ranks_with_different_clocks_take_the_same_stop_decision(tmp_path):
    """Every decision taken from a clock is agreed: a rank that measures its batches as slow and one that measures
    them as fast stop adapting at the same document, and neither waits on a collective the other skipped."""
    cfg = lora_config(eval_budget_seconds=12)
    tokens = stream_with_documents(300, cfg.vocab_size)
    out = str(tmp_path / "stopped{rank}.txt")
    mp.spawn(_lora_with_own_clock, args=(2, str(tmp_path / "init"), cfg, tokens, out), nprocs=2)
    stops = [Path(out.format(rank=r)).read_text() for r in (0, 1)]
    assert stops[0] and stops[0].split()[1] == stops[1].split()[1], stops


def test_the_final_evaluation_runs_lora_through_a_compiled_module():
    """A compiled module cannot be truth-tested (it forwards len() to the GPT, which has none): the final
    evaluation must take it as it is. backend="eager" wraps it as COMPILE=1 does, without inductor."""
    cfg = lora_config()
    tokens = stream_with_documents(300, cfg.vocab_size)
    model = trained_like(cfg)
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(TypeError):
        bool(compiled)
    lines = []
    result = tg.evaluate_final(model, model.token_nll, model.eval_outputs, tokens, byte_tables(cfg.vocab_size), cfg,
                               tg.Runtime(0, 1, 0, CPU), lines.append, compiled)
    assert result.scored_tokens == 299 and any(" phases:2/2 adapted:1 " in line for line in lines)
    assert [line.split()[0] for line in lines if line.startswith("final_") and "_exact" not in line] == [
        "final_plain", "final_lora_ttt", "final_lora_ttt_ngram_learned"]


def test_the_full_weight_ttt_settings_are_gone_with_a_pointer():
    warnings = tg.unknown_setting_warnings({"TTT_EPOCHS": "3", "TTT_LR": "0.002", "PHASED_TTT_ENABLED": "1"})
    assert sum("full-weight TTT is gone: use TTT_ENABLED" in w for w in warnings) == 2
    assert any("PHASED_TTT_ENABLED is a setting of other" in w and "PHASED_TTT_NUM_PHASES" in w for w in warnings)
    with pytest.raises(tg.ConfigError, match=r"^TTT_OPTIMIZER='adamw' is not allowed: adam or sgd$"):
        lora_config(ttt_optimizer="adamw").validate()
    with pytest.raises(tg.ConfigError, match=r"^TTT_CHUNK_SIZE=17 is not allowed: 1..EVAL_SEQ_LEN \(16\)$"):
        lora_config(ttt_chunk_size=17).validate()
    with pytest.raises(tg.ConfigError, match=r"^TTT_WARM_START_A=1 is not allowed: 0: .* later in the stream"):
        lora_config(ttt_warm_start_a=True).validate()
