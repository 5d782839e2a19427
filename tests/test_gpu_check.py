"""scripts/gpu_check.sh in its tiny CPU mode: the GPU check runs first whenever a GPU is lent, so it must not
rot while none is."""
import os
import re
import subprocess

from conftest import ROOT
from test_end_to_end import dataset  # noqa: F401  (a fixture)

ROWS = ("hardware", "compile before training (s)", "compile before evaluation (s)", "ms per step (TRAIN_BATCH_TOKENS)",
        "steps in the training budget", "oracle prefill, projected (s)", "artifact build (s)",
        "peak memory, projected (GB)", "evaluation slice (tokens)", "neural pass, LoRA TTT's steps included (tokens/s)",
        "LoRA steps' padding (%)", "phases' global SGD on the slice (s)", "cache pass",
        "evaluation, projected to the split (s)", "preflight verdict")


def test_tiny_gpu_check_measures_three_preflights_and_prints_one_table(dataset, tmp_path):
    data, tok = dataset
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(GPU_CHECK_TINY="1", DATA_PATH=str(data), TOKENIZER_PATH=tok, VOCAB_SIZE="400", CUDA_VISIBLE_DEVICES="",
               GPTQ_RESERVE_SECONDS="120")  # a loaded 2-core CI machine may take longer than an H100's 12 s
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = "| gpu_check | sp1024 USE_MIXER=learned | sp1024 USE_MIXER=none | sp8192 default |"
    table = proc.stdout[proc.stdout.index(header):].splitlines()
    cells = {line.split(" | ")[0].lstrip("| "): [c.strip(" |") for c in line.split(" | ")[1:]] for line in table[2:]}
    assert tuple(cells) == ROWS
    mixer, none, sp8192 = zip(*cells.values())
    verdict, step = ROWS.index("preflight verdict"), ROWS.index("ms per step (TRAIN_BATCH_TOKENS)")
    assert mixer[verdict] == none[verdict] == sp8192[verdict] == "ok"
    assert float(mixer[step]) > 0 and float(none[step]) > 0 and float(sp8192[step]) > 0
    assert "VOCAB_SIZE=8192" in (tmp_path / "logs" / "gpu_check_sp8192_preflight.txt").read_text()
    assert mixer[ROWS.index("oracle prefill, projected (s)")] != "-" == none[ROWS.index("oracle prefill, projected (s)")]
    assert int(mixer[ROWS.index("evaluation slice (tokens)")].replace(",", "")) == 7999  # the 8,000-token slice
    assert float(mixer[ROWS.index("neural pass, LoRA TTT's steps included (tokens/s)")].replace(",", "")) > 0
    assert 0 <= float(mixer[ROWS.index("LoRA steps' padding (%)")]) < 100  # TTT_ENABLED=1, the default
    assert re.fullmatch(r"\d+\.\d+ s", mixer[ROWS.index("cache pass")])
    assert (tmp_path / "logs" / "gpu_check_mixer_preflight.txt").is_file()
    assert not (tmp_path / "artifacts").exists()  # preflights keep nothing
