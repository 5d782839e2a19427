"""bench_compress.py: the artifact's compressors compared on one quantized state, as bytes and seconds.

For each state it prints one line per way of packing the same integers and steps:
- zstd22_frames: one zstd frame per tensor at level 22, in 1 MiB pieces (the artifact's format, COMPRESSOR=zstd);
- brotli11_frames: the same at brotli quality 11 (COMPRESSOR=brotli, the default); brotli11_whole_frames: one
  piece per tensor, to show what the pieces cost;
- shuffled_groups_zstd22 / shuffled_groups_brotli11: the records' way, byte-shuffled groups: every tensor of one class
  (mlp, attn, matrix, embed as int8 values; all fp16 steps and raw tensors with their low and high bytes in two
  planes) concatenated into one stream per group, each stream compressed once.
Seconds are one thread's (the sum over frames or groups), comparable between rows; the run packs with all cores.

States: `--vocab 1024,8192` builds the 11-layer default of each vocabulary with random weights shaped like trained
ones (bench_quant's trained_like_gpt: Student-t rows, scaled per row) quantized at the size fitter's first step
(SDClip, rounding to nearest); `--artifact PATH` (repeatable) takes a real run's artifact instead. Synthetic weights
have no structure beyond their histogram, so they rank compressors by how well each codes that histogram; a real
artifact also shows the structure training leaves.

Run: python3 scripts/bench_compress.py [--vocab 1024,8192] [--artifact artifacts/demo.pgqw]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
import train_gpt as tg  # noqa: E402
from bench_quant import trained_like_gpt  # noqa: E402


def timed_frames(records: list[bytes], codec: int, level: int, pieces: bool) -> tuple[int, float]:
    """(total compressed bytes, one thread's seconds) of each record compressed on its own: in the artifact's
    FRAME_CHUNK pieces (`pieces`), or whole."""
    compress, total, t0 = tg.codec_functions(codec)[0], 0, time.perf_counter()
    if pieces:
        return sum(map(len, tg.compressed_frames(records, codec, level, workers=1))), time.perf_counter() - t0
    for record in records:
        total += len(compress(record, level))
    return total, time.perf_counter() - t0


def shuffled_groups(state: dict[str, tg.QuantizedTensor]) -> list[bytes]:
    """One stream per class of integer values, and the fp16 (steps, raw tensors) as a low-byte and a high-byte plane."""
    groups: dict[str, list[bytes]] = {}
    halves = []
    for name, q in state.items():
        if q.bits:
            groups.setdefault(tg.tensor_class(name, q.values), []).append(q.values.numpy().tobytes())
            halves.append(q.scale.numpy().view(np.uint8))
        else:
            halves.append(q.values.numpy().astype(np.float16).view(np.uint8).ravel())
    planes = np.concatenate(halves).reshape(-1, 2)
    return [b"".join(parts) for parts in groups.values()] + [planes[:, 0].tobytes(), planes[:, 1].tobytes()]


def compare(label: str, state: dict[str, tg.QuantizedTensor]) -> None:
    records = tg.fast_packing(state, layout=tg.LAYOUT_BYTES).records
    values = sum(q.values.numel() for q in state.values() if q.bits)
    print(f"state {label} tensors:{len(state)} integer_values:{values} raw_bytes:{sum(map(len, records))}")
    groups = shuffled_groups(state)
    rows = [("zstd22_frames", records, tg.CODEC_ZSTD, 22, True),
            ("brotli11_frames", records, tg.CODEC_BROTLI, 11, True),
            ("brotli11_whole_frames", records, tg.CODEC_BROTLI, 11, False),
            ("shuffled_groups_zstd22", groups, tg.CODEC_ZSTD, 22, False),
            ("shuffled_groups_brotli11", groups, tg.CODEC_BROTLI, 11, False)]
    base = None
    for name, streams, codec, level, pieces in rows:
        size, seconds = timed_frames(streams, codec, level, pieces)
        base = base or size
        print(f"compress {label} {name} bytes:{size} vs_zstd22_frames:{size - base:+d} one_thread_s:{seconds:.1f}")
    t0 = time.perf_counter()
    blob = tg.pack_artifact(state, *tg.final_codec(tg.Hyperparameters()))
    print(f"compress {label} artifact_default bytes:{len(blob)} all_cores_s:{time.perf_counter() - t0:.1f} "
          f"cores:{tg.compression_workers()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", default="1024,8192", help="vocabularies whose 11-layer default to build ('' none)")
    parser.add_argument("--artifact", type=Path, action="append", default=[], help="a real artifact to compare on")
    parser.add_argument("--tail-df", type=float, default=4.0, help="Student-t degrees of freedom of the rows")
    args = parser.parse_args(argv)
    for path in args.artifact:
        if not path.is_file():
            parser.error(f"--artifact {path}: no such file")
    for vocab in [int(v) for v in args.vocab.split(",") if v.strip()]:
        cfg = tg.Hyperparameters(vocab_size=vocab, compile=False, gptq=False)
        with torch.no_grad():
            state = tg.quantize_state(trained_like_gpt(cfg, args.tail_df), cfg, {})
        compare(f"synthetic_sp{vocab}", state)
    for path in args.artifact:
        compare(path.name, tg.unpack_artifact(path.read_bytes()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
