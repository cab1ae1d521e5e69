"""`bert-prep encode` split every way the issue allows gives the same bytes, and resumes.

The oracle throughout is one process encoding the whole corpus: `--workers 2`, array-job
pieces joined by `bert-prep merge`, and a run killed with SIGKILL and restarted must all leave
shard files with the same names and bytes, and manifests that differ only under "run".
(Ranks under mpirun/srun: tests/distributed/test_prep_ranks.py.)
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.encode import encode_corpus, unit_done
from data_prep.errors import PrepError
from data_prep.merge import merge_datasets
from data_prep.shard_format import verify
from data_prep.sources import CORPUS_DIR
from data_prep.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[2]
OPTIONS = {"unit_bytes": 50_000, "shard_tokens": 6000}


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard_*"))}


def without_run(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "run"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Three files (~330 KB): plain text split into ranges, a .gz, and a file whose paragraphs
    repeat the first one's (duplicates across units); a tokenizer; the one-process run."""
    tmp = tmp_path_factory.mktemp("parallel")
    text = gzip.decompress((CORPUS_DIR / "gutenberg_excerpt.txt.gz").read_bytes()).decode()
    (tmp / "in").mkdir()
    (tmp / "in" / "a.txt").write_text(text[:200_000])
    (tmp / "in" / "b.txt.gz").write_bytes(gzip.compress(text[200_000:280_000].encode()))
    (tmp / "in" / "c.txt").write_text(text[50_000:100_000])
    tok = train_tokenizer([tmp / "in"], tmp / "tok", "wordpiece", 1000)
    encode_corpus([tmp / "in"], tok, tmp / "one", **OPTIONS)
    return tmp / "in", tok, tmp / "one"


def test_workers_and_pieces_give_the_same_dataset(corpus, tmp_path: Path) -> None:
    """Oracle: the one-process run. Also checks that the corpus really exercises the cases:
    several units, a file split into ranges, duplicates removed across units."""
    inputs, tok, one = corpus
    single = json.loads((one / "manifest.json").read_text())
    assert single["plan"]["units"] >= 6
    assert single["stats"]["dropped"]["duplicate"] > 100
    assert verify(one) == []

    two = encode_corpus([inputs], tok, tmp_path / "two", workers=2, **OPTIONS)
    assert without_run(two) == without_run(single)
    assert shard_bytes(tmp_path / "two") == shard_bytes(one)

    pieces = [tmp_path / f"piece{i}" for i in range(3)]
    for i, piece in enumerate(pieces):
        encode_corpus([inputs], tok, piece, num_shards=3, shard_index=i, **OPTIONS)
    merged = merge_datasets(pieces, tmp_path / "merged")
    assert without_run(merged) == without_run(single)
    assert shard_bytes(tmp_path / "merged") == shard_bytes(one)
    assert verify(tmp_path / "merged") == []

    with pytest.raises(PrepError, match="do not cover units"):
        merge_datasets(pieces[:2], tmp_path / "incomplete")
    other = tmp_path / "other"
    encode_corpus([inputs], tok, other, num_shards=3, shard_index=2, unit_bytes=60_000)
    with pytest.raises(PrepError, match="different inputs or settings"):
        merge_datasets([*pieces[:2], other], tmp_path / "mixed")


def _prep(*args, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "data_prep", *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped(corpus, tmp_path: Path) -> None:
    """Oracle: the uninterrupted run. The run is SIGKILLed once a few units are recorded; the
    same command then reports the finished units as done, does not encode them again, and
    ends with the same shard bytes and manifest."""
    _, tok, _ = corpus
    big = tmp_path / "big"
    big.mkdir()
    text = gzip.decompress((CORPUS_DIR / "gutenberg_excerpt.txt.gz").read_bytes()).decode()
    (big / "corpus.txt").write_text(text[:1_500_000])
    args = ["encode", "--input", big, "--tokenizer", tok, "--out", tmp_path / "out",
            "--unit-bytes", "60000", "--shard-tokens", "20000"]  # fmt: skip
    units = tmp_path / "out" / ".prep" / "units"
    run = _prep(*args)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and run.poll() is None:
        if units.is_dir() and len(list(units.glob("*.json"))) >= 3:
            break
        time.sleep(0.02)
    assert run.poll() is None, "the run finished before it could be killed; use a bigger input"
    run.send_signal(signal.SIGKILL)
    run.communicate()
    assert not (tmp_path / "out" / "manifest.json").exists()
    # The hash file of a unit is written when it is encoded and never after (the record is
    # updated again when duplicates across units are removed at the end).
    hashes = tmp_path / "out" / ".prep" / "hashes"
    fp = json.loads(next(units.glob("*.json")).read_text())["fingerprint"]
    done = {f"unit_{u:05d}" for u in range(100) if unit_done(tmp_path / "out", u, fp)}
    before = {p.name: p.stat().st_mtime_ns for p in hashes.glob("*.npy") if p.stem in done}

    again = _prep(*args)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    n_units = json.loads((tmp_path / "out" / "manifest.json").read_text())["plan"]["units"]
    assert 3 <= len(before) < n_units
    assert f"resuming: {len(before)} of {n_units} unit(s) already done" in stderr
    for name, mtime in before.items():
        assert (hashes / name).stat().st_mtime_ns == mtime, f"{name} was redone"
    fresh = encode_corpus([big], tok, tmp_path / "fresh", unit_bytes=60000, shard_tokens=20000)
    resumed = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert without_run(resumed) == without_run(fresh)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "fresh")
    assert not list((tmp_path / "out").glob("*.tmp"))
