"""The records' neural-stack techniques (issue 18): the mechanics of each, on tiny models."""
import dataclasses
import math

import pytest
import torch

import train_gpt as tg
from conftest import perturbed_gpt, tiny_config
from test_model import _write_repetitive_shards


def block_outputs(model: tg.GPT, tokens: torch.Tensor) -> list[torch.Tensor]:
    """What each block returns (lanes included), in the order the blocks run."""
    outs = []
    hooks = [b.register_forward_hook(lambda _, __, out: outs.append(out[0])) for b in model.blocks]
    with torch.no_grad():
        model.forward_hidden(tokens)
    for h in hooks:
        h.remove()
    return outs


def test_layer_defaults_follow_num_layers():
    full = tg.Hyperparameters()
    assert (full.xsa_last_n, full.loop_start, full.loop_end, full.parallel_start_layer) == (11, 4, 5, 7)
    for layers in range(1, 12):
        cfg = tg.Hyperparameters(num_layers=layers)
        cfg.validate()
        assert cfg.xsa_last_n == layers and 0 <= cfg.loop_start <= cfg.loop_end < layers
        assert cfg.parallel_start_layer > cfg.loop_end  # lanes never run inside a loop
    assert "setting PARALLEL_START_LAYER=7" in tg.Hyperparameters().as_log_lines()
    assert tg.Hyperparameters(num_layers=1).ve_layers == ()  # its one layer has no attention to take values


def test_the_vocabulary_selects_its_records_recipe_and_explicit_settings_win():
    small, large = tg.Hyperparameters.from_env({}, cuda=False), tg.Hyperparameters.from_env({"VOCAB_SIZE": "8192"}, False)
    recipe = lambda c: (c.num_kv_heads, c.mlp_mult, c.bigram_vocab_size, c.ve_enabled, c.num_loops, c.loop_start,
                        c.loop_end, c.enable_looping_at, c.parallel_start_layer, c.embed_bits, c.embed_clip_sigmas)
    assert recipe(small) == (8, 3.5, 6144, True, 1, 4, 5, 0.5, 7, 8, 20.0)  # #1204's sp1024 shape
    assert recipe(large) == (4, 4.0, 0, False, 2, 3, 5, 0.35, 8, 7, 15.0)  # #1218, #1493, #1586
    assert large.data_path.endswith("fineweb10B_sp8192") and large.tokenizer_path.endswith("fineweb_8192_bpe.model")
    assert recipe(tg.Hyperparameters(vocab_size=4096))[-2:] == (8, 20.0)  # int7 only from 8192
    mine = tg.Hyperparameters.from_env({"VOCAB_SIZE": "8192", "MLP_MULT": "3.5", "NUM_KV_HEADS": "8", "NUM_LOOPS": "1",
                                        "EMBED_BITS": "8"}, cuda=False)
    assert (mine.mlp_mult, mine.num_kv_heads, mine.num_loops, mine.embed_clip_sigmas) == (3.5, 8, 1, 20.0)
    assert (mine.loop_start, mine.loop_end) == (3, 5)  # the loop's span is the vocabulary's, its count the user's
    for layers in range(1, 12):  # the recipe's layer indices follow NUM_LAYERS, as the sp1024 ones do
        tg.Hyperparameters(vocab_size=8192, num_layers=layers).validate()
    assert "setting NUM_KV_HEADS=4" in large.as_log_lines() and tg.VOCAB_RECIPES[2]["loop_length"] == 2


@pytest.mark.parametrize("env, allowed", [
    (dict(LOOP_START="3", LOOP_END="2"), "LOOP_END=2 is not allowed: LOOP_START (3)..3"),
    (dict(LOOP_END="4"), "LOOP_END=4 is not allowed"),
    (dict(LOOP_START="-1"), "LOOP_START=-1 is not allowed: at least 0"),
    (dict(PARALLEL_START_LAYER="2"), "PARALLEL_START_LAYER=2 is not allowed: after LOOP_END (2)"),
    (dict(ENABLE_LOOPING_AT="1"), "ENABLE_LOOPING_AT=1.0 is not allowed: in [0, 1)"),
    (dict(VE_LAYERS="0"), "VE_LAYERS='0' is not allowed: distinct indices of layers with attention, 1..3"),
])
def test_bad_layer_settings_stop_with_one_line(env, allowed):
    with pytest.raises(tg.ConfigError, match=allowed.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tg.Hyperparameters.from_env(dict(NUM_LAYERS="4", **env), cuda=False)


def test_serial_layers_match_the_serial_model_and_parallel_lanes_start_as_one_stream():
    cfg = tiny_config(num_layers=5, num_loops=0, parallel_start_layer=3, ve_layers=(4,))
    model = perturbed_gpt(cfg, 0.05)
    serial = tg.GPT(dataclasses.replace(cfg, parallel_residual=False)).eval()
    serial.load_state_dict({k: v for k, v in model.state_dict().items() if "lane_weights" not in k})
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    ours, theirs = block_outputs(model, x), block_outputs(serial, x)
    for i in range(3):  # below PARALLEL_START_LAYER: the serial blocks, exactly
        assert torch.equal(ours[i], theirs[i])
    assert ours[3].shape == (2, *theirs[3].shape) and not torch.equal(ours[3][0], theirs[3])
    # At the lane weights' init (all 1), both lanes carry x + attention(x) + MLP(x): a parallel block.
    block = model.blocks[3]
    with torch.no_grad():
        block.lane_weights.fill_(1.0)
        h = torch.randn(2, 16, cfg.model_dim)
        lanes, _ = block(torch.stack((h, h)), None, None)
        attn, _ = block.attn(tg.rms_norm(h) * block.norm_scale, None, None)
        expected = h + block.attn_scale * attn + block.mlp_scale * block.mlp(tg.rms_norm(h) * block.norm_scale)
    assert torch.allclose(lanes[0], expected, atol=1e-6) and torch.equal(lanes[0], lanes[1])
    # Routing: with attention writing to lane 0 only and the MLP to lane 1 only, lane 1 never sees attention.
    with torch.no_grad():
        block.lane_weights.copy_(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
        lanes, _ = block(torch.stack((h, h)), None, None)
    assert torch.allclose(lanes[0], h + block.attn_scale * attn, atol=1e-6)
    assert torch.allclose(lanes[1], expected - block.attn_scale * attn, atol=1e-6)


def test_recurrence_reuses_the_blocks_and_changes_only_the_order():
    cfg = tiny_config(num_layers=5, ve_layers=(4,))  # loop 1..2 once more, lanes from 3
    model = perturbed_gpt(cfg, 0.05)
    no_loops = tg.GPT(dataclasses.replace(cfg, num_loops=0))
    assert model.layer_order() == [0, 1, 2, 1, 2, 3, 4]
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in no_loops.named_parameters()]
    assert model.skip_weights.shape[0] == 3 and no_loops.skip_weights.shape[0] == 2  # pairs of the longer order
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    calls = []
    hooks = [b.register_forward_hook(lambda m, *_: calls.append(m)) for b in model.blocks]
    looped = model.forward_hidden(x)
    assert calls == [model.blocks[i] for i in model.layer_order()]  # the same modules, run twice
    model.looping = False
    assert model.layer_order() == list(range(5))
    assert not torch.allclose(model.forward_hidden(x), looped)
    for h in hooks:
        h.remove()


def test_recurrence_switches_on_at_the_agreed_fraction_and_stays_on(tmp_path, cpu_runtime):
    _write_repetitive_shards(tmp_path, 64)
    cfg = tiny_config(data_path=str(tmp_path), iterations=20, enable_looping_at=0.5, max_wallclock_seconds=0,
                      train_log_every=0, use_mixer="none", ema_decay=0.0, grad_accum_steps=1)
    model, lines, orders = tg.GPT(cfg), [], []
    model.register_forward_pre_hook(lambda m, _: orders.append(len(m.layer_order())))
    result = tg.train(model, model, cfg, cpu_runtime, lines.append)
    switch = [line for line in lines if line.startswith("looping_enabled")]
    assert result.steps == 20 and switch == ["looping_enabled step:9 train_time:" + switch[0].split("train_time:")[1]]
    assert "layer_order:0,1,2,1,2,3" in switch[0] and model.looping
    assert orders == [4] * 9 + [6] * 11  # steps 0-8 unlooped, then every step looped


def test_muon_row_normalize_feeds_newton_schulz_unit_rows(monkeypatch):
    seen = []
    monkeypatch.setattr(tg, "newton_schulz_orthogonalize", lambda g, steps: seen.append(g.clone()) or g)
    torch.manual_seed(0)
    grad = torch.randn(6, 10) * torch.arange(1, 7)[:, None]
    for normalize in (False, True):
        tg.muon_update(grad, torch.zeros_like(grad), torch.tensor(0.9), 5, normalize)
    plain, normalized = seen
    assert torch.allclose(normalized.norm(dim=1), torch.ones(6), atol=1e-6)
    assert torch.allclose(normalized, plain / plain.norm(dim=1, keepdim=True), atol=1e-6)
    assert not torch.allclose(plain.norm(dim=1), torch.ones(6))


def test_sdclip_steps_follow_each_rows_std():
    torch.manual_seed(0)
    w = torch.randn(8, 512) * torch.linspace(0.1, 2.0, 8)[:, None]
    w[0, 0] = 1000.0  # over 12 sigma even of its own row's std (at most sqrt(511) sigma)
    scale = tg.row_scales(w, 6, sigmas=12.0)
    assert torch.equal(scale, (12.0 * w.std(dim=1) / 31).half().float())
    q, stored = tg.rtn_quantize(w, 6, 12.0)
    assert torch.equal(stored.float(), scale) and int(q[0, 0]) == 31  # the outlier is clipped at qmax


def test_sdclip_settings_reach_each_tensor_class():
    cfg = tiny_config(model_dim=64, quant_min_numel=0, mlp_clip_sigmas=12.0, attn_clip_sigmas=13.0,
                      embed_clip_sigmas=15.0, gptq=False)
    model = perturbed_gpt(cfg, 0.05)
    state = tg.quantize_state(model, cfg, {})
    tensors = model.state_dict()
    for name, sigmas in (("blocks.1.mlp.fc.weight", 12.0), ("blocks.1.attn.c_q.weight", 13.0),
                         ("tok_emb.weight", 15.0)):
        bits = state[name].bits
        expected = (sigmas * tensors[name].float().std(dim=1) / tg.qmax_for(bits)).half()
        assert torch.equal(state[name].scale, expected), name


def test_smear_gate_mixes_in_the_previous_embedding_except_at_a_document_start():
    cfg = tiny_config()
    model = tg.GPT(cfg)
    with torch.no_grad():
        model.smear_lambda.fill_(0.5)
        model.smear_gate.weight.normal_()
    tokens = torch.tensor([[5, 6, tg.BOS_ID, 7, 8]])
    x = model.tok_emb(tokens)
    with torch.no_grad():
        smeared = model.smeared(x, tokens, None)
        gate = 0.5 * torch.sigmoid(model.smear_gate(x[..., :tg.GATE_WIDTH]))
    assert torch.equal(smeared[:, 0], x[:, 0])  # nothing before the window
    assert torch.allclose(smeared[:, 1], x[:, 1] + gate[:, 1] * x[:, 0])
    assert torch.equal(smeared[:, 2], x[:, 2])  # a document starts: nothing carried over from the last one
    assert torch.allclose(smeared[:, 3], x[:, 3] + gate[:, 3] * x[:, 2])
    with torch.no_grad():
        model.smear_lambda.zero_()
        assert torch.equal(model.smeared(x, tokens, None), x)  # the identity at init


def test_gates_scales_and_layer0_start_as_documented():
    cfg = tiny_config(num_layers=6, ve_layers=(5,))
    model = perturbed_gpt(cfg, 0.05)
    assert model.blocks[0].attn is None and model.blocks[0].attn_scale is None
    assert not any(n.startswith("blocks.0.attn") for n, _ in model.named_parameters())
    assert [b.norm_scale for b in model.blocks] == [1 / math.sqrt(i + 1) for i in range(6)]
    assert tg.GPT(dataclasses.replace(cfg, ln_scale=False)).blocks[3].norm_scale == 1.0
    attn = model.blocks[2].attn
    x = torch.randn(2, 16, cfg.model_dim)
    with torch.no_grad():
        gated, _ = attn(x, None, None)
        attn.out_gate.weight.zero_()  # the init: 2 sigmoid(0) = 1, the ungated output
        ungated, _ = attn(x, None, None)
        del attn.out_gate
        assert torch.allclose(attn(x, None, None)[0], ungated, atol=1e-6)
    assert not torch.allclose(gated, ungated)
    groups = tg.parameter_groups(model)
    small = {id(p) for p in groups["scalar"]}
    for name, p in model.named_parameters():
        if "gate" in name or "lane_weights" in name:
            assert id(p) in small, name  # AdamW, not Muon


def test_gated_skips_blend_half_and_half_at_init():
    cfg = tiny_config(num_layers=4, num_loops=0, parallel_residual=False, ve_layers=(3,))
    model = perturbed_gpt(cfg, 0.05)
    ungated = tg.GPT(dataclasses.replace(cfg, skip_gates_enabled=False)).eval()
    ungated.load_state_dict({k: v for k, v in model.state_dict().items() if k != "skip_gates"})
    with torch.no_grad():
        model.skip_gates.zero_()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    ours, theirs = block_outputs(model, x), block_outputs(ungated, x)
    assert torch.equal(ours[1], theirs[1])  # the encoder half is the same
    block_in = {}

    def keep(key):
        def hook(_, args):
            block_in.setdefault(key, args[0])
        return hook
    model.blocks[2].register_forward_pre_hook(keep("gated"))
    ungated.blocks[2].register_forward_pre_hook(keep("plain"))
    block_outputs(model, x), block_outputs(ungated, x)
    skip = model.skip_weights[1] * ours[1]
    assert torch.allclose(block_in["gated"], 0.5 * (ours[1] + skip), atol=1e-6)  # lerp(skip, x, 1/2)
    assert torch.allclose(block_in["plain"], ours[1] + skip, atol=1e-6)
