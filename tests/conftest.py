"""Tests import train_gpt.py from the repository root, and the scripts (write_shard) from scripts/."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "scripts"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import numpy as np
import pytest

import train_gpt as tg


def tiny_config(**overrides) -> tg.Hyperparameters:
    """A model small enough for CPU tests in milliseconds, with every feature on."""
    base = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
                rope_dims=4, xsa_last_n=2, bigram_vocab_size=37, bigram_dim=8, ve_dim=8, ve_layers=(2, 3),
                train_seq_len=16, eval_seq_len=16, eval_stride=4, train_batch_tokens=128, val_batch_size=64,
                compile=False)
    base.update(overrides)
    return tg.Hyperparameters(**base)


def perturbed_gpt(cfg: tg.Hyperparameters, scale: float, seed: int = 0) -> tg.GPT:
    """A GPT in eval mode with scale x N(0, 1) added to every weight: no zero-initialised matrix is left,
    so every part of the model acts on the output (and has something to quantize)."""
    import torch

    torch.manual_seed(seed)
    model = tg.GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def stdlib_documents(count: int) -> list[str]:
    """Real text for tests: the first `count` modules of the standard library, in name order."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py"))[:count]
    return [p.read_text(encoding="utf-8") for p in files]


@pytest.fixture(scope="session")
def real_text_tokenizer(tmp_path_factory):
    """A 400-piece BPE SentencePiece model with byte fallback, trained on standard-library text."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("tokenizer")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(stdlib_documents(40)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tok"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                   num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(folder / "tok.model")), str(folder / "tok.model")


@pytest.fixture
def cpu_runtime():
    import torch

    return tg.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
