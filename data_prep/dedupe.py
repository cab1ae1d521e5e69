"""Exact-duplicate detection: 64-bit document hashes in a compact numpy hash set.

A Python `set` of ints costs ~70 bytes per document (int object + slot); this open-addressing
table of uint64 costs 8 bytes per slot at a load factor between 1/3 and 2/3, i.e. 12-24 bytes per
distinct document: 1-2 GB for 100 M documents. The 64-bit BLAKE2b hash makes a false "duplicate"
unlikely until billions of documents (birthday bound: p ≈ n² / 2^65, 3e-4 for 10^8).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_MAX_LOAD = 2 / 3


def doc_hashes(texts: Sequence[str]) -> np.ndarray:
    """uint64[len(texts)]: BLAKE2b-64 of each text's UTF-8 bytes (0 is remapped to 1, the
    table's empty marker)."""
    out = np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                "little",
            )
            for t in texts
        ),
        dtype=np.uint64,
        count=len(texts),
    )
    out[out == 0] = 1
    return out


class HashSet:
    """A set of non-zero uint64 values with vectorised batch insertion (linear probing)."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        size = 1 << max(4, int(capacity - 1).bit_length())
        self._table = np.zeros(size, dtype=np.uint64)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._table.nbytes

    def add(self, hashes: np.ndarray) -> np.ndarray:
        """Insert a batch; return bool[len(hashes)], True where the value was not in the set
        before and is its first occurrence in the batch (i.e. "keep this document")."""
        values = np.asarray(hashes, dtype=np.uint64).copy()
        values[values == 0] = 1
        keep = np.zeros(len(values), dtype=bool)
        if len(values) == 0:
            return keep
        unique, first = np.unique(values, return_index=True)
        if (self._count + len(unique)) > _MAX_LOAD * len(self._table):
            self._grow(self._count + len(unique))
        keep[first] = self._insert(unique)
        return keep

    def _grow(self, needed: int) -> None:
        size = len(self._table)
        while needed > _MAX_LOAD * size:
            size *= 2
        old = self._table[self._table != 0]
        self._table = np.zeros(size, dtype=np.uint64)
        self._count = 0
        self._insert(old)

    def _insert(self, values: np.ndarray) -> np.ndarray:
        """Insert distinct values; True where a value was new."""
        table = self._table
        mask = np.uint64(len(table) - 1)
        slots = values & mask  # BLAKE2b bits are uniform: the low bits are a fine index
        new = np.zeros(len(values), dtype=bool)
        pending = np.arange(len(values))
        while pending.size:
            s = slots[pending]
            current = table[s]
            found = current == values[pending]
            empty = current == 0
            if empty.any():
                # Several pending values may want the same empty slot: the first one wins, the
                # others see it taken on the next round and move on.
                claim_slots, first = np.unique(s[empty], return_index=True)
                winners = pending[empty][first]
                table[claim_slots] = values[winners]
                new[winners] = True
                done = found.copy()
                done[np.flatnonzero(empty)[first]] = True
            else:
                done = found
            taken = ~found & ~empty
            slots[pending[taken]] = (slots[pending[taken]] + np.uint64(1)) & mask
            pending = pending[~done]
        self._count += int(new.sum())
        return new
