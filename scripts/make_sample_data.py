"""make_sample_data.py: a small real-text corpus in the FineWeb shard format, built with no network.

The published FineWeb shards need a download; this builds a stand-in from text already on the
machine, so that train_gpt.py can be run end to end on a CPU in a few minutes:
- documents: the installed Python standard library's own .py sources (not site-packages, not
  test/ or tests/), one document per file; or, with --text-dir DIR (repeatable), every
  .txt/.py/.rst/.md file under DIR (add --stdlib to use both). Files that are not UTF-8, empty
  files and exact duplicates of an earlier file are skipped.
- split: a document goes to val when the sha256 of its path relative to its source folder says
  so (--val-fraction), so the split never depends on which other files exist. Each split then
  takes documents in sorted path order, skipping any that would pass its cap
  (--max-train-chars, --max-val-chars).
- tokenizer: a SentencePiece BPE model trained on the train documents only (--vocab-size),
  with the published FineWeb tokenizer's control ids (pad 0, bos 1, eos 2, unk 3) and byte
  fallback, but with identity normalization so that newlines, indentation and every other
  character come back exactly from decode (the published model maps newlines to spaces,
  which would make code unreadable). The one exception is sentencepiece's own space marker
  U+2581, which decodes as a space.
- shards: each document is its BOS id followed by its tokens; the train and val token streams
  are cut into fineweb_{train,val}_NNNNNN.bin files of at most --shard-tokens tokens, written
  by write_shard below.
- --caseops: every document goes through case_encode first (capitalisation moved into four
  operator characters, reversibly; the tokenizer keeps each operator one piece), and each val
  shard gets its byte sidecar fineweb_val_bytes_NNNNNN.bin: per token, the bytes it stands for
  in the original text (0 for BOS and operators), which sum to the original's UTF-8 length.
  Run train_gpt.py on it with CASEOPS_ENABLED=1 (docs/caseops.md).

Run (from anywhere; the default outputs are under the repository root):
    python3 scripts/make_sample_data.py
    DATA_PATH=data/datasets/sample_sp1024 TOKENIZER_PATH=data/tokenizers/sample_1024_bpe.model \\
        VOCAB_SIZE=1024 python3 train_gpt.py
A second run with the same options finds sample_manifest.json in --out and returns at once;
--force rebuilds (needed after the files under --text-dir change). Bad options stop the run
with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train_gpt import SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, ShardError, shard_token_count  # noqa: E402

DEFAULT_OUT = ROOT / "data" / "datasets" / "sample_sp1024"
DEFAULT_TOKENIZER = ROOT / "data" / "tokenizers" / "sample_1024_bpe.model"
MANIFEST_NAME = "sample_manifest.json"
TEXT_SUFFIXES = (".txt", ".py", ".rst", ".md")
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
# The control ids of the published fineweb_1024_bpe.model, so that code written for it (BOS-aware
# evaluation, byte accounting that treats ids 0-3 as boundaries) works unchanged on this data.
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MIN_VOCAB_SIZE = 4 + 256  # the control pieces plus one piece per byte for byte fallback
# CaseOps, written here from the idea of #1729: private-use characters, which ordinary text does not use (and
# which are escaped where it does), so that each operator is one piece and costs no byte of the original.
TITLE, ALLCAPS, CAPNEXT, ESC = "\ue000", "\ue001", "\ue002", "\ue003"
CASE_OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
ENCODE_RUN = re.compile("[A-Za-z]+|[\ue000-\ue003]")
DECODE_OP = re.compile("\ue003(.)|\ue000([a-z])|\ue001([a-z]+)|\ue002([a-z])", re.S)
MAX_VOCAB_SIZE = 1 << 16  # ids are stored as uint16


class InputError(ValueError):
    """Bad input; its message is the one line the run stops with."""


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise InputError(message)


@dataclass(frozen=True)
class Document:
    source: str  # the folder the file was found under
    relpath: str  # posix path relative to source: what the split hashes
    text: str


@dataclass
class Collected:
    documents: list[Document]
    not_utf8: int = 0
    empty: int = 0
    duplicate: int = 0


# -----------------------------------------------------------------------------
# DOCUMENTS
# -----------------------------------------------------------------------------


def source_files(root: Path, suffixes: tuple[str, ...], skip_dirs: set[str]) -> list[Path]:
    # os.walk rather than rglob: it prunes skipped folders before descending and never follows
    # folder symlinks, so a link back up the tree cannot loop or double-count files.
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip_dirs]
        found += [Path(folder) / f for f in files if f.endswith(suffixes)]
    return found


def collect_documents(text_dirs: list[Path], use_stdlib: bool) -> Collected:
    """Every document of the sources, sorted by (relative path, source order), duplicates dropped."""
    sources = [(Path(sysconfig.get_paths()["stdlib"]), (".py",), STDLIB_SKIP_DIRS)] if use_stdlib else []
    sources += [(d, TEXT_SUFFIXES, set()) for d in text_dirs]
    candidates = []
    for order, (root, suffixes, skip) in enumerate(sources):
        candidates += [(p.relative_to(root).as_posix(), order, root, p) for p in source_files(root, suffixes, skip)]
    collected = Collected(documents=[])
    seen_texts = set()
    for relpath, _, root, path in sorted(candidates):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            collected.not_utf8 += 1
            continue
        if not text:
            collected.empty += 1
            continue
        # The same text under two paths could hash into both splits and leak val into train.
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen_texts:
            collected.duplicate += 1
            continue
        seen_texts.add(digest)
        collected.documents.append(Document(str(root), relpath, text))
    return collected


def is_val_document(relpath: str, val_fraction: float) -> bool:
    # A hash of the path, not a position or a random draw: a file's split never changes when
    # other files are added, removed or capped.
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


def case_encoded_run(run: str) -> str:
    """One maximal run of ASCII letters (or one operator character) in CaseOps form."""
    if run in CASE_OPERATORS:
        return ESC + run
    if run.islower():
        return run
    if run.isupper() and len(run) > 1:
        return ALLCAPS + run.lower()
    if run[0].isupper() and (len(run) == 1 or run[1:].islower()):
        return TITLE + run.lower()
    return "".join(CAPNEXT + c.lower() if c.isupper() else c for c in run)


def case_encode(text: str) -> str:
    """`text` with its capitalisation in operators before lowercase letters: Title, ALLCAPS, capitalise-next."""
    return ENCODE_RUN.sub(lambda m: case_encoded_run(m.group()), text)


def case_decode(text: str) -> str:
    """The inverse of case_encode: an ALLCAPS run is the whole letter run after it, as encoding ends runs there."""
    def decoded(match: re.Match) -> str:
        escaped, title, allcaps, capnext = match.groups()
        return escaped or (title or allcaps or capnext).upper()
    return DECODE_OP.sub(decoded, text)


def original_byte_counts(sp, ids: list[int]) -> list[int]:
    """Per token of one case-encoded document, the UTF-8 bytes it stands for in the original text: 0 for an
    operator, the escaped character's for an escaped one, the dummy prefix's space not counted (as decode)."""
    counts, escaped = [], False
    for i, token in enumerate(ids):
        piece = sp.id_to_piece(token)
        operator = piece in CASE_OPERATORS and not escaped
        escaped = operator and piece == ESC
        text = piece.replace("\u2581", " ")
        if operator:
            counts.append(0)
        elif sp.is_byte(token):
            counts.append(1)
        else:
            counts.append(len(text.encode("utf-8")) - (i == 0 and text.startswith(" ")))
    return counts


def take_up_to(documents: list[Document], max_chars: int) -> list[Document]:
    # Skipping a document that does not fit (rather than stopping there) keeps one large early
    # file from leaving a split almost empty, and still never passes the cap.
    taken, total = [], 0
    for doc in documents:
        if total + len(doc.text) <= max_chars:
            taken.append(doc)
            total += len(doc.text)
    return taken


def tokenizer_sample(train: list[Document], max_chars: int) -> list[Document]:
    """Every k-th train document, k chosen so that about max_chars remain (all of them when max_chars is 0):
    a large corpus's tokenizer from a sample that spans all of its sources, not only its first paths."""
    total = sum(len(d.text) for d in train)
    if not max_chars or total <= max_chars:
        return train
    return take_up_to(train[::math.ceil(total / max_chars)], max_chars)


def split_documents(documents: list[Document], val_fraction: float, max_train_chars: int,
                    max_val_chars: int) -> tuple[list[Document], list[Document]]:
    """(train, val): disjoint, each in the order of `documents` and within its character cap."""
    val = [d for d in documents if is_val_document(d.relpath, val_fraction)]
    train = [d for d in documents if not is_val_document(d.relpath, val_fraction)]
    return take_up_to(train, max_train_chars), take_up_to(val, max_val_chars)


# -----------------------------------------------------------------------------
# TOKENIZER AND SHARDS
# -----------------------------------------------------------------------------


def train_tokenizer(train_texts: list[str], vocab_size: int, caseops: bool = False) -> bytes:
    """The serialized SentencePiece BPE model; the same texts and vocab_size give the same bytes. With caseops,
    each case operator is a piece of its own (ids 4-7), never merged with letters."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            # Whole documents as the trainer's "sentences": pieces then see the same text, newlines
            # included, that encode() will, and a dummy prefix only where a document starts.
            sentence_iterator=iter(train_texts),
            max_sentence_length=max(len(t.encode("utf-8")) for t in train_texts) + 1,
            input_sentence_size=0, shuffle_input_sentence=False,
            model_writer=model, model_type="bpe", vocab_size=vocab_size,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            # Rare characters fall back to their UTF-8 bytes instead of <unk>, so decode is exact.
            byte_fallback=True, character_coverage=0.9995, split_digits=True,
            # nmt_nfkc (the default) turns newlines and tabs into spaces and squeezes runs of spaces;
            # identity with no whitespace removal keeps code as it is, and whitespace-only pieces
            # let an indentation run be one token. Newlines may join pieces (":\n", "\n#").
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            # With the dummy prefix, decode drops exactly the space encode added, so a document that
            # starts with spaces comes back intact and train_gpt's byte count (no space counted
            # right after BOS) equals the decoded length.
            add_dummy_prefix=True, user_defined_symbols=list(CASE_OPERATORS) if caseops else [],
            num_threads=2, minloglevel=2)
    except RuntimeError as err:
        # sentencepiece's message ends with what the corpus allows (e.g. "set it to a value <= 418").
        reason = str(err).split("] ", 1)[-1]
        raise InputError(f"--vocab-size={vocab_size} does not fit these training documents: {reason}") from None
    return model.getvalue()


def encode_documents(sp, texts: list[str], caseops: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """One token stream: each document (case-encoded with caseops) as BOS then its tokens, in order (uint16);
    with caseops also each token's bytes of the original text (original_byte_counts; 0 for BOS), else None."""
    if not texts:
        return np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.uint16) if caseops else None
    encoded = sp.encode([case_encode(t) for t in texts] if caseops else texts, out_type=int, num_threads=2)
    tokens = np.concatenate([np.asarray([BOS_ID] + ids, dtype=np.uint16) for ids in encoded])
    if not caseops:
        return tokens, None
    return tokens, np.concatenate([np.asarray([0] + original_byte_counts(sp, ids), dtype=np.uint16) for ids in encoded])


def shard_path(out_dir: Path, split: str, index: int) -> Path:
    return out_dir / f"fineweb_{split}_{index:06d}.bin"


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Writes `tokens` (ids in 0..65535) as a FineWeb shard, atomically; train_gpt.load_shard reads it."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or (tokens.size and (tokens.min() < 0 or tokens.max() > 65535)):
        raise ShardError(f"{path}: shard tokens must be a 1-D array of ids in 0..65535")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    write_atomically(Path(path), header.tobytes() + tokens.astype("<u2").tobytes())


def write_split_shards(out_dir: Path, split: str, tokens: np.ndarray, shard_tokens: int) -> list[Path]:
    """Writes `tokens` as shards of at most shard_tokens each and removes the split's shards left from
    an earlier, longer build (train_gpt reads every fineweb_{split}_* file it finds)."""
    paths = []
    for index, start in enumerate(range(0, len(tokens), shard_tokens)):
        paths.append(shard_path(out_dir, split, index))
        write_shard(paths[-1], tokens[start:start + shard_tokens])
    for stale in sorted(out_dir.glob(f"fineweb_{split}_*.bin")):
        if stale not in paths:
            stale.unlink()
    return paths


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# MANIFEST: what was built, so that a repeat run can return at once
# -----------------------------------------------------------------------------


def outputs_complete(manifest_path: Path, settings: dict, tokenizer_path: Path) -> bool:
    """True when the manifest says a build with these settings finished and every file it lists is
    still there, whole: the tokenizer by its sha256, each shard by its size."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not manifest.get("complete") or manifest.get("settings") != settings:
            return False
        if hashlib.sha256(tokenizer_path.read_bytes()).hexdigest() != manifest["tokenizer_sha256"]:
            return False
        return all(shard_token_count(manifest_path.parent / name) == count
                   for name, count in manifest["shards"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def write_manifest(path: Path, settings: dict, complete: bool, **details) -> None:
    text = json.dumps({"complete": complete, "settings": settings, **details}, indent=1, sort_keys=True)
    write_atomically(path, (text + "\n").encode("utf-8"))


# -----------------------------------------------------------------------------
# MAIN
# -----------------------------------------------------------------------------


def caseops_twin(path: Path, caseops: bool) -> Path:
    """A default output's CaseOps name, so that the CaseOps sample sits beside the plain one, not over it."""
    return path.with_name(path.stem + "_caseops" + path.suffix) if caseops else path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-dir", type=Path, action="append", default=[],
                        help="folder of .txt/.py/.rst/.md files, one document each (repeatable)")
    parser.add_argument("--stdlib", action="store_true", help="also use the standard library with --text-dir")
    parser.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT}, with --caseops its _caseops twin")
    parser.add_argument("--tokenizer-out", type=Path, default=None)
    parser.add_argument("--caseops", action="store_true", help="case operators and a val byte sidecar (CaseOps)")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--val-fraction", type=float, default=0.03)
    parser.add_argument("--max-train-chars", type=int, default=6_000_000)
    parser.add_argument("--max-val-chars", type=int, default=400_000)
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    parser.add_argument("--tokenizer-train-chars", type=int, default=0,
                        help="train the tokenizer on an even sample of the train documents of about this many "
                             "characters (every k-th document; default 0: all of them)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the outputs exist")
    args = parser.parse_args(argv)
    for folder in args.text_dir:
        if not folder.is_dir():
            raise InputError(f"--text-dir={folder} is not an existing folder: give a folder holding "
                             f"{'/'.join(TEXT_SUFFIXES)} files")
    if not MIN_VOCAB_SIZE <= args.vocab_size <= MAX_VOCAB_SIZE:
        raise InputError(f"--vocab-size={args.vocab_size} is not allowed: use {MIN_VOCAB_SIZE}..{MAX_VOCAB_SIZE} "
                         f"(4 control pieces and 256 byte-fallback pieces come first; ids are uint16)")
    if not 0.0 < args.val_fraction < 1.0:
        raise InputError(f"--val-fraction={args.val_fraction} is not allowed: use a number strictly between 0 and 1")
    for name in ("max_train_chars", "max_val_chars", "shard_tokens", "tokenizer_train_chars"):
        if getattr(args, name) < (0 if name == "tokenizer_train_chars" else 1):
            raise InputError(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: use a positive integer")
    args.text_dir = [d.resolve() for d in args.text_dir]
    args.out = (args.out or caseops_twin(DEFAULT_OUT, args.caseops)).resolve()
    args.tokenizer_out = (args.tokenizer_out or caseops_twin(DEFAULT_TOKENIZER, args.caseops)).resolve()
    return args


def build_settings(args: argparse.Namespace) -> dict:
    """Everything the outputs depend on, as recorded in (and compared against) the manifest."""
    import sentencepiece as spm

    use_stdlib = args.stdlib or not args.text_dir
    return {"stdlib": sysconfig.get_paths()["stdlib"] if use_stdlib else None,
            "python": sys.version.split()[0] if use_stdlib else None,
            "text_dirs": [str(d) for d in args.text_dir], "vocab_size": args.vocab_size,
            "val_fraction": args.val_fraction, "max_train_chars": args.max_train_chars,
            "max_val_chars": args.max_val_chars, "shard_tokens": args.shard_tokens,
            **({"tokenizer_train_chars": args.tokenizer_train_chars} if args.tokenizer_train_chars else {}),
            "tokenizer": str(args.tokenizer_out), "sentencepiece": spm.__version__, "caseops": args.caseops}


def check_out_dir_is_ours(out_dir: Path, manifest_path: Path) -> None:
    # Stale shards are deleted on rebuild; without our manifest they may be someone's real data.
    if not manifest_path.exists() and any(out_dir.glob("fineweb_*.bin")):
        raise InputError(f"--out={out_dir} already holds fineweb_*.bin shards that this script did not write: "
                         "give an empty or new folder, or add --force to replace them")


def build(args: argparse.Namespace, settings: dict, manifest_path: Path) -> dict:
    """Collects, splits, tokenizes and writes everything; returns the summary numbers."""
    import sentencepiece as spm

    collected = collect_documents(args.text_dir, settings["stdlib"] is not None)
    if not collected.documents:
        sources = ([settings["stdlib"]] if settings["stdlib"] else []) + settings["text_dirs"]
        raise InputError(f"no documents found: {', '.join(sources)} hold no non-empty UTF-8 "
                         f"{'/'.join(TEXT_SUFFIXES)} files ({collected.not_utf8} not UTF-8)")
    train, val = split_documents(collected.documents, args.val_fraction, args.max_train_chars, args.max_val_chars)
    for split, docs, cap in (("train", train, "max_train_chars"), ("val", val, "max_val_chars")):
        if not docs:
            option = "--" + cap.replace("_", "-")
            raise InputError(f"the {split} split is empty: of {len(collected.documents)} documents none was hashed "
                             f"to {split} by --val-fraction={args.val_fraction} and fit under "
                             f"{option}={getattr(args, cap)}; change either, or add documents")
    model = train_tokenizer([case_encode(d.text) if args.caseops else d.text
                             for d in tokenizer_sample(train, args.tokenizer_train_chars)], args.vocab_size, args.caseops)
    args.out.mkdir(parents=True, exist_ok=True)
    args.tokenizer_out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest_path, settings, complete=False)
    write_atomically(args.tokenizer_out, model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    summary, shards = {}, {}
    for split, docs in (("train", train), ("val", val)):
        tokens, counts = encode_documents(sp, [d.text for d in docs], args.caseops)
        sidecar = split == "val" and args.caseops  # after the val shards: their stale pass takes old sidecars too
        for name, stream in (("val", tokens), ("val_bytes", counts)) if sidecar else ((split, tokens),):
            paths = write_split_shards(args.out, name, stream, args.shard_tokens)
            shards.update({p.name: min(args.shard_tokens, len(stream) - i * args.shard_tokens)
                           for i, p in enumerate(paths)})
        summary[split] = dict(docs=len(docs), chars=sum(len(d.text) for d in docs), tokens=len(tokens),
                              shards=len(paths), original_bytes=sum(len(d.text.encode("utf-8")) for d in docs))
    write_manifest(manifest_path, settings, complete=True, shards=shards, splits=summary,
                   tokenizer_sha256=hashlib.sha256(model).hexdigest(), tokenizer_vocab_size=sp.vocab_size())
    summary["skipped"] = dict(not_utf8=collected.not_utf8, empty=collected.empty, duplicate=collected.duplicate)
    return summary


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    try:
        args = parse_args(argv)
        settings = build_settings(args)
        manifest_path = args.out / MANIFEST_NAME
        if not args.force and outputs_complete(manifest_path, settings, args.tokenizer_out):
            print(f"sample_data exists out:{args.out} tokenizer:{args.tokenizer_out} (--force rebuilds)")
            return 0
        if not args.force:
            check_out_dir_is_ours(args.out, manifest_path)
        summary = build(args, settings, manifest_path)
    except InputError as err:
        print(f"make_sample_data.py: error: {err}", file=sys.stderr)
        return 2
    for split in ("train", "val"):
        print(f"sample_data split:{split} " + " ".join(f"{k}:{v}" for k, v in summary[split].items()))
    skipped = " ".join(f"skipped_{k}:{v}" for k, v in summary["skipped"].items())
    print(f"sample_data out:{args.out} tokenizer:{args.tokenizer_out} vocab_size:{args.vocab_size} {skipped} "
          f"time:{time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
