"""The model: every option's forward pass, causality, and training that lowers the loss."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

import train_gpt as tg
from make_sample_data import write_shard
from conftest import tiny_config

OPTIONS = {
    "all_on": {},
    "full_attention_heads": dict(num_kv_heads=4),
    "multi_query": dict(num_kv_heads=1),
    "no_xsa": dict(xsa_last_n=0),
    "xsa_everywhere": dict(xsa_last_n=4),
    "no_bigram": dict(bigram_vocab_size=0),
    "no_value_embeddings": dict(ve_enabled=False),
    "no_value_residual": dict(value_residual=False),
    "untied_head": dict(tie_embeddings=False),
    "full_rope": dict(rope_dims=0),
    "no_softcap": dict(logit_softcap=0.0),
    "no_unet": dict(unet_skips=False),
    "odd_layers": dict(num_layers=5, ve_layers=(4,), xsa_last_n=1),
    "no_mixer_head": dict(use_mixer="none"),
    "hedge_no_head": dict(use_mixer="hedge"),
    "serial_residual": dict(parallel_residual=False),
    "no_loops": dict(num_loops=0),
    "lanes_from_layer_0": dict(num_loops=0, parallel_start_layer=0, disable_layer0_attn=False),
    "three_loops_of_one_layer": dict(num_loops=3, loop_start=1, loop_end=1, parallel_start_layer=2),
    "layer0_attention": dict(disable_layer0_attn=False),
    "no_gates_or_scales": dict(smear_gate=False, gate_attn_out=False, skip_gates_enabled=False, ln_scale=False),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_each_option_runs_forward_and_backward(name):
    torch.manual_seed(0)
    cfg = tiny_config(**OPTIONS[name])
    model = tg.GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    hidden = model.forward_hidden(x)
    assert hidden.shape == (2, 16, cfg.model_dim)
    assert (model.mixer_head is not None) == (cfg.use_mixer == "learned")
    expert_inputs = ()
    if model.mixer_head is not None:  # the head learns only from the oracle's probabilities
        valid = torch.rand(2, 16, len(cfg.ngram_orders)) > 0.5
        expert_inputs = (torch.where(valid, torch.rand(valid.shape), 0.0), valid)
    loss = model(x, torch.roll(x, -1, 1), *expert_inputs)
    assert torch.isfinite(loss) and abs(loss.item() - np.log(cfg.vocab_size)) < 1.5
    loss.backward()
    groups = tg.parameter_groups(model)
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    assert all(p.grad is not None for p in model.parameters())


def test_options_change_the_model():
    """Each switch really changes the computation (guards against a flag that is read but ignored)."""
    x = torch.randint(0, 64, (2, 16))
    base_cfg = tiny_config()

    def output(cfg):
        torch.manual_seed(0)
        model = tg.GPT(cfg)
        with torch.no_grad():
            for p in model.parameters():  # zero-initialised weights would hide some options
                p.add_(0.05 * torch.randn_like(p))
        return model.forward_hidden(x)

    base = output(base_cfg)
    for name in ("no_xsa", "no_bigram", "no_value_embeddings", "no_value_residual", "full_rope", "no_unet",
                 "serial_residual", "no_loops", "lanes_from_layer_0", "layer0_attention", "no_gates_or_scales"):
        assert not torch.allclose(output(dataclasses.replace(base_cfg, **OPTIONS[name])), base, atol=1e-5), name


@pytest.mark.parametrize("name", ["all_on", "multi_query", "untied_head", "lanes_from_layer_0",
                                  "three_loops_of_one_layer"])
def test_position_t_depends_on_tokens_up_to_t_only(name):
    torch.manual_seed(0)
    cfg = tiny_config(**OPTIONS[name])
    model = tg.GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    t = 9
    changed = x.clone()
    changed[0, t + 1:] = torch.randint(0, cfg.vocab_size, (16 - t - 1,))
    changed[0, t + 1] = (x[0, t + 1] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model.forward_hidden(x), model.forward_hidden(changed)
    assert torch.equal(a[0, :t + 1], b[0, :t + 1])
    assert not torch.allclose(a[0, t + 1:], b[0, t + 1:])


def test_rotary_partial_leaves_other_channels_alone():
    rotary = tg.Rotary(head_dim=8, dims=4, base=10000.0)
    x = torch.randn(1, 2, 5, 8)
    y = rotary(x)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert torch.allclose(y[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1), atol=1e-5)


def test_newton_schulz_flattens_singular_values():
    torch.manual_seed(0)
    g = torch.randn(32, 64) @ torch.diag(torch.logspace(-2, 1, 64))
    s = torch.linalg.svdvals(tg.newton_schulz_orthogonalize(g, 5))
    assert s.max() < 1.3 and s.min() > 0.3


def _write_repetitive_shards(folder, vocab):
    rng = np.random.default_rng(0)
    phrases = [rng.integers(4, vocab, size=rng.integers(3, 9)) for _ in range(12)]
    stream = np.concatenate([phrases[i] for i in rng.integers(0, 12, size=6000)]).astype(np.uint16)
    write_shard(folder / "fineweb_train_000000.bin", stream[:-4000])
    write_shard(folder / "fineweb_val_000000.bin", stream[-4000:])


def test_tiny_training_run_lowers_the_loss(tmp_path, cpu_runtime):
    _write_repetitive_shards(tmp_path, 64)
    cfg = tiny_config(data_path=str(tmp_path), iterations=40, lr_warmup_steps=5, warmdown_iters=10,
                      max_wallclock_seconds=0, train_log_every=1, matrix_lr=0.04, scalar_lr=0.02,
                      tied_embed_lr=0.05, ema_decay=0.9, grad_accum_steps=2)
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    lines = []
    result = tg.train(model, model, cfg, cpu_runtime, lines.append)
    losses = [float(l.split("train_loss:")[1].split()[0]) for l in lines if "train_loss:" in l]
    assert result.steps == 40 and len(losses) == 40
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])


def test_lr_schedule_warms_up_and_ends_at_min_lr():
    cfg = tiny_config(iterations=100, lr_warmup_steps=10, warmdown_iters=20, min_lr=0.0)
    assert tg.lr_scale(0, 0, None, cfg) == pytest.approx(0.1)
    assert tg.lr_scale(50, 0, None, cfg) == 1.0
    assert tg.lr_scale(90, 0, None, cfg) == pytest.approx(0.5)
    assert tg.lr_scale(100, 0, None, cfg) == 0.0
    # Wall clock: 10 ms a step, stop at 1,000 ms, warm-down of 20 steps = 200 ms.
    assert tg.lr_scale(90, 900, 1000, dataclasses.replace(cfg, iterations=10000)) == pytest.approx(0.5)
    floored = dataclasses.replace(cfg, min_lr=0.1)  # #1787: the warm-down ends at 10%, the warm-up is unchanged
    assert [tg.lr_scale(s, 0, None, floored) for s in (0, 90, 98, 100)] == pytest.approx([0.1, 0.5, 0.1, 0.1])


def test_wallclock_cap_stops_training(tmp_path, cpu_runtime):
    _write_repetitive_shards(tmp_path, 64)
    cfg = tiny_config(data_path=str(tmp_path), iterations=100000, max_wallclock_seconds=1.0,
                      gptq_reserve_seconds=0.5, train_log_every=0, ema_decay=0.0,
                      use_mixer="none")  # no oracle to count: the first step starts at once
    lines = []
    model = tg.GPT(cfg)
    result = tg.train(model, model, cfg, cpu_runtime, lines.append)
    assert result.stopped_early and 0 < result.steps < 100000
    assert any(l.startswith("stopping_early: wallclock_cap") for l in lines)


def _ema_after(values, decay, ramp=True):
    """The averaged value of a one-parameter model whose weight takes `values` in turn, from 0."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = tg.WeightEMA(model, decay, ramp=ramp)
    for v in values:
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update(model)
    return float(ema.shadow["weight"])


def test_ema_of_a_short_run_forgets_the_initial_weights():
    """200 steps at the default decay: the initial weight (0 here; the steps' weights are 1) must not
    weigh in the average. Without the ramp 0.997^200 = 55% of it would be the initialization. With it,
    step s weighs s + 1: a weight that grows by 1 a step averages to 2 * 200 / 3."""
    assert _ema_after([1.0] * 200, 0.997) > 0.999
    assert _ema_after(range(1, 201), 0.997) == pytest.approx(400 / 3, rel=1e-5)
    assert _ema_after([1.0] * 200, 0.997, ramp=False) == pytest.approx(1 - 0.997 ** 200, rel=1e-4)


def test_ema_of_a_long_run_averages_at_the_configured_decay():
    """A weight that grows by 1 a step: the average lags it by decay / (1 - decay) steps once the ramp
    has reached the decay, as a plain EMA at that decay does."""
    steps = 20_000
    lag = steps - _ema_after(range(1, steps + 1), 0.997)
    assert lag == pytest.approx(0.997 / 0.003, rel=1e-3)
