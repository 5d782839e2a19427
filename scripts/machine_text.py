"""machine_text.py: the prose already on a Debian machine, as .txt documents for make_sample_data.py --text-dir.

    python3 scripts/machine_text.py OUT    # then: make_sample_data.py --text-dir OUT ...

No network. Three sources, each a folder under OUT:
- doc/: /usr/share/doc's .md/.txt/.rst files (not its HTML, which repeats them; but the Python
  documentation's reStructuredText under html/_sources) and its gzip'd text (changelogs, NEWS; not
  .tar.gz, .log.gz or .json.gz: archives, test logs and machine-made copies of the docs).
- man/: English man pages (/usr/share/man/man*/), their roff requests and escapes stripped; not the
  generated gcloud_* pages (16,000 near-copies of one template) nor `.so` redirects.
- rust/: the Rust books' HTML pages (the book, the reference, the nomicon, ...; not print.html, which
  repeats each book whole) as text, without their navigation; not the generated API pages.
Documents under 200 characters are dropped, and so is any document whose first 3,000 characters equal an
earlier one's (the same changelog shipped by several packages of one source): repeated text would flatter
the n-gram tables this corpus measures. Prints the characters kept per source.
"""
from __future__ import annotations

import gzip
import hashlib
import html.parser
import os
import re
import sys
from pathlib import Path

DOC, MAN = Path("/usr/share/doc"), Path("/usr/share/man")
RUST = Path.home() / ".rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html"
RUST_BOOKS = ("book", "reference", "nomicon", "rust-by-example", "cargo", "edition-guide", "embedded-book",
              "rustc", "rustdoc", "clippy", "error_codes", "style-guide", "unstable-book")
MIN_CHARS, HEAD_CHARS = 200, 3000


class HtmlText(html.parser.HTMLParser):
    """The text of a page, without scripts, styles and navigation; block tags start lines."""
    SKIP = {"script", "style", "nav", "head", "noscript"}
    BLOCKS = {"p", "br", "li", "h1", "h2", "h3", "h4", "pre", "tr", "div"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_text(raw: str) -> str:
    parser = HtmlText()
    parser.feed(raw)
    return re.sub(r"\n\s*\n+", "\n\n", "".join(parser.parts))


def man_text(raw: str) -> str:
    """A man page's words: request lines dropped but for the text of headings and font macros, escapes out."""
    out = []
    for line in raw.splitlines():
        if line.startswith(('.\\"', "'\\\"", ".\\}")):
            continue
        if line.startswith((".", "'")):
            macro = re.match(r"[.'](SH|SS|B|I|BI|BR|IR|RB|RI|IB|TP|IP|Nm|Nd|Sh|Ss|Fl|Ar|It)\s+(.*)", line)
            if not macro:
                continue
            line = macro.group(2).replace('"', "")
        line = re.sub(r"\\f[BIRPC]|\\f\(..|\\f\[[^]]*\]|\\&|\\c", "", line)
        line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ")
        out.append(re.sub(r"\\\(..|\\\[[^]]*\]|\\\*.", "", line))
    return "\n".join(out)


def documents():
    """(source, relative path, text) of every candidate, in a fixed order."""
    for path in sorted(DOC.rglob("*")):
        rel = path.relative_to(DOC).as_posix()
        if not path.is_file() or path.is_symlink():
            continue
        try:
            if "/_sources/" in rel or (path.suffix in (".md", ".txt", ".rst") and "/html/" not in rel):
                yield "doc", rel, path.read_bytes().decode("utf-8")
            elif path.suffix == ".gz" and not rel.endswith((".tar.gz", ".log.gz", ".json.gz", ".html.gz",
                                                            ".pdf.gz", ".ps.gz")):
                yield "doc", rel, gzip.decompress(path.read_bytes()).decode("utf-8")
        except (UnicodeDecodeError, OSError, EOFError):
            continue
    for path in sorted(MAN.glob("man*/*.gz")):
        if path.name.startswith("gcloud") or path.is_symlink():
            continue
        try:
            raw = gzip.decompress(path.read_bytes()).decode("utf-8")
        except (UnicodeDecodeError, OSError, EOFError):
            continue
        if not raw.startswith(".so "):
            yield "man", path.relative_to(MAN).as_posix(), man_text(raw)
    for book in RUST_BOOKS:
        for path in sorted((RUST / book).rglob("*.html")):
            if path.name in ("print.html", "404.html", "toc.html") or path.is_symlink():
                continue
            try:
                yield "rust", path.relative_to(RUST).as_posix(), html_text(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue


def drop_near_copies(out: Path) -> None:
    """Deletes each document whose first HEAD_CHARS equal an earlier one's, folders in sorted order."""
    heads = set()
    for folder, _, files in sorted(os.walk(out)):
        for name in sorted(files):
            path = Path(folder) / name
            head = hashlib.sha256(path.read_text(encoding="utf-8")[:HEAD_CHARS].encode("utf-8")).digest()
            if head in heads:
                path.unlink()
            heads.add(head)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: machine_text.py OUT", file=sys.stderr)
        return 2
    out = Path(argv[0])
    for source, rel, text in documents():
        text = text.strip()
        if len(text) >= MIN_CHARS:
            path = out / source / (rel + ".txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")
    drop_near_copies(out)
    kept = {d.name: sum(len(f.read_text(encoding="utf-8")) for f in d.rglob("*.txt")) for d in sorted(out.iterdir())}
    print("machine_text " + " ".join(f"{k}_chars:{v}" for k, v in kept.items()) + f" out:{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
