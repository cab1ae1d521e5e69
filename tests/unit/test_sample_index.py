"""The cached sample index and the table-free epoch shuffle (pretrain.sample_index).

Oracles: the greedy packing loop the trainer used before (kept here as the reference: the
vectorised build must give the same samples, bit for bit), a split built in memory (a cached
one must give the same samples), and the cache's key (a changed shard or sequence length must
be noticed and rebuilt, with one line).
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.blend import parse_data_path
from pretrain.config import MLMConfig
from pretrain.data import open_training_data
from pretrain.sample_index import Shuffle, pack_samples

REPO = Path(__file__).resolve().parents[2]


def _loop_packing(lengths, doc_start, budget, pairs):
    """The packing loop of pretrain/data.py before the vectorised build (the reference)."""
    starts = []
    start, used = 0, 0
    for i in range(len(lengths)):
        length = min(int(lengths[i]), budget)
        boundary = bool(doc_start[i]) and i > start
        if i > start and (used + length + boundary > budget or (pairs and boundary)):
            starts.append(start)
            start, used = i, length
        else:
            used += length + boundary
    starts.append(start)
    bounds = np.array(starts + [len(lengths)], dtype=np.int64)
    return np.stack([bounds[:-1], bounds[1:]], axis=1)


def test_vectorised_packing_equals_the_loop():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 300))
        lengths = rng.integers(0, 80, n)  # some longer than the budget, some empty
        doc_start = rng.random(n) < rng.random()
        doc_start[0] = True
        budget = int(rng.integers(1, 70))
        for pairs in (False, True):
            expected = _loop_packing(lengths, doc_start, budget, pairs)
            np.testing.assert_array_equal(pack_samples(lengths, doc_start, budget, pairs), expected)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_shuffle_is_a_permutation_that_changes_with_epoch_and_seed(n):
    orders = [Shuffle(n, seed, epoch)(np.arange(n)) for seed, epoch in ((1, 0), (1, 1), (2, 0))]
    for order in orders:
        assert sorted(order.tolist()) == list(range(n))
    if n >= 17:
        assert not np.array_equal(orders[0], orders[1])
        assert not np.array_equal(orders[0], orders[2])
        # Shuffled, not shifted: about 1/n of the positions stay where they were.
        assert (orders[0] == np.arange(n)).mean() < 0.2
    np.testing.assert_array_equal(Shuffle(n, 1, 0)(np.arange(n)[::-1]), orders[0][::-1])


def _open(path, cache, lines, seq_len=64, seed=5, mlm=None):
    return open_training_data(
        parse_data_path(str(path)),
        None,
        seq_len,
        0.05,
        mlm or MLMConfig(),
        seed,
        cache_dir=cache,
        say=lines.append,
    )


def _samples(data, count=40):
    return [data.train[i]["input_ids"].tolist() for i in range(count)]


def test_cached_index_gives_the_samples_of_a_rebuilt_one(small_dataset, tmp_path):
    lines = []
    built = _open(small_dataset, None, lines)
    first = _open(small_dataset, tmp_path / "index", lines)
    assert len(lines) == 2 and all("none cached" in line for line in lines), lines
    again = _open(small_dataset, tmp_path / "index", lines)
    assert len(lines) == 2  # loaded, not rebuilt
    assert isinstance(again.train.split.samples, np.memmap)
    for data in (first, again):
        for name in ("sentences", "doc_start", "samples"):
            np.testing.assert_array_equal(
                getattr(data.train.split, name), getattr(built.train.split, name)
            )
        assert _samples(data) == _samples(built)
    # Data-loader workers receive the cache's directory, not a copy of the arrays.
    shipped = pickle.dumps(again.train.split)
    assert len(shipped) < 1000
    np.testing.assert_array_equal(pickle.loads(shipped).samples, built.train.split.samples)


def test_stale_cache_is_rebuilt_with_one_line(small_dataset, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(small_dataset, data_dir)
    cache = tmp_path / "index"
    lines = []
    _open(data_dir, cache, lines)
    lines.clear()

    shorter = _open(data_dir, cache, lines, seq_len=48)
    assert len(lines) == 2 and all("stale: seq_len 64 -> 48" in line for line in lines), lines
    rebuilt = _open(data_dir, None, [], seq_len=48)
    np.testing.assert_array_equal(shorter.train.split.samples, rebuilt.train.split.samples)
    lines.clear()

    # A shard rewritten behind the manifest's back (same size, new contents): noticed by its
    # modification time, without hashing the shard.
    shard = sorted(data_dir.glob("*.bin"))[0]
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    _open(data_dir, cache, lines, seq_len=48)
    assert len(lines) == 2 and all("stale: shards changed" in line for line in lines), lines
    lines.clear()

    # The seed is not part of the index (the shuffle is keyed, not cached): no rebuild, but
    # another order.
    other_seed = _open(data_dir, cache, lines, seq_len=48, seed=6)
    assert lines == []
    assert _samples(other_seed) != _samples(shorter)


def test_a_cache_cut_by_a_full_disk_is_not_used(tmp_path):
    """Oracle: the kernel refuses writes past RLIMIT_FSIZE (EFBIG, as ENOSPC on a full disk),
    here 500 bytes, below each 608-byte array file. np.save dropped that failure for arrays
    this small: the cut cache was renamed into place and mapping it raised ValueError (a
    traceback in bert-train). Now the index is kept in memory with one warning line."""
    code = (
        "import resource, signal; from pathlib import Path; import numpy as np; "
        "from pretrain.sample_index import Split, load_or_build; "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (500, 500)); "
        "split = Split(np.arange(60), np.ones(60, dtype=bool), np.arange(60).reshape(30, 2)); "
        f"got = load_or_build(Path({str(tmp_path / 'index')!r}), {{'k': 1}}, lambda: split, "
        "print); print('samples', np.array_equal(got.samples, split.samples), got.cached)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("warning: sample index not cached") and "too large" in lines[0]
    assert lines[1:] == ["samples True None"]
    assert not list(tmp_path.rglob("*.npy"))
