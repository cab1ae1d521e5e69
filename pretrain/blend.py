"""Blending several prepared datasets with weights: which dataset feeds stream position g.

`data.path` may list several datasets with weights (e.g. English 0.7, Japanese 0.3). Position
g of the training stream maps to (dataset d, k), "the k-th sample drawn from dataset d", with
every dataset drawn in order (k = 0, 1, 2, ... with no gaps), in proportion to the weights
at every prefix of the stream (error at most ceil(log2 n) + 1 samples per dataset).

The map is a closed formula, not a table built by walking the stream (Megatron's
`build_blending_indices`), so any position is computed directly: a resumed run at
`consumed_samples` gets exactly the positions it would have got, in O(log n) per position and
O(1) memory, whatever the length of the run.

How: a fixed binary tree over the datasets (halves by index). At a node whose left side has
weight share a = p / 2^32 (p an integer, so the arithmetic is exact in uint64), the first g
positions that reach the node hold L(g) = floor(a g + 1/2) left ones; position g goes left iff
L(g + 1) > L(g), and continues as position L(g) on the left or g - L(g) on the right. Each
node spreads its two sides evenly (a Beatty sequence), so the blend is even at every scale.

Pure numpy; nothing here knows about shards or tokenizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_BITS = 32
_ONE = 1 << _BITS
MAX_POSITION = _ONE - 2
"""Positions up to here (4.29e9 samples) keep p * (g + 1) + 2^31 inside uint64."""


@dataclass(frozen=True)
class DataSource:
    """One dataset of `data.path` and its share of the training stream."""

    path: str
    weight: float


def parse_data_path(value: str | Sequence) -> tuple[DataSource, ...]:
    """`data.path` → its datasets, the one parse of that key (config, data and trainer use it).

    A string is one dataset (weight 1; an empty string: none); a list alternates weight and path,
    Megatron's convention: [0.7, runs/en/data, 0.3, runs/ja/data]. Raises ValueError naming the
    problem (the config layer adds the key)."""
    if isinstance(value, str):
        return (DataSource(value, 1.0),) if value else ()
    items = list(value)
    if not items or len(items) % 2:
        raise ValueError(
            f"a blend is a list of weight, path pairs like [0.7, data/en, 0.3, data/ja]; "
            f"got {items!r}"
        )
    weights, paths = items[0::2], items[1::2]
    for w, p in zip(weights, paths, strict=True):
        if isinstance(w, bool) or not isinstance(w, int | float) or not isinstance(p, str):
            raise ValueError(f"expected a number then a path, got {w!r}, {p!r}")
    _check_weights(weights)
    return tuple(DataSource(str(p), float(w)) for w, p in zip(weights, paths, strict=True))


def _check_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError("blend weights must be a non-empty list of numbers")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"blend weights must be positive numbers, got {list(weights)}")
    return w / w.sum()


def _nodes(weights: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(lo, mid, hi, p) for every inner node in breadth-first order; left = [lo, mid)."""
    nodes = []
    stack = [(0, len(weights))]
    while stack:
        lo, hi = stack.pop(0)
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        left, total = weights[lo:mid].sum(), weights[lo:hi].sum()
        p = int(round(left / total * _ONE))
        nodes.append((lo, mid, hi, min(max(p, 1), _ONE - 1)))
        stack += [(lo, mid), (mid, hi)]
    return nodes


def _left_count(p: int, g: np.ndarray) -> np.ndarray:
    """floor(p * g / 2^32 + 1/2) in exact uint64 arithmetic."""
    return (np.uint64(p) * g + np.uint64(1 << (_BITS - 1))) >> np.uint64(_BITS)


def blend_index(
    weights: Sequence[float], positions: np.ndarray | Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(dataset, k) for each stream position: int64 arrays of the positions' shape."""
    w = _check_weights(weights)
    g = np.asarray(positions, dtype=np.int64)
    if g.size and (g.min() < 0 or g.max() > MAX_POSITION):
        raise ValueError(f"blend positions must be in [0, {MAX_POSITION}]")
    local = g.astype(np.uint64).ravel()
    dataset = np.zeros(local.shape, dtype=np.int64)
    owner = np.zeros(local.shape, dtype=np.int64)  # index of the node each position is at
    nodes = _nodes(w)
    where = {(lo, hi): i for i, (lo, _, hi, _) in enumerate(nodes)}
    for i, (lo, mid, hi, p) in enumerate(nodes):
        at = np.flatnonzero(owner == i)
        if at.size == 0:
            continue
        x = local[at]
        before = _left_count(p, x)
        left = _left_count(p, x + np.uint64(1)) > before
        local[at] = np.where(left, before, x - before)
        for side, (a, b) in ((left, (lo, mid)), (~left, (mid, hi))):
            if b - a == 1:
                dataset[at[side]] = a
                owner[at[side]] = -1
            else:
                owner[at[side]] = where[(a, b)]
    return dataset.reshape(g.shape), local.astype(np.int64).reshape(g.shape)


def blend_counts(weights: Sequence[float], total: int) -> np.ndarray:
    """int64[n]: how many of the first `total` positions each dataset supplies."""
    w = _check_weights(weights)
    if not 0 <= total <= MAX_POSITION + 1:
        raise ValueError(f"total must be in [0, {MAX_POSITION + 1}]")
    counts = np.zeros(len(w), dtype=np.int64)
    reach = {(0, len(w)): total}
    for lo, mid, hi, p in _nodes(w):
        here = reach.pop((lo, hi))
        left = int(_left_count(p, np.uint64(here)))
        reach[(lo, mid)], reach[(mid, hi)] = left, here - left
    for (lo, _hi), n in reach.items():
        counts[lo] = n
    return counts


def build_blend(
    sizes: Sequence[int],
    weights: Sequence[float],
    total: int,
    seed: int,
    start: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Megatron-style index for stream positions [start, start + total).

    Returns (dataset_index int16, sample_index int64): sample_index is a sample number within
    that dataset (< sizes[d]). A dataset that is drawn more than `sizes[d]` times starts a new
    epoch, each epoch a permutation of its samples seeded by (seed, d, epoch). Any window can
    be built on its own (`start`), so a resumed run does not rebuild the past.
    """
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    w = _check_weights(weights)
    if len(sizes_arr) != len(w):
        raise ValueError(f"{len(sizes_arr)} dataset sizes but {len(w)} weights")
    if np.any(sizes_arr <= 0):
        raise ValueError(f"every blended dataset needs samples, got sizes {list(sizes)}")
    if len(w) > np.iinfo(np.int16).max:
        raise ValueError("at most 32767 datasets can be blended")
    dataset, k = blend_index(w, np.arange(start, start + total, dtype=np.int64))
    sample = np.empty(total, dtype=np.int64)
    for d, size in enumerate(sizes_arr.tolist()):
        sel = np.flatnonzero(dataset == d)
        epoch, offset = np.divmod(k[sel], size)
        for e in np.unique(epoch).tolist():
            rows = epoch == e
            order = np.random.default_rng([seed, d, e]).permutation(size)
            sample[sel[rows]] = order[offset[rows]]
    return dataset.astype(np.int16), sample
