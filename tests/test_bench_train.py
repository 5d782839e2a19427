"""scripts/bench_train.py --techniques at a tiny shape: one table row per technique, the mixer's rows, and
figures that hang together (ratios to the all-off row, recurrence adding FLOPs)."""
import dataclasses

import pytest
import torch

import train_gpt as tg

TINY = dict(NUM_LAYERS="8", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", BIGRAM_VOCAB_SIZE="256",
            BIGRAM_DIM="16", VE_DIM="16", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="256", GRAD_ACCUM_STEPS="1")
MIXER_ROWS = ("USE_MIXER=none", "oracle lookup alone", "USE_MIXER=learned (lookup + mixer loss)")


def table_cells(output: str, first_header: str) -> dict[str, list[str]]:
    """The rows of the Markdown table whose first header cell is `first_header`: name -> the other cells."""
    lines = output[output.index(f"| {first_header} |"):].split("\n\n")[0].splitlines()[2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


@pytest.mark.skipif("parallel_residual" not in {f.name for f in dataclasses.fields(tg.Hyperparameters)},
                    reason="train_gpt.py does not have the stack's settings (PARALLEL_RESIDUAL, NUM_LOOPS, ...) yet")
def test_techniques_table_has_every_row_with_ratios_to_all_off(monkeypatch, capsys):
    import bench_train

    for name, value in TINY.items():
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    try:
        assert bench_train.main(["--techniques", "--steps", "1", "--warmup", "0", "--cpu-batch-tokens", "128",
                                 "--oracle-tokens", "20000", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    output = capsys.readouterr().out
    rows = table_cells(output, "technique")
    assert list(rows) == list(bench_train.technique_rows(8))
    for name, cells in rows.items():
        numbers = [float(c.replace(",", "")) for c in cells]
        assert all(n > 0 for n in numbers), (name, cells)
    assert rows["all off"][2] == "1.0000" and rows["all off"][4] == "1.000"  # FLOP and ms ratios
    flops = {name: float(cells[0].replace(",", "")) for name, cells in rows.items()}
    assert flops["all (recurrence on)"] > flops["all (recurrence off)"]
    assert flops["recurrence"] > flops["all off"]
    mixer = table_cells(output, "mixer, all (recurrence off)")
    assert tuple(mixer) == MIXER_ROWS
    assert mixer["USE_MIXER=none"][0] == rows["all (recurrence off)"][3]  # the same measurement
    assert float(mixer["oracle lookup alone"][2]) > 0
    assert float(mixer[MIXER_ROWS[2]][2]) > float(mixer["USE_MIXER=none"][2])  # projected: the mixer costs time
    assert output.count("bench_train technique:") == len(rows) and "bench_train mixer " in output
