"""Encode throughput of `bert-prep encode` against the bare tokenizer (issue 3).

Run from the repository root (5-10 minutes on 2 CPU cores):

    .venv/bin/python bench/prep_throughput.py                 # English and Japanese
    .venv/bin/python bench/prep_throughput.py --rounds 1      # quicker, noisier

The reference, measured in the same run on the same text, is Hugging Face `tokenizers`'
`encode_batch` on one thread (RAYON_NUM_THREADS=1, in its own process): the text's non-empty
lines in batches of ~1 MB, timed around the encode calls only. That is the tokenizer-bound
limit of one core; everything `bert-prep` adds (reading, cleaning, hashing for duplicates,
sentence splitting, writing shards) has to fit in the difference.

`bert-prep encode` runs as the real command with --workers 1 and 2 (one tokenizer thread per
process, like the reference), and its fixed start-up cost (interpreter, imports, tokenizer
load, spawning the pool) is measured by the same command on a 3 KB input cut into two units
(so the pool starts) and subtracted:
throughput = (text bytes) / (time - start-up time). The text is uncompressed in /tmp so that
it splits into 1 MB work units that the workers share.

Two clocks: CPU seconds (getrusage of the command and its workers; the reference's own
process_time) give the per-core efficiency however loaded the machine is; wall seconds give
the 1 → 2 worker speed-up, which only means something when 2 cores are free (the load average
during the run is printed beside it).

Corpora: ../shared/data/gutenberg-en/clean_all.txt.gz (English, WordPiece 30522, uncased),
../shared/data/livedoor-news/articles.jsonl.gz bodies (Japanese, SentencePiece unigram 32000).
The machine has 2 cores shared with other jobs; rounds are interleaved and the median is
reported. Results go to stdout as a markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

BARE = r"""
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
lines = [l for l in open(sys.argv[2], encoding="utf-8").read().split("\n") if l.strip()]
batches, batch, size = [], [], 0
for line in lines:
    batch.append(line); size += len(line)
    if size >= 1_000_000:
        batches.append(batch); batch, size = [], 0
batches.append(batch)
start, cpu = time.perf_counter(), time.process_time()
tokens = 0
for b in batches:
    tokens += sum(len(e.ids) for e in tok.encode_batch(b, add_special_tokens=False))
print(json.dumps({"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                  "tokens": tokens}))
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prepare(work: Path) -> dict[str, dict]:
    """Plain-text corpora (documents separated by blank lines) and their tokenizers."""
    from data_prep.tokenizer import train_tokenizer

    corpora = {}
    en = work / "en.txt"
    if not en.exists():
        text = gzip.decompress((SHARED / "gutenberg-en" / "clean_all.txt.gz").read_bytes())
        en.write_bytes(text.decode("utf-8").replace("\f", "").encode("utf-8"))
    ja = work / "ja.txt"
    if not ja.exists():
        with gzip.open(SHARED / "livedoor-news" / "articles.jsonl.gz", "rt", encoding="utf-8") as f:
            bodies = [json.loads(line)["body"] for line in f if line.strip()]
        # One document per article: blank lines inside a body would split it.
        ja.write_text("\n\n".join(re.sub(r"\n\s*\n", "\n", b.strip()) for b in bodies) + "\n")
    for lang, path, kind, vocab in (
        ("en", en, "wordpiece", 30522),
        ("ja", ja, "sentencepiece", 32000),
    ):
        tok = work / f"tok_{lang}"
        if not (tok / "tokenizer.json").exists():
            log(f"training the {lang} tokenizer ({kind}, {vocab})")
            train_tokenizer([path], tok, kind, vocab, lang=lang, sample_bytes=20_000_000)
        tiny = work / f"tiny_{lang}.txt"
        tiny.write_text(path.read_text(encoding="utf-8")[:3000], encoding="utf-8")
        corpora[lang] = {"text": path, "tiny": tiny, "tok": tok}
    return corpora


def bare(tok: Path, text: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of the encode_batch calls alone."""
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run(
        [sys.executable, "-c", BARE, str(tok / "tokenizer.json"), str(text)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    return result["seconds"], result["cpu"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ours(
    tok: Path, text: Path, out: Path, workers: int, lang: str, unit_bytes: int = 1_000_000
) -> tuple[float, float, dict]:
    """(wall, CPU) seconds of the whole `bert-prep encode` command (CPU summed over the main
    process and its workers, from getrusage) and its manifest."""
    # One tokenizer thread per process, as in the reference: "per worker" means per core.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAYON_NUM_THREADS": "1"}
    args = [
        sys.executable,
        "-m",
        "data_prep",
        "encode",
        "--input",
        str(text),
        "--tokenizer",
        str(tok),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--lang",
        lang,
        "--unit-bytes",
        str(unit_bytes),
        "--log-every",
        "1000",
    ]
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(args, env=env, capture_output=True, text=True, check=True, cwd=REPO)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
    return seconds, cpu, json.loads((out / "manifest.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bert-prep-bench"))
    parser.add_argument("--langs", nargs="+", default=["en", "ja"])
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpora = prepare(work)
    rows = []
    for lang in args.langs:
        c = corpora[lang]
        size = c["text"].stat().st_size
        keys = ("bare", "w1", "w2", "s1", "s2")
        wall: dict[str, list[float]] = {k: [] for k in keys}
        cpu: dict[str, list[float]] = {k: [] for k in keys}
        manifest = {}
        loads = []
        for r in range(args.rounds):
            log(f"{lang}: round {r + 1}/{args.rounds}")
            seconds, cpu_s = bare(c["tok"], c["text"])
            wall["bare"].append(seconds)
            cpu["bare"].append(cpu_s)
            for w in (1, 2):
                # Two units, so that the start-up of --workers 2 includes spawning the pool.
                seconds, cpu_s, _ = ours(c["tok"], c["tiny"], work / "out_tiny", w, lang, 1500)
                wall[f"s{w}"].append(seconds)
                cpu[f"s{w}"].append(cpu_s)
                seconds, cpu_s, manifest = ours(c["tok"], c["text"], work / f"out_{w}", w, lang)
                wall[f"w{w}"].append(seconds)
                cpu[f"w{w}"].append(cpu_s)
            loads.append(os.getloadavg()[0])
        wm = {k: statistics.median(v) for k, v in wall.items()}
        cm = {k: statistics.median(v) for k, v in cpu.items()}
        rows.append(
            {
                "lang": lang,
                "mb": size / 1e6,
                "tokens": manifest["num_tokens"],
                "limit_wall": size / wm["bare"] / 1e6,
                "limit_cpu": size / cm["bare"] / 1e6,
                "wall": {w: size / (wm[f"w{w}"] - wm[f"s{w}"]) / 1e6 for w in (1, 2)},
                "cpu": {w: size / (cm[f"w{w}"] - cm[f"s{w}"]) / 1e6 for w in (1, 2)},
                "startup": (wm["s1"], wm["s2"]),
                "units": manifest["plan"]["units"],
                "load": statistics.median(loads),
                "spread": {k: (max(v) - min(v)) / statistics.median(v) for k, v in wall.items()},
            }
        )
    print("Per core (CPU seconds: immune to other jobs taking the cores)")
    print()
    print(
        "| corpus | text MB | tokens | bare encode_batch (MB per CPU-s) "
        "| ours, 1 worker | % of limit | ours, 2 workers | % of limit |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        c1, c2, lim = row["cpu"][1], row["cpu"][2], row["limit_cpu"]
        print(
            f"| {row['lang']} | {row['mb']:.1f} | {row['tokens']:,} | {lim:.2f} | {c1:.2f} | "
            f"{100 * c1 / lim:.0f}% | {c2:.2f} | {100 * c2 / lim:.0f}% |"
        )
    print()
    print("Wall clock (what a user waits; depends on what else runs on the 2 cores)")
    print()
    print(
        "| corpus | bare, 1 thread (MB/s) | ours 1 worker (MB/s) | ours 2 workers (MB/s) "
        "| 2 vs 1 worker | start-up 1 / 2 workers (s) | load average |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        w1, w2 = row["wall"][1], row["wall"][2]
        print(
            f"| {row['lang']} | {row['limit_wall']:.2f} | {w1:.2f} | {w2:.2f} | {w2 / w1:.2f}x | "
            f"{row['startup'][0]:.1f} / {row['startup'][1]:.1f} | {row['load']:.1f} |"
        )
    print()
    for row in rows:
        spread = ", ".join(f"{k} {v:.0%}" for k, v in row["spread"].items())
        print(
            f"{row['lang']}: {row['units']} units of 1 MB; wall-time spread over rounds: {spread}"
        )


if __name__ == "__main__":
    main()
