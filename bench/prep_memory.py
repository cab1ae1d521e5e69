"""Peak memory of `bert-prep encode` against corpus size (issue 3).

Run from the repository root (10-20 minutes on 2 CPU cores; needs ~2 GB free in /tmp):

    .venv/bin/python bench/prep_memory.py                      # ~55 MB and ~550 MB
    .venv/bin/python bench/prep_memory.py --sizes-mb 20 200    # quicker

Two corpora 10x apart are generated in /tmp (never in the repository) by repeating the shared
English (../shared/data/gutenberg-en/clean_all.txt.gz) and Japanese
(../shared/data/livedoor-news/articles.jsonl.gz) texts. Every paragraph of copy N gets the
marker "[N]" so that duplicate removal keeps all copies: the corpus really grows. Each size is
encoded with --workers 2 and --unit-bytes 16 MB for both sizes (the default 256 MB would make
the small corpus one unit), and the peak resident memory of the main process and of the
largest worker are read from the manifest (getrusage: the kernel's own high-water mark, so no
sampling can miss a peak).

Expected: flat in the corpus size, except the table of document hashes that removes
duplicates across units, 8 bytes per slot at a load between 1/3 and 2/3 (12-24 bytes per
kept document), held by the main process at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def base_paragraphs() -> list[str]:
    text = gzip.decompress((SHARED / "gutenberg-en" / "clean_all.txt.gz").read_bytes()).decode()
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text.replace("\f", "")) if p.strip()]
    with gzip.open(SHARED / "livedoor-news" / "articles.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            body = json.loads(line)["body"].strip()
            paragraphs.append(re.sub(r"\n\s*\n", "\n", body))
    return paragraphs


def generate(path: Path, target_bytes: int, paragraphs: list[str]) -> int:
    """Repeat the paragraphs, each copy marked, until the file holds target_bytes."""
    written = 0
    copy = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            chunk = "".join(f"[{copy}] {p}\n\n" for p in paragraphs)
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
            copy += 1
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs=2, default=[55, 550])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bert-prep-mem"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from data_prep.tokenizer import train_tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paragraphs = base_paragraphs()
    rows = []
    tok = work / "tok"
    for mb in args.sizes_mb:
        corpus = work / f"corpus_{mb}.txt"
        if not corpus.exists() or corpus.stat().st_size < mb * 1_000_000:
            log(f"generating {mb} MB")
            generate(corpus, mb * 1_000_000, paragraphs)
        if not (tok / "tokenizer.json").exists():
            log("training the tokenizer (WordPiece 30522 on a 20 MB sample)")
            train_tokenizer([corpus], tok, "wordpiece", 30522, sample_bytes=20_000_000)
        out = work / f"out_{mb}"
        shutil.rmtree(out, ignore_errors=True)
        log(f"encoding {mb} MB with {args.workers} workers")
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_prep",
                "encode",
                "--input",
                str(corpus),
                "--tokenizer",
                str(tok),
                "--out",
                str(out),
                "--workers",
                str(args.workers),
                "--unit-bytes",
                "16000000",
                "--log-every",
                "60",
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=True,
            cwd=REPO,
        )
        seconds = time.perf_counter() - start
        manifest = json.loads((out / "manifest.json").read_text())
        rss = manifest["run"]["peak_rss_mb"]
        rows.append((mb, corpus.stat().st_size, manifest, rss, seconds))
        shutil.rmtree(out, ignore_errors=True)
    print(
        "| corpus | documents kept | tokens | units | peak RSS main (MB) "
        "| peak RSS largest worker (MB) | time (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for _mb, size, manifest, rss, seconds in rows:
        print(
            f"| {size / 1e6:,.0f} MB | {manifest['num_documents']:,} | "
            f"{manifest['num_tokens']:,} | {manifest['plan']['units']} | {rss['main']:,.0f} | "
            f"{rss['workers']:,.0f} | {seconds:,.0f} |"
        )


if __name__ == "__main__":
    main()
