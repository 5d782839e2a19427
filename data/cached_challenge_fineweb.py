"""Downloads the published parameter-golf FineWeb shards and tokenizer from the Hugging Face Hub.

Usage:
    pip install huggingface_hub
    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80

Options:
    --variant        tokenizer family, each from the repository that publishes it (VARIANTS):
                     sp1024 (willdepueoai/parameter-golf), sp4096 and sp8192 (kevclark/parameter-golf,
                     the records since 2026-04-01), sp8192_lossless_caps_caseops_v1_reserved (CaseOps,
                     romeerp/parameter-golf-caseops-v1, the records since 2026-04-18; docs/caseops.md)
    --train-shards   how many train shards to fetch, from 0 to the variant's published count
                     (default 80, as the published script: 8B training tokens at 100M tokens a
                     shard); the validation shard is always fetched, because the validation split
                     is all of it, and with CaseOps its byte sidecar
    --local-dir      where datasets/ and tokenizers/ go (default: this data/ folder)
    --repo-id        a mirror of the variant's repository with the same layout (default:
                     MATCHED_FINEWEB_REPO_ID if set, else the variant's own); one of the
                     repositories above that does not publish the variant is refused

Result, under the data folder (train_gpt.py's default paths for VOCAB_SIZE=1024):
    datasets/fineweb10B_sp1024/fineweb_val_000000.bin
    datasets/fineweb10B_sp1024/fineweb_train_000000.bin ... fineweb_train_<N-1>.bin
    tokenizers/fineweb_1024_bpe.model, tokenizers/fineweb_1024_bpe.vocab
and likewise fineweb10B_sp<V><suffix>/ and fineweb_<V>_bpe<suffix>.model for the others, with
datasets/.../fineweb_val_bytes_000000.bin beside the validation shard for CaseOps.

Running it again fetches only what is missing or incomplete, so an interrupted download
resumes, and asking for more train shards later adds to the ones already there.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
REPO_ROOT = DATA_DIR.parent
# The shard format is defined once, in train_gpt.py; checking downloads with the same code
# that will read them means a shard this script accepts is one training accepts.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from train_gpt import ShardError, shard_token_count  # noqa: E402

REPO_ID_ENV = "MATCHED_FINEWEB_REPO_ID"
# Every published file lives under this folder of the dataset repo; locally it is dropped,
# so that the remote datasets/ and tokenizers/ land directly in the data folder.
REMOTE_ROOT = "datasets"
DEFAULT_TRAIN_SHARDS = 80
TEMPORARY_SUFFIX = ".tmp"


@dataclass(frozen=True)
class Variant:
    repo_id: str  # the dataset repository that publishes it
    dataset_dir: str
    tokenizer_files: tuple[str, ...]
    train_shards: int
    val_shards: int
    byte_sidecar: bool = False  # CaseOps: fineweb_val_bytes_N.bin, one byte count per token of fineweb_val_N.bin


def published_variant(repo_id: str, name: str, train_shards: int, byte_sidecar: bool = False) -> Variant:
    """The files of `name` (sp<V>[suffix]) as the published exports name them: shards of 100M tokens, one val shard."""
    vocab, _, suffix = name[2:].partition("_")
    stem = f"fineweb_{vocab}_bpe" + (f"_{suffix}" if suffix else "")
    return Variant(repo_id, f"fineweb10B_{name}", (f"{stem}.model", f"{stem}.vocab"), train_shards, 1, byte_sidecar)


# Counts are those of each repo's manifest.json (datasets/manifest.json), as the records that use them
# show: sp1024's manifest; sp4096 and sp8192 fetched whole by the 2026-04-01 (143) and 2026-04-05 (128)
# records, whose logs count one val shard; CaseOps exported with --max-train-shards 80 and one val shard of
# 47,851,520 tokens (the 2026-04-18 record). Written here rather than read from the manifest so that the
# list of files, and bad --train-shards values, are known before anything is downloaded.
VARIANTS = {
    "sp1024": published_variant("willdepueoai/parameter-golf", "sp1024", 195),
    "sp4096": published_variant("kevclark/parameter-golf", "sp4096", 143),
    "sp8192": published_variant("kevclark/parameter-golf", "sp8192", 128),
    "sp8192_lossless_caps_caseops_v1_reserved": published_variant(
        "romeerp/parameter-golf-caseops-v1", "sp8192_lossless_caps_caseops_v1_reserved", 80, byte_sidecar=True),
}


class MissingHubError(RuntimeError):
    """huggingface_hub is not installed; nothing can be downloaded."""


class DownloadError(RuntimeError):
    """A file could not be fetched or was not a whole shard; the message names it."""


# =============================================================================
# PATHS
# =============================================================================

def remote_files(variant: str, train_shards: int) -> list[str]:
    """Repo paths to fetch: every val shard, the first `train_shards` train shards, the tokenizer."""
    spec = VARIANTS[variant]
    shard_dir = f"{REMOTE_ROOT}/datasets/{spec.dataset_dir}"
    files = [f"{shard_dir}/fineweb_val_{i:06d}.bin" for i in range(spec.val_shards)]
    files += [f"{shard_dir}/fineweb_val_bytes_{i:06d}.bin" for i in range(spec.val_shards * spec.byte_sidecar)]
    files += [f"{shard_dir}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files += [f"{REMOTE_ROOT}/tokenizers/{name}" for name in spec.tokenizer_files]
    return files


def local_path_for(remote: str, data_dir: Path) -> Path:
    """Where the repo file `remote` goes under `data_dir`."""
    root, _, inner = remote.partition("/")
    if root != REMOTE_ROOT or not inner:
        raise ValueError(f"{remote}: not under the published folder {REMOTE_ROOT}/")
    return Path(data_dir).joinpath(*inner.split("/"))


def temporary_path(path: Path) -> Path:
    return path.with_name(path.name + TEMPORARY_SUFFIX)


def is_complete(path: Path) -> bool:
    """A shard is complete when its size matches its header; any other file when it exists,
    since this script renames a file to its final name only once it is whole."""
    if not path.is_file():
        return False
    if path.suffix != ".bin":
        return True
    try:
        shard_token_count(path)
    except ShardError:
        return False
    return True


def files_to_fetch(remote: list[str], data_dir: Path) -> list[str]:
    """The files of `remote` that are missing or incomplete under `data_dir`, in order."""
    return [name for name in remote if not is_complete(local_path_for(name, data_dir))]


# =============================================================================
# DOWNLOAD
# =============================================================================

Fetch = Callable[[str, str, Path], None]


def hub_fetch(repo_id: str, remote: str, destination: Path) -> None:
    """Writes the repo file `remote` to `destination`, through the Hugging Face cache."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise MissingHubError("huggingface_hub is not installed: pip install huggingface_hub") from exc
    # The hub's errors differ between its versions (requests or httpx based), so any
    # failure of the call is reported as this file's download failing.
    try:
        cached = Path(hf_hub_download(repo_id=repo_id, filename=remote, repo_type="dataset"))
    except Exception as exc:
        raise DownloadError(f"{remote} from {repo_id}: {type(exc).__name__}: {exc}") from exc
    # The cache entry is a symlink to a blob; a hard link to the blob keeps one copy of a
    # 200 MB shard on disk, and a copy is the fallback across file systems.
    blob = cached.resolve(strict=True)
    try:
        os.link(blob, destination)
    except OSError:
        shutil.copyfile(blob, destination)


def fetch_file(remote: str, data_dir: Path, repo_id: str, fetch: Fetch) -> Path:
    """Fetches one file to a temporary name and renames it into place once it is whole,
    so a file with its final name is never half written."""
    final = local_path_for(remote, data_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_path(final)
    partial.unlink(missing_ok=True)
    try:
        fetch(repo_id, remote, partial)
        if final.suffix == ".bin":
            try:
                shard_token_count(partial)
            except ShardError as exc:
                raise DownloadError(f"{remote} from {repo_id} is not a whole shard: {exc}") from exc
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return final


def check_byte_sidecars(variant: str, data_dir: Path) -> None:
    """Each sidecar must hold one count per token of its val shard; a mismatched one is removed, so that a
    second run fetches it again."""
    for i in range(VARIANTS[variant].val_shards * VARIANTS[variant].byte_sidecar):
        shard = data_dir / "datasets" / VARIANTS[variant].dataset_dir / f"fineweb_val_{i:06d}.bin"
        sidecar = shard.with_name(f"fineweb_val_bytes_{i:06d}.bin")
        counts, tokens = shard_token_count(sidecar), shard_token_count(shard)
        if counts != tokens:
            sidecar.unlink()
            raise DownloadError(f"{sidecar}: {counts} byte counts for the {tokens} tokens of {shard.name}; "
                                "removed: run again to fetch it anew")


# =============================================================================
# MAIN
# =============================================================================

class OneLineParser(argparse.ArgumentParser):
    """Bad arguments end with one line naming the option and what is allowed, and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cached_challenge_fineweb.py",
                           description="Download the published parameter-golf FineWeb shards and tokenizer.")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="sp1024",
                        help="tokenizer family (default sp1024)")
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                        help=f"number of train shards, from the first (default {DEFAULT_TRAIN_SHARDS})")
    parser.add_argument("--local-dir", type=Path, default=DATA_DIR,
                        help="folder that receives datasets/ and tokenizers/ (default: this data/ folder)")
    parser.add_argument("--repo-id", default=None,
                        help=f"Hugging Face dataset repo (default: ${REPO_ID_ENV}, else the variant's own)")
    return parser


def main(argv: list[str] | None = None, fetch: Fetch = hub_fetch) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = VARIANTS[args.variant]
    if not 0 <= args.train_shards <= spec.train_shards:
        parser.error(f"argument --train-shards: {args.train_shards} is not in 0..{spec.train_shards}, "
                     f"the train shards published for {args.variant}")
    repo_id = args.repo_id or os.environ.get(REPO_ID_ENV) or spec.repo_id
    if repo_id != spec.repo_id and repo_id in {v.repo_id for v in VARIANTS.values()}:
        parser.error(f"argument --variant: {args.variant} is not published in {repo_id} (from "
                     f"{'--repo-id' if args.repo_id else REPO_ID_ENV}) but in {spec.repo_id}: "
                     f"pass --repo-id {spec.repo_id}{'' if args.repo_id else f' or unset {REPO_ID_ENV}'}")
    data_dir = args.local_dir.resolve()

    wanted = remote_files(args.variant, args.train_shards)
    missing = files_to_fetch(wanted, data_dir)
    print(f"variant:{args.variant} repo:{repo_id} data_dir:{data_dir} files:{len(wanted)} "
          f"present:{len(wanted) - len(missing)} to_fetch:{len(missing)}")
    try:
        for i, remote in enumerate(missing, 1):
            path = fetch_file(remote, data_dir, repo_id, fetch)
            print(f"fetched:{i}/{len(missing)} {path}")
        check_byte_sidecars(args.variant, data_dir)
    except MissingHubError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (DownloadError, OSError) as exc:
        print(f"download failed: {exc}", file=sys.stderr)
        return 1
    print(f"done dataset:{data_dir / 'datasets' / spec.dataset_dir} tokenizers:{data_dir / 'tokenizers'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
