"""Quantization and packing: GPTQ against round-to-nearest, the artifact format, size fitting, CROWN-Q."""
import dataclasses
import struct

import pytest
import torch
import zstandard

import train_gpt as tg
from conftest import perturbed_gpt


def quant_config(**overrides) -> tg.Hyperparameters:
    """A 2-layer, 64-wide model with every feature on; zstd level 3 keeps the tests fast."""
    base = dict(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
                rope_dims=8, xsa_last_n=1, bigram_vocab_size=37, bigram_dim=8, ve_dim=8, ve_layers=(1,),
                train_seq_len=32, eval_seq_len=32, eval_stride=8, train_batch_tokens=256, val_batch_size=64,
                gptq_calib_seq_len=32,
                compile=False, gptq_calib_seqs=16, zstd_level=3,
                quant_min_numel=1024)  # quantize these small matrices, which the default would keep raw
    base.update(overrides)
    return tg.Hyperparameters(**base)


def structured_tokens(num_seqs: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """Sequences from a fixed sparse Markov chain: each token is followed by one of 3 successors, so
    that a small model learns real structure in a few dozen steps."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 3), generator=torch.Generator().manual_seed(123))
    seqs = torch.empty(num_seqs, seq_len, dtype=torch.int64)
    seqs[:, 0] = torch.randint(0, vocab, (num_seqs,), generator=gen)
    for t in range(1, seq_len):
        pick = torch.randint(0, 3, (num_seqs,), generator=gen)
        seqs[:, t] = successors[seqs[:, t - 1], pick]
    return seqs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: these models are tiny, and threads contend with other work on small CI machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_model(one_thread):
    """(cfg, model) trained 40 Adam steps on the Markov chain: weights with the structure of training."""
    cfg = quant_config()
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = structured_tokens(8 * 40, cfg.train_seq_len + 1, cfg.vocab_size, seed=1)
    for step in range(40):
        batch = data[8 * step:8 * (step + 1)]
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cfg, model.eval()


def random_quantized_state(bits_list, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for bits in bits_list:
        qmax = tg.qmax_for(bits)
        values = torch.randint(-qmax, qmax + 1, (7, 13), generator=gen).to(torch.int8)  # 91 values: padding
        values[0, :2] = torch.tensor([-qmax, qmax])
        state[f"m{bits}.weight"] = tg.QuantizedTensor(bits, values, torch.rand(7, generator=gen).half())
    state["gain"] = tg.QuantizedTensor(0, torch.tensor([1.5, -0.0, 65504.0, 6e-8, float("inf")]).half())
    state["mix"] = tg.QuantizedTensor(0, torch.randn(3, 5, generator=gen))
    return state


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].bits == b[name].bits, name
        assert a[name].values.dtype == b[name].values.dtype and torch.equal(a[name].values, b[name].values), name
        assert (a[name].scale is None) == (b[name].scale is None), name
        if a[name].scale is not None:
            assert a[name].scale.dtype == b[name].scale.dtype and torch.equal(a[name].scale, b[name].scale), name


@pytest.mark.parametrize("codec,level", [(tg.CODEC_ZSTD, 3), (tg.CODEC_BROTLI, 5)])
@pytest.mark.parametrize("layout", [tg.LAYOUT_BYTES, tg.LAYOUT_BITS, None])
def test_pack_unpack_round_trip_is_exact(layout, codec, level):
    state = random_quantized_state(range(2, 9))
    blob = tg.pack_artifact(state, codec, level, layout=layout)
    assert_same_state(tg.unpack_artifact(blob), state)
    assert tg.pack_artifact(state, codec, level, layout=layout) == blob  # the same input, the same bytes


def layouts_test_state() -> dict:
    """A 6-bit tensor of Gaussian values (one byte per value compresses better: zstd's Huffman codes
    bytes) and a 2-bit tensor that is 90% zeros (bit-packed is better: 4 values per coded byte)."""
    gen = torch.Generator().manual_seed(0)
    gauss = torch.clamp(torch.round(3 * torch.randn(64, 256, generator=gen)), -31, 31).to(torch.int8)
    signs = torch.where(torch.rand(64, 256, generator=gen) < 0.5, 1, -1).to(torch.int8)
    sparse = (torch.rand(64, 256, generator=gen) < 0.1).to(torch.int8) * signs
    return {"gauss.weight": tg.QuantizedTensor(6, gauss, torch.rand(64, generator=gen).half()),
            "sparse.weight": tg.QuantizedTensor(2, sparse, torch.rand(64, generator=gen).half())}


def test_each_tensor_keeps_the_layout_that_compresses_better():
    state = layouts_test_state()
    packing = tg.fast_packing(state)
    assert packing.layouts == [tg.LAYOUT_BYTES, tg.LAYOUT_BITS]
    blob = tg.pack_artifact(state, tg.CODEC_ZSTD, 3)
    assert len(blob) < min(len(tg.pack_artifact(state, tg.CODEC_ZSTD, 3, layout=layout))
                           for layout in (tg.LAYOUT_BYTES, tg.LAYOUT_BITS))
    assert_same_state(tg.unpack_artifact(blob), state)


@pytest.mark.parametrize("codec", [tg.CODEC_ZSTD, tg.CODEC_BROTLI])
def test_frames_are_the_same_for_any_thread_count_and_never_recompressed(codec):
    records = [bytes(range(256)) * 50, b"\1" * 9000, bytes(5), b"\2" * 70000, bytes(range(251)) * 5000]  # 2 pieces
    one = tg.compressed_frames(records, codec, 9, workers=1)
    assert tg.compressed_frames(records, codec, 9, workers=3) == one
    assert [tg.decompressed_frame(codec, frame) for frame in one] == records
    cache = {}
    tg.compressed_frames(records, codec, 9, cache)
    assert len(cache) == 6
    frames = tg.compressed_frames(records[:3] + [b"\3" * 70000] + records[4:], codec, 9, cache)
    assert len(cache) == 7 and frames[:3] == one[:3] and frames[4] == one[4]  # only the changed one was compressed


def test_no_frame_is_larger_than_at_the_fast_level():
    """zstd's level 22 is not always smaller than level 1 on quantized weights: the artifact keeps, per tensor,
    the smaller frame, so its size never exceeds the fast estimate that fit_artifact predicts from."""
    state = random_quantized_state([5, 6, 8]) | layouts_test_state()
    packing = tg.fast_packing(state)
    fast_blob = packing.fast_blob(state)
    for codec, level in ((tg.CODEC_ZSTD, 1), (tg.CODEC_ZSTD, 3), (tg.CODEC_ZSTD, 19), (tg.CODEC_BROTLI, 0)):
        assert len(tg.pack_artifact(state, codec, level)) <= len(fast_blob)


@pytest.mark.parametrize("vocab,embed_bits", [(1024, 8), (8192, 7)])
def test_bit_widths_and_clips_follow_the_tensor_names_and_the_vocabulary(vocab, embed_bits):
    cfg = tg.Hyperparameters(vocab_size=vocab, tie_embeddings=False, bigram_vocab_size=6144, ve_enabled=True)
    with torch.device("meta"):
        model = tg.GPT(cfg)
    plan = tg.class_quantizers(cfg)
    kinds = {name: tg.tensor_class(name, p, cfg.quant_min_numel) for name, p in model.named_parameters()}
    assert kinds["blocks.3.mlp.fc.weight"] == kinds["blocks.3.mlp.proj.weight"] == "mlp"
    for part in ("c_q", "c_k", "c_v", "proj"):
        assert kinds[f"blocks.1.attn.{part}.weight"] == "attn"
    assert kinds["bigram.proj.weight"] == "matrix"  # and value_embed_proj where it has 65,536 values (8 KV heads)
    for name in ("tok_emb.weight", "bigram.embed.weight", "value_embed.weight", "lm_head.weight"):
        assert kinds[name] == "embed", name
    for name in ("blocks.1.attn.q_gain", "skip_weights", "skip_gates", "blocks.1.attn_scale", "smear_gate.weight",
                 "blocks.1.attn.out_gate.weight", "blocks.10.lane_weights"):
        assert kinds[name] == "raw", name
    assert plan == {"raw": (0, 0.0), "mlp": (6, 12.0), "attn": (6, 13.0), "matrix": (6, 12.85),
                    "embed": (embed_bits, 20.0 if embed_bits == 8 else 15.0)}
    finer = tg.class_quantizers(cfg, 0.5)  # a finer step: one more bit, the clip beyond the set one
    assert finer["mlp"][0] == 7 and finer["mlp"][1] == pytest.approx(0.5 * 12.0 * 63 / 31)
    assert finer["embed"] == (8, pytest.approx(0.5 * plan["embed"][1] * (127 / 63 if embed_bits == 7 else 1)))
    assert tg.class_quantizers(cfg, 1.5)["attn"] == (6, pytest.approx(19.5))


def test_gptq_beats_rtn_on_correlated_inputs():
    torch.manual_seed(0)
    mixing = torch.randn(96, 96) * torch.logspace(0, -2, 96)[None, :]  # inputs on a few directions
    x = torch.randn(4096, 96) @ mixing.T + 0.05 * torch.randn(4096, 96)
    w = torch.randn(48, 96)
    for bits in (3, 5):
        sigmas = {3: 2.5, 5: 3.5}[bits]
        q, scale = tg.gptq_quantize(w, x.T @ x / x.size(0), bits, 0.01, sigmas)
        q_rtn, scale_rtn = tg.rtn_quantize(w, bits, sigmas)
        gptq_err = (x @ (w - q.float() * scale.float()[:, None]).T).norm()
        rtn_err = (x @ (w - q_rtn.float() * scale_rtn.float()[:, None]).T).norm()
        assert q.dtype == torch.int8 and int(q.abs().max()) <= tg.qmax_for(bits)
        assert gptq_err < 0.7 * rtn_err, (bits, float(gptq_err), float(rtn_err))


def gptq_columns_one_launch_at_a_time(w, hinv_upper, scale, qmax, block_size):
    """gptq_round_columns as first written: every column rounded, stored and its error stored in the loop."""
    w, q = w.clone(), torch.zeros_like(w)
    for start in range(0, w.size(1), block_size):
        end = min(start + block_size, w.size(1))
        block, h_block = w[:, start:end].clone(), hinv_upper[start:end, start:end]
        errors = torch.zeros_like(block)
        for j in range(end - start):
            column = block[:, j]
            q[:, start + j] = q_column = torch.clamp(torch.round(column / scale), -qmax, qmax)
            errors[:, j] = error = (column - q_column * scale) / h_block[j, j]
            block[:, j:] -= error[:, None] * h_block[j, j:][None, :]
        w[:, end:] -= errors @ hinv_upper[start:end, end:]
    return q


def test_gptq_rounding_is_bitwise_the_column_by_column_loop():
    torch.manual_seed(0)
    x = torch.randn(2048, 300) * torch.exp(torch.randn(300))
    hinv_upper = tg.inverse_hessian_cholesky(x.T @ x / x.size(0), 0.01)
    w = torch.randn(40, 300)
    for bits in (2, 5, 8):
        scale = tg.row_scales(w, bits, 4.0)
        for block_size in (128, 7):
            expected = gptq_columns_one_launch_at_a_time(w, hinv_upper, scale, tg.qmax_for(bits), block_size)
            assert torch.equal(tg.gptq_round_columns(w, hinv_upper, scale, tg.qmax_for(bits), block_size), expected)


def test_matrices_sharing_a_hessian_are_quantized_as_if_alone(trained_model):
    cfg, model = trained_model
    hessians = tg.collect_hessians(model, structured_tokens(16, cfg.train_seq_len, cfg.vocab_size, 3))
    names = [f"blocks.1.attn.{part}.weight" for part in ("c_q", "c_k", "c_v")]
    assert hessians[names[1]] is hessians[names[0]] and hessians[names[2]] is hessians[names[0]]
    state = tg.quantize_state(model, cfg, hessians)
    for name in names:
        q, scale = tg.gptq_quantize(model.state_dict()[name], hessians[name], cfg.matrix_bits, cfg.gptq_damp,
                                    cfg.attn_clip_sigmas)
        assert torch.equal(state[name].values, q) and torch.equal(state[name].scale, scale), name


def test_gptq_beats_rtn_on_a_trained_model(trained_model):
    """At 2 bits the loss itself is lower; at 3 bits, where both stay close to the float loss on this easy
    task, the divergence from the float model's predictions is."""
    cfg, model = trained_model
    held_out = structured_tokens(64, cfg.train_seq_len + 1, cfg.vocab_size, seed=2)
    calib = structured_tokens(16, cfg.train_seq_len, cfg.vocab_size, 3)
    hessians = tg.collect_hessians(model, calib)
    assert "blocks.0.mlp.fc.weight" in hessians and "tok_emb.weight" in hessians  # the tied head's input

    def log_probs(m: tg.GPT) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(m.logits_from_hidden(m.forward_hidden(held_out[:, :-1])), dim=-1)

    def loss_and_kl(bits: int, gptq: bool) -> tuple[float, float]:
        sigmas = {2: 2.0, 3: 2.5}[bits]  # a clip of a few sigmas for these few levels (the defaults are int6's)
        widths = dataclasses.replace(cfg, matrix_bits=bits, gptq=gptq, mlp_clip_sigmas=sigmas, attn_clip_sigmas=sigmas,
                                     matrix_clip_sigmas=sigmas)
        lp = log_probs(tg.dequantize_into(tg.GPT(cfg), tg.quantize_state(model, widths, hessians)))
        loss = -lp.gather(-1, held_out[:, 1:, None]).mean()
        return float(loss), float((reference.exp() * (reference - lp)).sum(-1).mean())

    reference = log_probs(model)
    float_loss = float(-reference.gather(-1, held_out[:, 1:, None]).mean())
    (gptq_loss, gptq_kl), (rtn_loss, rtn_kl) = loss_and_kl(2, True), loss_and_kl(2, False)
    assert float_loss < gptq_loss < rtn_loss and gptq_kl < 0.5 * rtn_kl, (float_loss, gptq_loss, rtn_loss)
    assert loss_and_kl(3, True)[1] < 0.5 * loss_and_kl(3, False)[1]


def test_selfgen_calibration_is_seeded_model_samples(trained_model):
    cfg, model = trained_model
    model.train()
    first = tg.selfgen_calibration_tokens(model, num_seqs=5, seq_len=12, seed=7, batch_seqs=2)
    assert model.training
    assert first.shape == (5, 12) and first.dtype == torch.int64
    assert (first[:, 0] == 1).all() and 0 <= int(first.min()) and int(first.max()) < cfg.vocab_size
    assert torch.equal(first, tg.selfgen_calibration_tokens(model, 5, 12, seed=7, batch_seqs=2))
    assert not torch.equal(first, tg.selfgen_calibration_tokens(model, 5, 12, seed=8))
    model.eval()


def samples_rerunning_the_prefix(model: tg.GPT, num_seqs: int, seq_len: int, seed: int) -> torch.Tensor:
    """What selfgen_calibration_tokens sampled before it had a cache: the whole prefix run for every token."""
    generator = torch.Generator().manual_seed(seed)
    seqs = torch.ones(num_seqs, 1, dtype=torch.int64)  # BOS
    with torch.no_grad():
        while seqs.size(1) < seq_len:
            probs = torch.softmax(model.logits_from_hidden(model.forward_hidden(seqs)[:, -1]).float(), dim=-1)
            seqs = torch.cat((seqs, torch.multinomial(probs, 1, generator=generator)), dim=1)
    return seqs


@pytest.mark.parametrize("options", [{}, dict(num_kv_heads=1, tie_embeddings=False, xsa_last_n=2),
                                     dict(value_residual=False, bigram_vocab_size=0, ve_enabled=False, rope_dims=0)])
def test_cached_sampling_gives_the_tokens_and_logits_of_the_full_forward(options):
    """XSA, value embeddings, value residual, the bigram hash and rotary all see positions through the
    DecodeCache as the full forward sees them."""
    cfg = quant_config(**options)
    model = perturbed_gpt(cfg, 0.3)
    tokens = tg.selfgen_calibration_tokens(model, num_seqs=6, seq_len=40, seed=5)
    assert torch.equal(tokens, samples_rerunning_the_prefix(model, 6, 40, seed=5))
    assert len(tokens.unique()) > cfg.vocab_size // 2  # varied samples: the comparison means something
    with torch.no_grad():
        full = model.logits_from_hidden(model.forward_hidden(tokens))
        for first in (1, 17):  # one position at a time from the start, or from a prefix run at once
            cache = tg.DecodeCache(40)
            parts = [tokens[:, :first]] + list(tokens[:, first:].split(1, dim=1))
            cached = torch.cat([model.logits_from_hidden(model.forward_hidden(part, cache)) for part in parts], dim=1)
            assert (cached - full).abs().max() < 2e-5 * full.abs().max(), first  # fp32 rounding: ~1e-6
            assert not torch.equal(cached[:, 1:], full[:, :-1])  # (the positions really are distinct)


def test_loaded_model_gives_exactly_the_dequantized_logits(trained_model):
    cfg, model = trained_model
    calib = structured_tokens(16, cfg.train_seq_len, cfg.vocab_size, 3)
    state = tg.quantize_state(model, cfg, tg.collect_hessians(model, calib))
    assert {q.bits for q in state.values()} == {0, 6, 8}
    in_memory = tg.dequantize_into(tg.GPT(cfg), state).eval()
    torch.manual_seed(99)  # a fresh model with other initial weights
    loaded = tg.dequantize_into(tg.GPT(cfg), tg.unpack_artifact(tg.pack_artifact(state, tg.CODEC_BROTLI, 5))).eval()
    x = structured_tokens(4, cfg.train_seq_len, cfg.vocab_size, 4)
    with torch.no_grad():
        expected = in_memory.logits_from_hidden(in_memory.forward_hidden(x))
        assert torch.equal(loaded.logits_from_hidden(loaded.forward_hidden(x)), expected)


def test_dequantize_into_refuses_another_model_shape(trained_model):
    cfg, model = trained_model
    state = tg.quantize_state(model, dataclasses.replace(cfg, gptq=False), {})
    with pytest.raises(tg.ArtifactError, match="does not match the model"):
        tg.dequantize_into(tg.GPT(dataclasses.replace(cfg, mlp_mult=3.0)), state)


def test_prune_zeroes_the_cheapest_values_of_mlp_and_attention_only():
    cfg = quant_config(gptq=False)
    state = tg.quantize_state(perturbed_gpt(cfg, 0.05), cfg, {})
    pruned = tg.prune_smallest(state, 0.1)
    prunable = [n for n, q in state.items() if q.bits and tg.tensor_class(n, q.values) in ("mlp", "attn")]
    total = sum(state[n].values.numel() for n in prunable)
    newly_zero = sum(int(((state[n].values != 0) & (pruned[n].values == 0)).sum()) for n in prunable)
    assert newly_zero == int(0.1 * total)
    assert torch.equal(pruned["tok_emb.weight"].values, state["tok_emb.weight"].values)
    cost = {n: state[n].values.float().abs() * state[n].scale.float()[:, None] for n in prunable}
    kept = torch.cat([cost[n][pruned[n].values != 0] for n in prunable])
    cut = torch.cat([cost[n][(state[n].values != 0) & (pruned[n].values == 0)] for n in prunable])
    cut_max, kept_min = float(cut.max()), float(kept.min())
    assert cut_max <= kept_min


def test_fit_ladder_goes_from_finer_steps_to_coarser_then_prunes():
    ladder = tg.fit_ladder(quant_config())
    steps = [step for step, _ in ladder]
    assert steps == sorted(steps) and steps[0] < 1 < steps[-1] and 1.0 in steps
    assert [prune for _, prune in ladder] == [0.0] * len(tg.FIT_STEPS) + list(tg.FIT_PRUNES)
    assert [p for _, p in tg.fit_ladder(quant_config(prune_fraction=0.03))][-2:] == [0.04, 0.08]


def logged(lines: list[str], kind: str) -> list[dict]:
    return [dict(kv.split(":", 1) for kv in line.split()[1:] if ":" in kv) for line in lines if line.startswith(kind + " ")]


def entry_of(fields: dict) -> tuple[float, float]:
    return round(float(fields["step"]), 3), float(fields["prune"])


def final_sizes_in_ladder_order(model, cfg, hessians) -> list[int]:
    """Every entry of the ladder built as fit_artifact builds it, the slow way."""
    return [len(tg.pack_artifact(tg.prune_smallest(tg.quantize_state(model, cfg, hessians, step), prune),
                                 *tg.final_codec(cfg))) for step, prune in tg.fit_ladder(cfg)]


def test_fit_artifact_takes_the_most_precise_entry_that_fits(trained_model):
    cfg, model = trained_model
    calib = structured_tokens(16, cfg.train_seq_len, cfg.vocab_size, 3)
    sizes = final_sizes_in_ladder_order(model, cfg, tg.collect_hessians(model, calib))
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes  # the ladder shrinks: the finest fitting is the first
    ladder = tg.fit_ladder(cfg)
    for k in (0, 3, 9, len(sizes) - 1):  # targets that only entry k and those after it meet
        target = 1000 + sizes[k] + (10 ** 9 if k == 0 else (sizes[k - 1] - sizes[k]) // 2)
        lines = []
        blob, entry = tg.fit_artifact(model, dataclasses.replace(cfg, target_bytes=target), 1000, lines.append, calib)
        tries = logged(lines, "artifact_try")
        assert len(tries) < tg.FIT_TRIES, lines  # within its tries, the fitter finds the most precise that fits:
        assert entry == ladder[k] and len(blob) == sizes[k] and 1000 + len(blob) <= target, (k, lines)
        assert [f["total_bytes"] for f in tries if entry_of(f) == (round(ladder[k][0], 3), ladder[k][1])] == [str(1000 + len(blob))]
        estimates = [entry_of(f) for f in logged(lines, "artifact_estimate")]
        assert len(set(estimates)) == len(estimates), estimates  # each estimated once
        assert lines[-1].startswith("artifact_fit chose step:") and f"bytes:{1000 + len(blob)}" in lines[-1]
        assert tg.unpack_artifact(blob).keys() == model.state_dict().keys()


@pytest.mark.parametrize("first", [0, 1, 5, 13, 14, None])
def test_first_predicted_fit_bisects(first):
    asked = []

    def fits(i):
        asked.append(i)
        return first is not None and i >= first

    assert tg.first_predicted_fit(0, 15, fits) == first
    assert len(set(asked)) == len(asked) <= 5
    assert tg.first_predicted_fit(3, 3, fits) is None


def test_fit_artifact_refuses_a_target_it_cannot_reach(trained_model):
    cfg, model = trained_model
    lines = []
    with pytest.raises(tg.ArtifactError, match=r"cannot fit: .*\(step:2.000 prune:0.08 mlp:int6@24.00 "):
        tg.fit_artifact(model, dataclasses.replace(cfg, gptq=False, target_bytes=5000), 1000, lines.append)
    assert [f["fits"] for f in logged(lines, "artifact_try")] == ["0"]


def artifact_with_frame(blob: bytes, index: int, frame: bytes | None) -> bytes:
    """`blob` with the index-th tensor's frame replaced (None: kept), the head table and checksum made to match."""
    payload = blob[tg.ARTIFACT_FRAME.size:]
    (table_len,) = struct.unpack_from("<I", payload)
    heads = tg.read_tensor_heads(zstandard.ZstdDecompressor().decompress(payload[4:4 + table_len]))
    offsets = [4 + table_len]
    for head in heads:
        offsets.append(offsets[-1] + head[-1])
    frames = [payload[a:b] for a, b in zip(offsets, offsets[1:])]
    frames[index] = frames[index] if frame is None else frame
    state = {name: tg.QuantizedTensor(bits, torch.zeros(shape, dtype=torch.int8 if bits else dtype),
                                      torch.zeros(shape[0], dtype=dtype) if bits else None)
             for name, shape, bits, layout, dtype, _, _ in heads}
    return tg.blob_from_frames(state, [head[3] for head in heads], [head[5] for head in heads], frames)


def test_damaged_artifacts_are_refused():
    blob = tg.pack_artifact(random_quantized_state([5, 6]), tg.CODEC_ZSTD, 3)
    assert artifact_with_frame(blob, 1, None) == blob  # rebuilt unchanged: the same bytes
    frame = tg.ARTIFACT_FRAME.size
    flipped = bytearray(blob)
    flipped[frame + len(blob[frame:]) // 2] ^= 0x40
    wrong_version = blob[:4] + struct.pack("<H", tg.ARTIFACT_VERSION + 1) + blob[6:]
    old_version = blob[:4] + struct.pack("<H", 1) + blob[6:]
    short_tensor = artifact_with_frame(blob, 1, tg.compressed_frames([bytes(50)], tg.CODEC_ZSTD, 3)[0])
    not_zstd = artifact_with_frame(blob, 0, b"\0" * 20)
    cases = {"corrupted": (bytes(flipped), "checksum"), "truncated": (blob[:-5], "truncated"),
             "frame only": (blob[:frame - 1], "truncated"), "empty": (b"", "truncated"),
             "magic": (b"PK\x03\x04" + blob[4:], "not a model artifact"),
             "version": (wrong_version, f"version {tg.ARTIFACT_VERSION + 1} is not supported"), "format 1": (old_version, "version 1"),
             "padded": (blob + b"\0", "padded"), "short tensor": (short_tensor, "m6.weight holds 50 bytes"),
             "not zstd": (not_zstd, "unreadable")}
    for case, (damaged, message) in cases.items():
        with pytest.raises(tg.ArtifactError, match=message) as info:
            tg.unpack_artifact(damaged)
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value), case


def test_crown_q_penalty_is_positive_and_reaches_the_weights():
    cfg = quant_config(crown_q_lambda=0.5)
    model = perturbed_gpt(cfg, 0.05)
    penalty = tg.crown_q_penalty(model, cfg)
    assert penalty.ndim == 0 and float(penalty.detach()) > 0
    w, plan = model.blocks[0].mlp.fc.weight.detach(), tg.class_quantizers(cfg)
    delta = cfg.mlp_clip_sigmas * w.std(dim=1, keepdim=True) / tg.qmax_for(cfg.matrix_bits)
    steps = {n: (k * p.detach().std(1, keepdim=True) / tg.qmax_for(b)) for n, p in model.named_parameters()
             for b, k in [plan[tg.tensor_class(n, p, cfg.quant_min_numel)]] if b}
    terms = [(p.detach().square() * steps[n].square()).mean() / 12 for n, p in model.named_parameters() if n in steps]
    assert torch.allclose(penalty, 0.5 * torch.stack(terms).mean())
    penalty.backward()
    grad = model.blocks[0].mlp.fc.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    assert torch.allclose(grad, 0.5 / len(terms) * 2 * w * delta.square() / 12 / w.numel())
    assert model.blocks[1].attn.q_gain.grad is None


def test_write_artifact_replaces_atomically(tmp_path):
    path = tmp_path / "artifacts" / "model.pgq"
    tg.write_artifact(path, b"first")
    tg.write_artifact(path, b"second")
    assert path.read_bytes() == b"second" and [p.name for p in path.parent.iterdir()] == ["model.pgq"]


@pytest.mark.parametrize("env, allowed", [
    (dict(COMPRESSOR="lzma"), "COMPRESSOR='lzma' is not allowed: brotli or zstd"),
    (dict(MATRIX_BITS="9"), "MATRIX_BITS=9 is not allowed: 2..8"),
    (dict(EMBED_BITS="1"), "EMBED_BITS=1 is not allowed: 2..8"),
    (dict(MLP_CLIP_SIGMAS="0"), "MLP_CLIP_SIGMAS=0.0 is not allowed: greater than 0"),
    (dict(MIN_LR="1"), "MIN_LR=1.0 is not allowed: in [0, 1)"),
    (dict(EMBED_WD="-0.1"), "EMBED_WD=-0.1 is not allowed: at least 0"),
    (dict(GPTQ_RESERVE_SECONDS="-1"), "GPTQ_RESERVE_SECONDS=-1.0 is not allowed: at least 0"),
])
def test_bad_quantization_and_schedule_settings_stop_with_one_line(env, allowed):
    with pytest.raises(tg.ConfigError, match=allowed.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        tg.Hyperparameters.from_env(env, cuda=False)
