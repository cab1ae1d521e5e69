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
import shutil
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
    args = [
        "encode",
        "--input",
        big,
        "--tokenizer",
        tok,
        "--out",
        tmp_path / "out",
        "--unit-bytes",
        "60000",
        "--shard-tokens",
        "20000",
    ]
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


@pytest.fixture(scope="module")
def big(corpus, tmp_path_factory) -> tuple[Path, list, Path]:
    """A 1.5 MB corpus (25 units of 60 KB), the encode arguments for it without --out, and
    the uninterrupted run of those arguments (the oracle of the kill tests)."""
    _, tok, _ = corpus
    tmp = tmp_path_factory.mktemp("big")
    (tmp / "in").mkdir()
    text = gzip.decompress((CORPUS_DIR / "gutenberg_excerpt.txt.gz").read_bytes()).decode()
    (tmp / "in" / "corpus.txt").write_text(text[:1_500_000])
    args = [
        "encode",
        "--input",
        tmp / "in",
        "--tokenizer",
        tok,
        "--unit-bytes",
        "60000",
        "--shard-tokens",
        "20000",
    ]
    encode_corpus([tmp / "in"], tok, tmp / "fresh", unit_bytes=60000, shard_tokens=20000)
    return tmp / "in", args, tmp / "fresh"


def _wait_for_records(run: subprocess.Popen, units: Path, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        if units.is_dir() and len(list(units.glob("*.json"))) >= count:
            return
        time.sleep(0.02)
    assert run.poll() is None, "the run finished before it could be stopped; use a bigger input"
    raise AssertionError(f"no {count} unit records in {units} after 120 s")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper that may never come)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_kill_9_with_workers_then_an_immediate_rerun(big, tmp_path: Path) -> None:
    """Oracle: the uninterrupted run. A `--workers 2` run with 5 units of a few seconds each
    is SIGKILLed mid-way and the rerun starts at once. The killed run's pool workers must be gone
    within 0.3 s (before the fix they went on encoding their units into --out, racing the
    rerun, which then failed most of the time); the rerun gives the uninterrupted bytes."""
    inputs, args, _ = big
    assert args[-4] == "--unit-bytes"
    args = [*args[:-3], "300000", *args[-2:]]
    tok = args[args.index("--tokenizer") + 1]
    fresh = tmp_path / "fresh"
    encode_corpus([inputs], tok, fresh, unit_bytes=300000, shard_tokens=20000)
    out = tmp_path / "out"
    run = _prep(*args, "--out", out, "--workers", "2")
    # The two workers finish units 0 and 1 together; 0.5 s later both are early in the next.
    _wait_for_records(run, out / ".prep" / "units", 2)
    time.sleep(0.5)
    workers = _children(run.pid)
    assert len(workers) >= 2, workers  # the pool (and multiprocessing's resource tracker)
    run.send_signal(signal.SIGKILL)
    run.wait()  # not communicate(): it would wait for the workers, which share its pipes
    again = _prep(*args, "--out", out, "--workers", "2")
    time.sleep(0.3)
    survivors = [pid for pid in workers if _alive(pid)]
    run.communicate()
    stdout, stderr = again.communicate(timeout=600)
    assert not survivors, f"workers of the killed run still running: {survivors}"
    assert again.returncode == 0, stderr
    assert "resuming:" in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert without_run(manifest) == without_run(json.loads((fresh / "manifest.json").read_text()))
    assert shard_bytes(out) == shard_bytes(fresh)
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_runs(big, tmp_path: Path) -> None:
    """Oracle: the issue's rule, one writer per dataset: the same command on the same --out
    while the first runs ends at once with one line naming the holder (exit 2) and leaves the
    first run to finish with the uninterrupted bytes."""
    inputs, args, fresh = big
    out = tmp_path / "out"
    first = _prep(*args, "--out", out)
    _wait_for_records(first, out / ".prep" / "units", 1)
    second = _prep(*args, "--out", out)
    _, err = second.communicate(timeout=120)
    assert first.poll() is None, "the first run ended before the second was refused"
    assert second.returncode == 2, err
    assert err.strip().splitlines() == [
        f"bert-prep: error: {out} is being written by another bert-prep (pid {first.pid} on "
        f"{os.uname().nodename}); wait for it to end, or stop it, then run this command again"
    ]
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert shard_bytes(out) == shard_bytes(fresh)


@pytest.mark.slow
def test_a_killed_overwrite_keeps_the_old_dataset_and_resumes(big, tmp_path: Path) -> None:
    """Oracle: the old dataset's files and an uninterrupted run of the new command. An
    --overwrite run with other settings is SIGKILLed mid-way: the old dataset is untouched and
    still verifies; the same command then redoes only the unfinished units and leaves exactly
    the new command's dataset, with no staging directory."""
    inputs, args, fresh = big
    out = tmp_path / "out"
    shutil.copytree(fresh, out)
    old = (shard_bytes(out), (out / "manifest.json").read_bytes())
    assert args[-2] == "--shard-tokens"
    new_args = [*args[:-1], "30000", "--out", out, "--overwrite"]
    run = _prep(*new_args)
    _wait_for_records(run, tmp_path / "out.new" / ".prep" / "units", 3)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    assert (shard_bytes(out), (out / "manifest.json").read_bytes()) == old
    assert verify(out) == []

    again = _prep(*new_args)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert "resuming:" in err
    tok = args[args.index("--tokenizer") + 1]
    want = encode_corpus([inputs], tok, tmp_path / "want", unit_bytes=60000, shard_tokens=30000)
    assert without_run(json.loads((out / "manifest.json").read_text())) == without_run(want)
    assert shard_bytes(out) == shard_bytes(tmp_path / "want")
    assert not (tmp_path / "out.new").exists()


def test_disk_full_is_one_line_and_leaves_nothing_half_written(corpus, tmp_path: Path) -> None:
    """Oracle: a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored, so write() fails with EFBIG
    as on a full disk) below the size of one shard: exit 2, one line naming the file being
    written, no temporary file and no manifest left behind."""
    import resource

    inputs, tok, _ = corpus
    out = tmp_path / "out"

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    run = _prep(
        "encode", "--input", inputs, "--tokenizer", tok, "--out", out, preexec_fn=limit_file_size
    )
    _, err = run.communicate(timeout=300)
    assert run.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"bert-prep: error: {out}/shard_00000_0000.bin.tmp: File too large")
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()
