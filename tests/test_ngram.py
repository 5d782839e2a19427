"""The n-gram experts and mixer keep ../shared/LEGALITY.md: normalized, causal, score-first, world-size free."""
import gc
import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg
from make_sample_data import write_shard
from conftest import perturbed_gpt, tiny_config

CPU = torch.device("cpu")


def target_context_keys(model, tokens):
    """Per order, the context keys for predicting tokens[1:], read from the stream before each target, and
    which orders have their whole context there, (T - 1, K)."""
    return tg.stream_context_keys(model, tokens[:-1])


def brute_counts(tokens, order):
    """Every n-gram whose last token is a target (position 1 on: position 0 is never predicted)."""
    return Counter(tuple(tokens[t - order + 1:t + 1]) for t in range(max(1, order - 1), len(tokens)))


@pytest.mark.parametrize("vocab, orders", [(7, (1, 2, 3, 5)), (5000, (2, 7))])  # 5000^6 needs hashing
def test_counts_match_brute_force_and_rows_sum_to_totals(vocab, orders):
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(0, min(vocab, 9), size=400))
    model = tg.NgramModel(orders, vocab, CPU)
    model.add_stream(tokens, 1, 400)
    keys, available = target_context_keys(model, tokens)
    counts, totals = model.target_stats(keys, tokens[1:])
    seq = tokens.tolist()
    for i, n in enumerate(orders):
        brute = brute_counts(seq, n)
        context = Counter(c[:-1] for c in brute.elements())
        for t in range(max(1, n - 1), 400):
            gram = tuple(seq[t - n + 1:t + 1])
            assert available[t - 1, i]
            assert counts[t - 1, i] == brute[gram] and totals[t - 1, i] == context[gram[:-1]]
        table = model.tables[i]
        row_sums = torch.zeros_like(table.totals).index_add_(0, table.pair_keys // vocab, table.pair_counts)
        assert torch.equal(row_sums, table.totals)


def test_streams_shorter_than_the_context_count_nothing_and_do_not_fail():
    """Positions before an order's whole context, and an oracle of 3-5 tokens (shorter than the longest
    context): they count no n-gram of that order."""
    tokens = torch.from_numpy(np.random.default_rng(1).integers(0, 5, size=40))
    model = tg.NgramModel((2, 3, 5, 7), 5, CPU)
    model.add_stream(tokens, 1, 40)
    with pytest.raises(ValueError, match="already counted"):  # one count per table: no incremental adds
        model.add_stream(tokens, 1, 40)
    keys, available = target_context_keys(model, tokens)
    counts, totals = model.target_stats(keys, tokens[1:])
    seq = tokens.tolist()
    for i, n in enumerate(model.orders):
        brute = brute_counts(seq, n)
        for t in range(1, 40):
            assert bool(available[t - 1, i]) == (t >= n - 1)
            if t >= n - 1:
                assert counts[t - 1, i] == brute[tuple(seq[t - n + 1:t + 1])]
    for size in (3, 4, 5):
        oracle = tg.NgramModel(range(2, 8), 5, CPU)
        oracle.add_stream(tokens[:size], 1, size)
        assert [int(t.totals.sum()) for t in oracle.tables] == [max(0, size - n + 1) for n in range(2, 8)]


@pytest.mark.parametrize("chunk", [1, 4])
def test_evaluation_with_chunks_shorter_than_the_context_stays_normalized(chunk):
    cfg = tiny_config(ngram_chunk_tokens=chunk)
    tokens = repetitive_stream(80, cfg.vocab_size)
    _, mixed, audit, _ = mixed_eval(cfg, tokens, range(1, 80))
    assert audit.positions == 79 and audit.worst_sum_error < 1e-6 and audit.worst_target_diff < 1e-9
    assert mixed.scored_tokens == 79


def test_the_neural_expert_keeps_weight_whatever_the_logits():
    """Logits that favour an n-gram expert by 200 would round the neural weight to exactly 0 in float32:
    q_t would then be 0 wherever that n-gram row is. The floor keeps every entry positive and the fast
    path equal to the materialized entry."""
    vocab = 8
    row = torch.zeros(vocab, dtype=torch.int64)
    row[5] = 2  # the order-2 counts after context 3: token 5, twice
    weights = tg.mixer_weights(torch.tensor([[0.0, 200.0]]), torch.tensor([[True]]))[0]
    assert weights[0] > 0 and float(weights.double().sum()) == pytest.approx(1, abs=1e-7)
    neural = torch.log_softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(0)), -1).double()
    q = tg.materialized_mixture(neural, [row], [True], weights, hedge=False)
    for target in (5, 2):  # the n-gram's token, and one the n-gram never saw
        nll = tg.mixture_nll(neural[target], weights.double(), torch.tensor([1.0 if target == 5 else 0.0],
                                                                            dtype=torch.float64))
        sum_error, min_prob, target_diff = tg.audit_distribution(q, target, float(nll))
        assert sum_error < 1e-6 and min_prob > 0 and target_diff < 1e-12 and math.isfinite(float(nll))


def test_smoothed_experts_are_the_formula_and_beta_0_is_the_plain_ratio():
    """NGRAM_PRIOR_BETA by hand: p_n(v) = (c_n(ctx, v) + beta p_nn(v)) / (T_n(ctx) + beta) in the fast path and in
    the materialized row, an unseen context (T = 0) still masked; beta = 0 gives c / T and q_t bit for bit."""
    beta, target = 2.0, 0
    neural = torch.tensor([0.25, 0.25, 0.4, 0.1], dtype=torch.float64)
    rows = [torch.tensor([3, 1, 0, 0]), torch.tensor([0, 2, 0, 0]), torch.zeros(4, dtype=torch.int64)]
    counts, totals = torch.tensor([[3, 0, 0]]), torch.tensor([[4, 2, 0]])  # the target's entries of the rows
    valid = totals > 0
    weights = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)  # order 3's weight: masked
    probs, prior = tg.ngram_expert_probs(counts, totals, valid, beta)
    smoothed = [(3 + beta * 0.25) / (4 + beta), (0 + beta * 0.25) / (2 + beta), 0.0]
    assert (probs + prior * neural[target])[0].tolist() == pytest.approx(smoothed, rel=1e-14, abs=0)
    nll = float(tg.mixture_nll(neural[target].log()[None], weights[None], probs, prior)[0])
    assert nll == pytest.approx(-math.log(0.5 * 0.25 + 0.3 * smoothed[0] + 0.2 * smoothed[1]), rel=1e-14)
    q = tg.materialized_mixture(neural.log(), rows, valid[0].tolist(), weights, hedge=False, beta=beta)
    by_hand = 0.5 * neural + 0.3 * (rows[0] + beta * neural) / 6 + 0.2 * (rows[1] + beta * neural) / 4
    assert torch.allclose(q, by_hand, rtol=1e-14, atol=0)
    sum_error, min_prob, target_diff = tg.audit_distribution(q, target, nll)
    assert sum_error < 1e-14 and min_prob > 0 and target_diff < 1e-14
    assert (q > 0.5 * neural).all()  # the smoothed experts give every token mass, unseen ones too
    plain, no_prior = tg.ngram_expert_probs(counts, totals, valid, 0.0)
    assert no_prior is None and torch.equal(plain, torch.tensor([[0.75, 0.0, 0.0]], dtype=torch.float64))
    q = tg.materialized_mixture(neural.log(), rows, valid[0].tolist(), weights, hedge=False, beta=0.0)
    assert torch.equal(q, 0.5 * neural.log().exp() + 0.3 * rows[0].double() / 4 + 0.2 * rows[1].double() / 2)


@pytest.mark.parametrize("raw, mixer", [("-1", "learned"), ("nan", "learned"), ("inf", "learned"),
                                        ("2", "hedge"), ("2", "none")])
def test_ngram_prior_beta_outside_what_works_stops_the_run(raw, mixer):
    with pytest.raises(tg.ConfigError, match=r"^NGRAM_PRIOR_BETA=\S+ is not allowed: 0 \(off\), or a finite number "
                                             r"above 0 with USE_MIXER=learned"):
        tg.Hyperparameters.from_env(dict(NGRAM_PRIOR_BETA=raw, USE_MIXER=mixer), cuda=False)
    assert tg.Hyperparameters.from_env(dict(NGRAM_PRIOR_BETA="0.5"), cuda=False).ngram_prior_beta == 0.5


def trained_like(cfg, seed=0):
    """Weights far enough from initialisation that the mixer head's output varies with the context."""
    return perturbed_gpt(cfg, 0.3, seed)


def repetitive_stream(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(2, vocab, size=rng.integers(3, 8)) for _ in range(10)]
    stream = np.concatenate([phrases[i] for i in rng.integers(0, 10, size=n)])[:n]
    return torch.from_numpy(stream.astype(np.int64))


def byte_tables(vocab):
    return tg.TokenByteTables(torch.arange(vocab) % 3 + 1, torch.arange(vocab) % 2 == 0, torch.arange(vocab) < 2)


def mixed_eval(cfg, tokens, audit_targets, rt=None, seed=0):
    rt = rt or tg.Runtime(0, 1, 0, CPU)
    model = trained_like(cfg, seed)
    audit = tg.AuditStats(torch.as_tensor(audit_targets, dtype=torch.int64))
    lines = []
    neural, mixed = tg.evaluate_sliding_mixed(model.eval_outputs, tokens, byte_tables(cfg.vocab_size), cfg, rt,
                                              lines.append, audit)
    return neural, mixed, audit, lines


def test_the_neural_rows_sum_to_one_and_the_audit_holds_at_vocabulary_8192():
    """float32's log-softmax over 8,192 logits sums to 1 only within ~1.6e-6, over the audit's 1e-6: the
    neural rows are normalized in float64, and a whole audited evaluation at V = 8,192 keeps the bound."""
    cfg = tiny_config(vocab_size=8192, ngram_chunk_tokens=37)
    tokens = repetitive_stream(120, cfg.vocab_size)
    with torch.no_grad():
        logprobs, _ = trained_like(cfg).eval_outputs(tokens[None, :-1])
    assert logprobs.dtype == torch.float64 and float((logprobs.exp().sum(-1) - 1).abs().max()) < 1e-12
    _, _, audit, _ = mixed_eval(cfg, tokens, range(1, 120, 7))
    assert audit.positions == 17 and audit.worst_sum_error < 1e-6 and audit.min_prob > 0
    assert audit.worst_target_diff < 1e-9


# NGRAM_PRIOR_BETA's smoothed experts must keep every rule the plain ones keep
MODES = [dict(use_mixer="learned"), dict(use_mixer="hedge", mixer_eta=0.05),
         dict(use_mixer="learned", ngram_prior_beta=2.0)]
MODE_IDS = ["learned", "hedge", "learned_prior"]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_materialized_distributions_sum_to_one_and_match_the_fast_path(mode):
    cfg = tiny_config(ngram_chunk_tokens=37, **mode)
    tokens = repetitive_stream(300, cfg.vocab_size)
    neural, mixed, audit, lines = mixed_eval(cfg, tokens, range(1, 300))
    assert audit.positions == 299
    assert audit.worst_sum_error < 1e-6 and audit.min_prob > 0 and audit.worst_target_diff < 1e-9
    assert any(l.startswith("ngram_audit positions:299 ") for l in lines)
    # the fast path's total is the sum of the audited target entries
    assert sum(audit.fast_nll.values()) == pytest.approx(mixed.val_loss * mixed.scored_tokens, rel=1e-9)
    assert mixed.val_loss < neural.val_loss  # on repetitive text the cache helps


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_q_t_ignores_the_target_and_everything_after(mode):
    cfg = tiny_config(ngram_chunk_tokens=37, **mode)
    tokens = repetitive_stream(300, cfg.vocab_size)
    for t in (5, 80, 150, 250):
        changed = tokens.clone()
        changed[t:] = (tokens[t:] + 1 + torch.randint(0, cfg.vocab_size - 1, (300 - t,))) % cfg.vocab_size
        _, _, a, _ = mixed_eval(cfg, tokens, [t])
        _, _, b, _ = mixed_eval(cfg, changed, [t])
        assert torch.equal(a.distributions[t], b.distributions[t])
        assert a.fast_nll[t] != b.fast_nll[t]  # the target changed, so its score did


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_scores_of_a_chunk_ignore_later_chunks(mode):
    cfg = tiny_config(ngram_chunk_tokens=50, **mode)
    tokens = repetitive_stream(300, cfg.vocab_size)
    changed = tokens.clone()
    changed[151:] = repetitive_stream(149, cfg.vocab_size, seed=1)  # chunks 3, 4, 5 change (targets 151..)
    _, _, a, _ = mixed_eval(cfg, tokens, range(1, 300))
    _, _, b, _ = mixed_eval(cfg, changed, range(1, 300))
    assert all(a.fast_nll[t] == b.fast_nll[t] for t in range(1, 151))
    assert any(a.fast_nll[t] != b.fast_nll[t] for t in range(151, 300))


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_the_cache_learns_only_after_a_chunk_is_scored(beta):
    """A phrase seen only inside the current chunk must not help it; after the chunk it must. An empty
    cache leaves every expert masked, smoothed (NGRAM_PRIOR_BETA) or not."""
    cfg = tiny_config(ngram_chunk_tokens=1000, use_mixer="learned", ngram_prior_beta=beta)
    tokens = repetitive_stream(300, cfg.vocab_size)
    one_chunk = mixed_eval(cfg, tokens, [])[1]
    small = mixed_eval(dataclasses.replace(cfg, ngram_chunk_tokens=30), tokens, [])[1]
    neural = mixed_eval(cfg, tokens, [])[0]
    assert one_chunk.val_loss == pytest.approx(neural.val_loss, abs=1e-9)  # the cache is empty throughout
    assert small.val_loss < neural.val_loss


def _mixed_in_process(rank, world, init_file, cfg, tokens, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    neural, mixed, _, _ = mixed_eval(cfg, tokens, [3, 100, 250], tg.Runtime(rank, world, rank, CPU))
    if rank == 0:
        np.save(out, np.array([neural.val_bpb, mixed.val_bpb, mixed.scored_bytes]))
    dist.barrier()  # neither rank tears the group down while the other still uses it
    gc.collect()  # and nothing left holds it for the collection at exit (see train_gpt.main)
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_one_and_two_processes_give_the_same_val_bpb(tmp_path, mode):
    cfg = tiny_config(ngram_chunk_tokens=41, val_batch_size=48, **mode)  # chunks straddle rank boundaries
    tokens = repetitive_stream(400, cfg.vocab_size)
    results = []
    for world in (1, 2, 3):
        out = tmp_path / f"r{world}.npy"
        mp.spawn(_mixed_in_process, args=(world, str(tmp_path / f"init{world}"), cfg, tokens, str(out)), nprocs=world)
        results.append(np.load(out))
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=0, atol=1e-6)


def test_hashed_pair_cache_is_caught_by_the_materialization_check():
    """The rejected design: count(ctx, v) and count(ctx) in two unrelated hashed tables. Only the target's
    ratio is ever computed, and it looks like a probability; the full row does not sum to one."""
    vocab, buckets = 64, 97
    tokens = repetitive_stream(2000, vocab).tolist()
    ctx_table, pair_table = np.zeros(buckets), np.zeros(buckets)
    for t in range(2, len(tokens)):
        ctx = (tokens[t - 2], tokens[t - 1])
        ctx_table[hash(ctx) % buckets] += 1
        pair_table[hash(ctx + (tokens[t],)) % buckets] += 1
    ctx = (tokens[10], tokens[11])
    ratio = torch.tensor([min(1.0, pair_table[hash(ctx + (v,)) % buckets] / ctx_table[hash(ctx) % buckets])
                          for v in range(vocab)], dtype=torch.float64)
    neural = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    q = 0.5 * neural + 0.5 * ratio  # mixed as if the ratio were a distribution
    target = tokens[12]
    sum_error, min_prob, target_diff = tg.audit_distribution(q, target, -float(torch.log(q[target])))
    assert 0 < q[target] <= 1 and target_diff < 1e-12  # the target's number looks fine...
    assert sum_error > 1.0                             # ...but the distribution is not one


@pytest.mark.parametrize("beta", [0.0, 3.0])
def test_oracle_leaves_out_the_occurrence_it_is_asked_about(tmp_path, beta):
    vocab = 50
    rng = np.random.default_rng(0)
    train = rng.integers(2, vocab, size=3000).astype(np.uint16)
    write_shard(tmp_path / "fineweb_train_000000.bin", train)
    cfg = tiny_config(vocab_size=vocab, data_path=str(tmp_path), ngram_oracle_tokens=2000, train_seq_len=16,
                      ngram_min_order=2, ngram_max_order=4)
    rt = tg.Runtime(0, 1, 0, CPU)
    oracle = tg.build_oracle(cfg, rt, tg.shard_files(tmp_path, "train"))
    loader = tg.DistributedBatchLoader(tg.shard_files(tmp_path, "train"), vocab, 0, 0, 1, cfg.ngram_oracle_tokens)
    counted = brute = None
    seq = train[:2000].tolist()
    grams = {n: brute_counts(seq, n) for n in (2, 3, 4)}
    ctxs = {n: Counter(g[:-1] for g in grams[n].elements()) for n in (2, 3, 4)}
    checked_inside = checked_outside = 0
    for _ in range(12):  # 12 x 256 tokens: past the oracle's 2,000 into text it never counted
        batch = loader.step_batches(256, 1, 16, CPU)[0]
        probs, valid, prior = tg.oracle_probs_for_batch(oracle, batch.inputs, batch.targets, batch.oracle_run, beta)
        assert (prior is None) == (beta == 0)
        row = torch.cat((batch.inputs, batch.targets[:, -1:]), 1).tolist()
        for b in range(batch.inputs.size(0)):
            for j in range(16):
                for i, n in enumerate((2, 3, 4)):
                    if j < n - 2:
                        assert not valid[b, j, i]
                        continue
                    gram = tuple(row[b][j - n + 2:j + 2])
                    inside = int(batch.oracle_run[b, j]) >= n
                    c, total = grams[n][gram] - inside, ctxs[n][gram[:-1]] - inside
                    assert bool(valid[b, j, i]) == (total > 0)
                    if total > 0:  # the smoothed expert's counts' part, and the prior's share
                        assert float(probs[b, j, i]) == pytest.approx(c / (total + beta), rel=1e-6)
                        assert beta == 0 or float(prior[b, j, i]) == pytest.approx(beta / (total + beta), rel=1e-6)
                    elif beta:
                        assert probs[b, j, i] == 0 and prior[b, j, i] == 0  # an unseen context stays masked
                    checked_inside += inside
                    checked_outside += not inside
    assert checked_inside > 1000 and checked_outside > 100


def test_oracle_run_lengths_follow_contiguity():
    places = np.array([5, 6, 7, 8, 100, 101, 3, 4, 9, 10])
    assert tg.oracle_run_lengths(places, 10).tolist() == [1, 2, 3, 4, 0, 0, 1, 2, 1, 0]


def test_mixer_loss_trains_the_head_and_the_transformer():
    cfg = tiny_config(use_mixer="learned", ngram_min_order=2, ngram_max_order=4)
    model = trained_like(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    valid = torch.rand(2, 16, 3) > 0.3
    probs = torch.where(valid, torch.rand(2, 16, 3), 0.0)

    def grads(*expert_inputs):
        model.zero_grad()
        model(x, x, *expert_inputs).backward()
        return model.mixer_head.weight.grad, model.blocks[1].attn.c_q.weight.grad.clone()

    head_plain, cq_plain = grads()
    head_mixed, cq_mixed = grads(probs, valid)
    assert head_plain is None or head_plain.abs().sum() == 0
    assert head_mixed.abs().sum() > 0 and not torch.allclose(cq_plain, cq_mixed)
    weights = tg.mixer_weights(torch.randn(2, 16, 4), valid)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 16)) and (weights[..., 1:][~valid] == 0).all()


def test_training_mixes_the_smoothed_experts_with_the_models_own_probability():
    """GPT's loss with the oracle's prior shares (NGRAM_PRIOR_BETA) is the cross-entropy plus MIXER_LOSS_WEIGHT
    times the mixture's loss, each expert (c + beta p_nn(x)) / (T + beta) with p_nn(x) the model's own."""
    cfg = tiny_config(use_mixer="learned", ngram_min_order=2, ngram_max_order=4, ngram_prior_beta=2.0)
    model = trained_like(cfg).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    y = torch.roll(x, -1, 1)
    counts = torch.randint(0, 4, (2, 16, 3), generator=g)
    totals = counts + torch.randint(0, 3, (2, 16, 3), generator=g)
    valid = totals > 0
    probs, prior = tg.ngram_expert_probs(counts, totals, valid, cfg.ngram_prior_beta)
    loss = model(x, y, probs.float(), valid, prior.float())
    loss.backward()
    with torch.no_grad():
        hidden = model.forward_hidden(x)
        logp = torch.log_softmax(model.logits_from_hidden(hidden), -1).gather(-1, y[..., None])[..., 0].double()
        weights = tg.mixer_weights(model.mixer_head(hidden), valid).double()
        experts = torch.where(valid, (counts + 2.0 * logp.exp()[..., None]) / (totals + 2.0), 0.0)
        q = weights[..., 0] * logp.exp() + (weights[..., 1:] * experts).sum(-1)
    assert float(loss.detach()) == pytest.approx(float(-logp.mean() - cfg.mixer_loss_weight * q.log().mean()), rel=1e-5)
    assert model.mixer_head.weight.grad.abs().sum() > 0


# --- the cache's counts shared by owner ranks ---------------------------------------------------------------

def brute_earlier_counts(tokens, order, chunk, targets):
    """c(ctx_t, x_t) and T(ctx_t) over every target before t's chunk, by brute force; zeros without a context."""
    seq, out = tokens.tolist(), []
    for t in targets:
        if t < order - 1:
            out.append((0, 0))
            continue
        ctx, end = tuple(seq[t - order + 1:t]), 1 + (t - 1) // chunk * chunk
        earlier = [s for s in range(max(1, order - 1), end) if tuple(seq[s - order + 1:s]) == ctx]
        out.append((sum(seq[s] == seq[t] for s in earlier), len(earlier)))
    return out


def test_owner_counts_match_brute_force_whatever_the_senders_order():
    """Rows from two senders whose chunks interleave (as under TTT), some weighing several targets."""
    vocab, chunk, order = 16, 9, 3
    tokens = repetitive_stream(200, vocab)
    targets = torch.arange(order - 1, 200)
    mine = [targets[(targets // 13) % 2 == r] for r in (0, 1)]
    parts = [tg.cache_items(tokens, t, order, vocab, chunk) for t in mine]
    rows = torch.cat([items for items, _ in parts])
    counts = tg.earlier_chunk_counts(rows, vocab)
    brute = dict(zip(targets.tolist(), brute_earlier_counts(tokens, order, chunk, targets.tolist())))
    at = 0
    for t, (items, _) in zip(mine, parts):
        assert items.size(0) == t.numel() and bool((items[:, 3] == 1).all())
        for i, target in enumerate(t.tolist()):
            assert tuple(counts[at + i].tolist()) == brute[target]
        at += items.size(0)
    assert not bool((rows[1:, 2] >= rows[:-1, 2]).all())  # the chunks did interleave
    targets = torch.arange(1, 200)
    for order in (1, 2):  # one row per (context, token, chunk), weighing its targets
        items, where = tg.cache_items(tokens, targets, order, vocab, chunk)
        assert items.size(0) < targets.numel() and int(items[:, 3].sum()) == targets.numel()
        counts = tg.earlier_chunk_counts(items, vocab)[where]
        assert [tuple(c) for c in counts.tolist()] == brute_earlier_counts(tokens, order, chunk, targets.tolist())


def test_frequent_contexts_do_not_load_one_owner():
    """Zipf-distributed tokens (the commonest ~13% of them), 8 ranks: no owner gets more than 1.5x an even
    share of any order's targets in rows, order 1's single context included; without summing a frequent
    context's targets per (context, token, chunk), order 2's owner of the commonest token would."""
    vocab, chunk, ranks = 1024, 4096, 8
    rng = np.random.default_rng(0)
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1))
    tokens = torch.from_numpy(np.searchsorted(cdf, rng.random(200_000) * cdf[-1]).astype(np.int64))
    blocks = torch.arange(1, tokens.numel()).tensor_split(ranks)
    for order in range(1, 8):
        owned, targets = torch.zeros(ranks), 0
        for block in blocks:
            items, _ = tg.cache_items(tokens, block[block >= order - 1], order, vocab, chunk)
            owned += torch.bincount(tg.context_owners(items[:, 0], ranks), minlength=ranks)
            targets += int(items[:, 3].sum())
        assert owned.max() <= 1.5 * targets / ranks, (order, owned)
    one_row_per_target = torch.bincount(tg.context_owners(tokens[:-1], ranks), minlength=ranks).double()
    assert one_row_per_target.max() > 1.5 * one_row_per_target.mean()


def _counts_in_process(rank, world, init_file, tokens, orders, chunk, audit, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    targets = torch.arange(1, tokens.numel())
    mine = targets[(targets // 23) % world == rank] if world == 2 else targets[:0]  # interleaved; or nothing
    if world == 3 and rank == 1:
        mine = targets  # ranks 0 and 2 score nothing, but still count what they own
    result = tg.score_first_counts(tokens, orders, 64, chunk, mine, tg.Runtime(rank, world, rank, CPU), audit)
    torch.save((mine, result), f"{out}.{rank}")
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_counts_equal_one_process_counts(tmp_path, world):
    tokens = repetitive_stream(500, 64)
    orders, chunk, audit = (1, 2, 3, 5, 7), 31, torch.tensor([1, 2, 40, 200, 333, 499])
    targets = torch.arange(1, 500)
    one = tg.score_first_counts(tokens, orders, 64, chunk, targets, tg.Runtime(0, 1, 0, CPU), audit)
    mp.spawn(_counts_in_process, args=(world, str(tmp_path / "init"), tokens, orders, chunk, audit,
                                       str(tmp_path / "out")), nprocs=world)
    scored = 0
    for rank in range(world):
        mine, (counts, totals, available, rows) = torch.load(tmp_path / f"out.{rank}")
        scored += mine.numel()
        for got, full in zip((counts, totals, available), one[:3]):
            assert torch.equal(got, full[mine - 1])
        assert torch.equal(rows, one[3])
    assert scored == targets.numel() and int(one[0][:, 2].sum()) > 100  # the cache had something to count


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_a_rank_that_scores_nothing_changes_nothing(tmp_path, mode):
    """One batch of windows for two ranks: rank 1 scores nothing, and must still count what it owns."""
    cfg = tiny_config(ngram_chunk_tokens=41, val_batch_size=4096, **mode)
    tokens = repetitive_stream(300, cfg.vocab_size)  # 73 windows: one batch
    results = []
    for world in (1, 2):
        out = tmp_path / f"r{world}.npy"
        mp.spawn(_mixed_in_process, args=(world, str(tmp_path / f"init{world}"), cfg, tokens, str(out)), nprocs=world)
        results.append(np.load(out))
    np.testing.assert_allclose(results[1], results[0], rtol=0, atol=1e-6)
