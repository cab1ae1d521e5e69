"""The sample index of a split, built once and memory-mapped, and the per-epoch shuffle.

A split's index is three arrays: the split's sentences in order (global ids), which of them
starts a document, and the (start, end) sentence range of every sample (greedy packing of whole
sentences into `seq_len`, pretrain.data). It is built with numpy, with no Python loop over
sentences:

- `next_start[s]`, the start of the sample after one starting at sentence s, is one
  `searchsorted` over the prefix sums of the sentence costs for all s at once;
- the samples are the chain 0 → next_start[0] → ..., followed with one list look-up per
  sample (a sample holds several sentences, and the old loop did far more per sentence).

`load_or_build` caches the arrays as `.npy` files in a directory (the run's
`OUT_DIR/sample_index/`) with `index.json`, the key they were built from: the dataset's
manifest entries, each shard file's size and modification time, the document rule and the
packing settings. Every rank and data-loader worker memory-maps them. A cache whose key differs
is rebuilt with one line saying what changed, never used; a cache is written to a unique
temporary directory and renamed into place, so concurrent builders never see half a cache.

The shuffle needs no table: epoch e's order is a keyed Feistel permutation of [0, n) (`Shuffle`),
computed per position in O(1) time and memory, the same on every rank and worker, instead of a
fresh `rng.permutation(n)` (8 bytes per sample) per worker per epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.shard_format import IndexedDataset, save_npy

INDEX_VERSION = 1
ARRAYS = ("sentences", "doc_start", "samples")
_WALK_BLOCK = 1 << 20  # sentences of next_start held as a Python list at a time


@dataclass
class Split:
    """The sentences of one split, in order, and where its samples start and end."""

    sentences: np.ndarray  # [n_sentences] int64 global sentence ids
    doc_start: np.ndarray  # [n_sentences] bool, first sentence of a document
    samples: np.ndarray  # [n_samples, 2] int64 (start, end) into `sentences`
    cached: Path | None = None  # the directory the arrays are memory-mapped from, if any

    def __getstate__(self) -> dict[str, Any]:
        """Data-loader workers re-open a cached index instead of receiving a copy of it."""
        if self.cached is None:
            return dict(self.__dict__)
        return {"cached": self.cached}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if set(state) == {"cached"}:
            state = dict(_map_arrays(state["cached"]), cached=state["cached"])
        self.__dict__.update(state)


def split_sentences(dataset: IndexedDataset, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The global sentence ids of documents `docs` in order, and which start a document."""
    offsets = dataset.document_sentence_offsets()
    docs = np.asarray(docs, dtype=np.int64)
    counts = offsets[docs + 1] - offsets[docs]
    total = int(counts.sum())
    first = np.cumsum(counts) - counts  # where each document begins within the split
    sentences = np.arange(total, dtype=np.int64) + np.repeat(offsets[docs] - first, counts)
    doc_start = np.zeros(total, dtype=bool)
    doc_start[first[counts > 0]] = True
    return sentences, doc_start


def pack_samples(
    lengths: np.ndarray, doc_start: np.ndarray, budget: int, pairs: bool
) -> np.ndarray:
    """[n_samples, 2] (start, end) ranges: greedy packing of whole sentences into `budget`
    tokens. A sentence longer than the budget counts as the budget (it is cut when read);
    packed samples may cross a document boundary, paying one [SEP] for it; pairs never do."""
    n = len(lengths)
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    boundary = doc_start.astype(np.int64)
    cost = np.minimum(lengths.astype(np.int64), budget) + boundary
    prefix = np.concatenate([[0], np.cumsum(cost)])
    # A sample starting at s holds sentence i > s while prefix[i+1] - prefix[s] - boundary[s]
    # <= budget (s's own boundary is not paid); it ends before the first i that does not fit.
    limit = prefix[:-1] + boundary + budget
    next_start = np.searchsorted(prefix, limit, side="right") - 1
    if pairs:
        doc_first = np.flatnonzero(doc_start)
        after = np.searchsorted(doc_first, np.arange(n), side="right")
        next_doc = np.append(doc_first, n)[after]
        next_start = np.minimum(next_start, next_doc)
    next_start = np.minimum(next_start, n)
    # The samples start at 0, next_start[0], next_start[next_start[0]], ...: one Python step
    # per sample (not per sentence), over blocks of next_start turned into lists.
    starts = array("q")
    s = 0
    for low in range(0, n, _WALK_BLOCK):
        high = min(n, low + _WALK_BLOCK)
        if s >= high:
            continue
        following = next_start[low:high].tolist()
        while s < high:
            starts.append(s)
            s = following[s - low]
    bounds = np.append(np.frombuffer(starts, dtype=np.int64), n)
    return np.stack([bounds[:-1], bounds[1:]], axis=1)


def build_split(dataset: IndexedDataset, docs: np.ndarray, seq_len: int, pairs: bool) -> Split:
    """The split of documents `docs` packed into samples of at most `seq_len` tokens."""
    sentences, doc_start = split_sentences(dataset, docs)
    lengths = dataset.sentence_lengths()[sentences]
    budget = seq_len - (3 if pairs else 2)
    return Split(sentences, doc_start, pack_samples(lengths, doc_start, budget, pairs))


def index_key(
    dataset: IndexedDataset, docs_rule: dict[str, Any], seq_len: int, pairs: bool
) -> dict[str, Any]:
    """What a cached index depends on: the shards (manifest entries and each file's size and
    modification time, so a shard replaced behind the manifest's back is noticed without
    hashing it), how documents were chosen, and the packing."""
    shards = []
    for entry in dataset.manifest["shards"]:
        files = {}
        for suffix in (".bin", ".idx"):
            stat = (dataset.directory / (entry["name"] + suffix)).stat()
            files[suffix] = [stat.st_size, stat.st_mtime_ns]
        shards.append({**entry, "files": files})
    return {
        "version": INDEX_VERSION,
        "dataset": str(dataset.directory.resolve()),
        "shards": shards,
        "documents": docs_rule,
        "seq_len": seq_len,
        "pairs": pairs,
    }


def _map_arrays(directory: Path) -> dict[str, np.ndarray]:
    return {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in ARRAYS}


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first key that differs, for the one line that says why a cache is rebuilt."""
    for name in new:
        if old.get(name) != new[name]:
            if name == "shards":
                changed = [
                    e["name"]
                    for e, o in zip(new["shards"], old.get("shards") or [], strict=False)
                    if e != o
                ]
                return f"shards changed ({', '.join(changed[:3]) or 'count'})"
            return f"{name} {old.get(name)!r} -> {new[name]!r}"
    return "unknown difference"


def load_or_build(
    directory: Path,
    key: dict[str, Any],
    build: Callable[[], Split],
    say: Callable[[str], None],
) -> Split:
    """The cached split in `directory` if it was built from `key`, else built, saved and
    memory-mapped. A stale or unreadable cache is rebuilt with one line."""
    stamp = directory / "index.json"
    reason = "none cached"
    if stamp.is_file():
        try:
            stored = json.loads(stamp.read_text(encoding="utf-8"))
            if stored == key:
                return Split(**_map_arrays(directory), cached=directory)
            reason = f"stale: {_difference(stored, key)}"
        except (OSError, ValueError) as error:
            reason = f"unreadable: {error}"
    began = time.perf_counter()
    split = build()
    temp = directory.with_name(f".{directory.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    took = f"built {len(split.samples):,} samples in {time.perf_counter() - began:.1f}s"
    try:
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir(parents=True)
        for name in ARRAYS:
            save_npy(temp / f"{name}.npy", getattr(split, name))
        (temp / "index.json").write_text(json.dumps(key), encoding="utf-8")
        _replace_dir(temp, directory)
    except OSError as error:  # a full disk or a read-only run directory: train without it
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
        say(f"warning: sample index not cached in {directory} ({error}); {took}, kept in memory")
        return split
    say(f"sample index {directory} ({reason}): {took}")
    return Split(**_map_arrays(directory), cached=directory)


def _replace_dir(temp: Path, final: Path) -> None:
    """Put `temp` in place of `final`: the old one is renamed aside first, then removed."""
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}.old-{socket.gethostname()}-{os.getpid()}")
        os.replace(final, aside)
    os.replace(temp, final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


class Shuffle:
    """A keyed pseudo-random permutation of [0, n): a 4-round Feistel network on the smallest
    even number of bits covering n, with cycle walking (values >= n are permuted again until
    they fall inside; fewer than 4 rounds of walking on average). O(1) memory per epoch."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        self.n = n
        self.epoch = epoch
        half = max(1, ((max(n - 1, 1)).bit_length() + 1) // 2)
        self.half = np.uint64(half)
        self.mask = np.uint64((1 << half) - 1)
        rng = np.random.default_rng([seed, epoch, 0x5EED])
        self.keys = rng.integers(0, 2**63, size=self.ROUNDS, dtype=np.uint64)

    def _round(self, x: np.ndarray, key: np.uint64) -> np.ndarray:
        """splitmix64's finaliser of (x ^ key), cut to the half width."""
        z = (x ^ key) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & self.mask

    def _permute(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << self.half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The permuted value of each position in [0, n) (int64 array of the same shape)."""
        x = np.asarray(positions, dtype=np.uint64).reshape(-1)
        out = self._permute(x)
        outside = out >= np.uint64(self.n)
        while outside.any():
            out[outside] = self._permute(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64).reshape(np.shape(positions))
