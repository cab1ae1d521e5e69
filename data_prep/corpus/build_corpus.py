"""Rebuild the built-in demo corpus from the shared data (see ATTRIBUTION.md).

Run from the repository root:  python data_prep/corpus/build_corpus.py DATA
(DATA: the shared data directory, outside the repository; nothing else reads it).

The output is deterministic (gzip with mtime 0 and no file name), so a rebuild is
byte-identical and git shows no change.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

BOOK_BYTES = 200_000
"""Per-book budget: whole paragraphs are taken until the excerpt reaches this many bytes."""
HERE = Path(__file__).resolve().parent


def excerpt(book: str, budget: int) -> str:
    """The first paragraphs of `book` (blank-line separated) up to about `budget` bytes."""
    taken: list[str] = []
    size = 0
    for paragraph in book.split("\n\n"):
        if size >= budget:
            break
        taken.append(paragraph)
        size += len(paragraph.encode("utf-8")) + 2
    return "\n\n".join(taken).strip("\n")


def main(data_dir: Path) -> None:
    """Write gutenberg_excerpt.txt.gz and akutagawa.txt next to this script."""
    raw = gzip.decompress((data_dir / "gutenberg-en" / "clean_all.txt.gz").read_bytes())
    books = raw.decode("utf-8").split("\n\f\n")
    text = "\n\f\n".join(excerpt(book, BOOK_BYTES) for book in books) + "\n"
    blob = gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)
    (HERE / "gutenberg_excerpt.txt.gz").write_bytes(blob)

    works = sorted((data_dir / "aozora-akutagawa" / "plain").glob("*.txt"))
    parts = [p.read_text(encoding="utf-8").strip("\n") for p in works]
    (HERE / "akutagawa.txt").write_text("\n\f\n".join(parts) + "\n", encoding="utf-8")
    print(f"{len(books)} books ({len(text.encode('utf-8'))} bytes), {len(works)} Aozora works")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python data_prep/corpus/build_corpus.py DATA (the shared data directory)")
    main(Path(sys.argv[1]))
