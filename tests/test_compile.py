"""The path users run on a GPU, exercised on the CPU: torch.compile (inductor, with the C++ compiler here),
bf16 autocast and several processes. Compiled runs must give the eager path's final lines, compile
nothing inside a timed phase, and the model's forward must compile as one graph. The compiled runs launch
the self-extracting wrapper, the file a submission ships and runs; the eager ones the readable source."""
import re
import sys

import pytest
import torch

import train_gpt as tg
from conftest import ROOT, tiny_config
from test_end_to_end import TINY_ENV, dataset, failure, run_script, wrapper_script  # noqa: F401  (fixtures)
from test_model import _write_repetitive_shards

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
# Every part on: the oracle and the mixer loss, CROWN-Q from the first warm-down step, LoRA TTT and a phase of
# global SGD after the first document, the cache.
COMPILE_ENV = dict(TINY_ENV, ITERATIONS="4", VAL_LOSS_EVERY="2", PHASED_TTT_PREFIX_DOCS="1",
                   GLOBAL_TTT_CHUNK_TOKENS="1024", GLOBAL_TTT_BATCH_SEQS="3", NGRAM_AUDIT_POSITIONS="8",
                   WARMUP_STEPS="1")
FINAL = re.compile(r"^(final_\S+)_exact val_loss:\S+ val_bpb:(\S+)$", re.M)


def finals(log: str) -> dict[str, float]:
    return {name: float(bpb) for name, bpb in FINAL.findall(log)}


def logged_run(env, folder, run_id, launcher=(sys.executable,), script=ROOT / "train_gpt.py"):
    proc = run_script(dict(env, RUN_ID=run_id), folder, launcher, timeout=900, script=script)
    assert proc.returncode == 0, failure(proc)
    return (folder / "logs" / f"{run_id}.txt").read_text()


def assert_nothing_compiled_on_the_clocks(log: str, training: bool = True):
    assert re.search(r"^compile_warmup phase:eval graphs:\d+ time:\d+ms$", log, re.M)
    assert re.search(r"^eval_done eval_time:\d+ms recompiles:0$", log, re.M), log[-2000:]
    if training:
        assert re.search(r"^compile_warmup phase:train steps:\d+ graphs:[1-9]\d* time:\d+ms$", log, re.M)
        assert re.search(r"^train_done steps:\d+ .* recompiles:0$", log, re.M)


def assert_same_finals(compiled: dict, eager: dict, tolerance: float):
    assert compiled.keys() == eager.keys() and len(eager) == 3, (compiled, eager)
    for name, bpb in eager.items():
        assert compiled[name] == pytest.approx(bpb, abs=tolerance), (name, compiled[name], bpb)


@pytest.fixture(scope="module")
def one_process_runs(dataset, wrapper_script, tmp_path_factory):
    """(folder, compiled log, eager log): one process, fp32, every feature on."""
    data, tok = dataset
    folder = tmp_path_factory.mktemp("compile1")
    env = dict(COMPILE_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, MATRIX_LRR="0.5")
    return (folder, logged_run(dict(env, COMPILE="1"), folder, "c1", script=wrapper_script),
            logged_run(dict(env, COMPILE="0"), folder, "e1"))


def test_compiled_run_gives_the_eager_final_lines(one_process_runs):
    _, compiled, eager = one_process_runs
    assert_same_finals(finals(compiled), finals(eager), 1e-5)
    assert "final_lora_ttt_ngram_learned" in finals(compiled) and " phases:1/1 adapted:1 " in compiled
    assert_nothing_compiled_on_the_clocks(compiled)
    assert re.search(r"^ngram_audit positions:8 worst_abs_sum_minus_1:\S+ ", compiled, re.M)
    assert "warning: MATRIX_LRR is not a setting and changes nothing; did you mean MATRIX_LR?" in compiled


def test_compiled_artifact_evaluation_in_bf16_gives_the_eager_final_lines(one_process_runs, dataset, wrapper_script):
    """EVAL_ARTIFACT, as a fresh process on a GPU runs it: bf16 autocast and compile, with TTT."""
    folder, _, _ = one_process_runs
    data, tok = dataset
    env = dict(COMPILE_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, BF16="1",
               EVAL_ARTIFACT=str(folder / "artifacts" / "c1.pgqw"))
    compiled = logged_run(dict(env, COMPILE="1"), folder, "c3", script=wrapper_script)
    eager = logged_run(dict(env, COMPILE="0"), folder, "e3")
    assert "setting BF16=1" in compiled and "train_done" not in compiled
    assert_nothing_compiled_on_the_clocks(compiled, training=False)
    # bf16 rounds each op's output to 8 bits of mantissa; the compiled graph fuses ops and rounds fewer
    # intermediates (measured up to 2.4e-5 in val_bpb apart from the eager run)
    assert_same_finals(finals(compiled), finals(eager), 1e-4)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
@pytest.mark.parametrize("bf16, tolerance, mixer", [("0", 1e-5, {}), ("1", 1e-3, dict(NGRAM_PRIOR_BETA="2"))],
                         ids=["fp32", "bf16_prior"])
def test_two_processes_compiled_give_the_eager_final_lines(dataset, wrapper_script, tmp_path, bf16, tolerance, mixer):
    """torchrun, gloo, DDP inside torch.compile with gradient accumulation (micro-steps with and without
    the all-reduce), LoRA TTT and global SGD in lockstep across ranks; in bf16 with the smoothed experts (NGRAM_PRIOR_BETA).
    Trained in bf16, compiled and eager weights part by more (measured 1e-4 in val_bpb after 4 steps on the
    first 6,000 tokens of two files, 5.1e-4 on the plain score of six 1,000-token documents):
    the compiled graph fuses ops and rounds fewer intermediates to bf16, and the training steps carry
    the differences forward."""
    data, tok = dataset
    env = dict(COMPILE_ENV, DATA_PATH=str(data), TOKENIZER_PATH=tok, BF16=bf16, GRAD_ACCUM_STEPS="2",
               TRAIN_BATCH_TOKENS="512", **mixer)
    if bf16 == "1":  # 4 layers and the layer defaults: every technique of docs/frontier.md on
        env = dict({k: v for k, v in env.items() if k not in ("XSA_LAST_N", "VE_LAYERS")}, NUM_LAYERS="4")
    compiled = logged_run(dict(env, COMPILE="1"), tmp_path, "c2", TORCHRUN, script=wrapper_script)
    eager = logged_run(dict(env, COMPILE="0"), tmp_path, "e2", TORCHRUN)
    assert "world_size:2" in compiled and f"setting BF16={bf16}" in compiled
    assert all(f"setting {name}=" in compiled for name in mixer)
    assert_nothing_compiled_on_the_clocks(compiled)
    assert_same_finals(finals(compiled), finals(eager), tolerance)
    audit = re.search(r"^ngram_audit positions:8 worst_abs_sum_minus_1:(\S+) min_prob:\S+ worst_target_diff:(\S+)$",
                      compiled, re.M)
    assert audit and float(audit.group(1)) < 1e-6 and float(audit.group(2)) < 1e-6, audit and audit.group(0)
    if bf16 == "1":
        for line in ("setting XSA_LAST_N=4", "setting PARALLEL_START_LAYER=3", "setting LOOP_END=2",
                     "looping_enabled step:1 ", "layer_order:0,1,2,1,2,3"):
            assert line in compiled, line


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_the_model_compiles_as_one_graph(bf16):
    """A graph break splits the compiled model in two and runs what lies between eagerly: none in the
    training loss (with the oracle's inputs and the CROWN-Q penalty) nor in the evaluation functions."""
    torch._dynamo.reset()
    cfg = tiny_config()
    model = tg.GPT(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]
    probs, valid = torch.rand(2, 16, len(cfg.ngram_orders)), torch.rand(2, 16, len(cfg.ngram_orders)) > 0.5
    prior = torch.rand(probs.shape)  # NGRAM_PRIOR_BETA's shares
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for fn, args in ((model, (x, y, probs, valid, None, torch.ones(()))),
                         (model, (x, y, probs, valid, prior, torch.ones(()))), (model.token_nll, (x, y)),
                         (model.eval_outputs, (x,))):
            explanation = torch._dynamo.explain(fn)(*args)
            assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_the_oracle_lookup_compiles_as_one_graph(beta):
    """The training loop compiles the oracle's lookup (train): one graph with NGRAM_PRIOR_BETA's shares or without."""
    torch._dynamo.reset()
    tokens = torch.randint(0, 64, (400,), generator=torch.Generator().manual_seed(0))
    oracle = tg.NgramModel(range(2, 8), 64, torch.device("cpu"))
    oracle.add_stream(tokens, 1, 400)
    args = (oracle, tokens[:256].view(16, 16), tokens[1:257].view(16, 16), torch.randint(0, 8, (16, 16)), beta)
    explanation = torch._dynamo.explain(tg.oracle_probs_for_batch)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_dtypes_under_bf16_autocast_are_those_cuda_computes(cpu_runtime):
    """q and k after the QK norm, and the MLP's squared activation, are bf16 (CUDA's autocast would make
    them fp32 but for the explicit casts); the logits the loss reads are fp32."""
    import dataclasses

    cfg = tiny_config()
    model = tg.GPT(cfg)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0].dtype  # returns None: the output is left as it is
        return hook

    model.blocks[1].attn.rotary.register_forward_hook(record("rotary_in"))
    model.blocks[0].mlp.proj.register_forward_hook(record("mlp_hidden"))
    rt = dataclasses.replace(cpu_runtime, bf16=True)
    with rt.autocast():
        logprobs, _ = model.eval_outputs(torch.randint(0, cfg.vocab_size, (2, 16)))
    assert seen == {"rotary_in": torch.bfloat16, "mlp_hidden": torch.bfloat16}
    assert logprobs.dtype == torch.float64  # the softmax of the float32 logits, normalized in float64


def test_compile_warm_up_leaves_no_trace(tmp_path, cpu_runtime):
    """Training with the warm-up and without it ends with bit-identical weights: the warm-up takes no
    optimizer step, reads no training data and draws from no shared random stream."""
    _write_repetitive_shards(tmp_path, 64)
    weights = []
    for warmup in (0, 2):
        cfg = tiny_config(data_path=str(tmp_path), iterations=5, lr_warmup_steps=1, warmdown_iters=3,
                          max_wallclock_seconds=0, train_log_every=0, grad_accum_steps=2, compile=True,
                          warmup_steps=warmup, crown_q_lambda=0.5, ngram_oracle_tokens=2000)
        torch.manual_seed(0)
        model = tg.GPT(cfg)
        lines = []
        tg.train(model, torch.compile(model, backend="aot_eager", dynamic=False), cfg, cpu_runtime, lines.append)
        assert any(l.startswith("compile_warmup phase:train") for l in lines) == bool(warmup)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
