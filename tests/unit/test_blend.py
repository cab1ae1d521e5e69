"""Weighted blending of datasets (pretrain.blend): proportions, order, resumability."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pretrain.blend import (
    MAX_POSITION,
    DataSource,
    blend_counts,
    blend_index,
    build_blend,
    parse_data_path,
)


@pytest.mark.parametrize("weights", [[1.0], [0.7, 0.3], [0.5, 0.3, 0.2], [5, 1, 1, 1, 3, 0.01, 2]])
def test_every_prefix_follows_the_weights(weights) -> None:
    """Oracle: w_i * g for every prefix g of a 60k stream, within ceil(log2 n) + 1 samples
    (the documented bound: one per tree level plus rounding); blend_counts agrees with
    counting the index."""
    total = 60_000
    dataset, _ = blend_index(weights, np.arange(total))
    w = np.asarray(weights) / np.sum(weights)
    onehot = np.zeros((total, len(w)), dtype=np.int64)
    onehot[np.arange(total), dataset] = 1
    prefix = np.cumsum(onehot, axis=0)  # [total, n]: counts in the first g + 1 positions
    ideal = np.outer(np.arange(1, total + 1), w)
    bound = math.ceil(math.log2(len(w))) + 1
    assert np.abs(prefix - ideal).max() <= bound
    for g in (0, 1, 7, 999, total):
        counts = prefix[g - 1] if g else np.zeros(len(w), dtype=np.int64)
        assert blend_counts(weights, g).tolist() == counts.tolist()


def test_each_dataset_is_drawn_in_order_without_gaps() -> None:
    """Oracle: k must run 0, 1, 2, ... within each dataset (its own stream position), so
    each dataset keeps its epoch order, shuffling and masking seeds."""
    dataset, k = blend_index([3, 1, 2], np.arange(20_000))
    for d in range(3):
        assert k[dataset == d].tolist() == list(range(int((dataset == d).sum())))


def test_any_window_is_computed_directly() -> None:
    """Oracle: the same positions computed as part of a long prefix; far positions agree
    with the closed-form counts (the k of the last draw of dataset d is its count - 1)."""
    weights = [0.6, 0.25, 0.15]
    full = blend_index(weights, np.arange(50_000))
    window = blend_index(weights, np.arange(31_337, 40_000))
    assert (window[0] == full[0][31_337:40_000]).all()
    assert (window[1] == full[1][31_337:40_000]).all()
    far = MAX_POSITION - 5
    d, k = blend_index(weights, [far])
    counts = blend_counts(weights, far + 1)
    assert k[0] == counts[d[0]] - 1
    assert abs(counts / (far + 1) - np.asarray(weights)).max() < 1e-6
    with pytest.raises(ValueError, match="positions"):
        blend_index(weights, [MAX_POSITION + 1])


def test_weights_scale_and_validation() -> None:
    """Oracle: only the ratios matter; bad weights are errors that say what is wrong."""
    a = blend_index([2, 1], np.arange(1000))[0]
    b = blend_index([4, 2], np.arange(1000))[0]
    assert (a == b).all()
    for bad in ([], [0.5, 0.0], [1, -1], [float("nan")]):
        with pytest.raises(ValueError, match="weights"):
            blend_index(bad, [0])


def test_build_blend_epochs_are_seeded_permutations() -> None:
    """Oracle: the first sizes[d] draws from dataset d are a permutation of its samples (an
    epoch), the next epoch another one; same seed → same index, other seed → other order;
    a window built with `start` equals the same slice of the whole."""
    sizes, weights = [50, 7, 300], [0.5, 0.3, 0.2]
    dataset, sample = build_blend(sizes, weights, 400, seed=1)
    assert dataset.dtype == np.int16 and sample.dtype == np.int64
    for d, size in enumerate(sizes):
        drawn = sample[dataset == d]
        assert (drawn < size).all()
        for e in range(len(drawn) // size):
            assert sorted(drawn[e * size : (e + 1) * size].tolist()) == list(range(size))
    again = build_blend(sizes, weights, 400, seed=1)
    assert (again[0] == dataset).all() and (again[1] == sample).all()
    assert (build_blend(sizes, weights, 400, seed=2)[1] != sample).any()
    tail = build_blend(sizes, weights, 150, seed=1, start=250)
    assert (tail[0] == dataset[250:]).all() and (tail[1] == sample[250:]).all()
    with pytest.raises(ValueError, match="sizes"):
        build_blend([10, 0], [1, 1], 5, seed=0)
    with pytest.raises(ValueError, match="weights"):
        build_blend([10], [1, 1], 5, seed=0)


def test_parse_data_path() -> None:
    """Oracle: DESIGN's data.path: a directory, or weight/path pairs (Megatron's order)."""
    assert parse_data_path("runs/data") == (DataSource("runs/data", 1.0),)
    assert parse_data_path("") == ()
    assert parse_data_path([0.7, "en", 3, "ja"]) == (DataSource("en", 0.7), DataSource("ja", 3.0))
    for bad in ([], [0.5], ["en", 0.5], [0.5, "en", -1, "ja"], [True, "en"]):
        with pytest.raises(ValueError):
            parse_data_path(bad)
