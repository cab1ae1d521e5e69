"""Masking, done per sample when batches are assembled (in DataLoader workers): numpy only.

Masking picks `mask_rate` of the non-special tokens (whole words if asked) and corrupts them
80/10/10 ([MASK] / random token / unchanged). Sparse MLM labels only those picked positions;
dense MLM labels every non-special position with its original token and optionally replaces
`visible_replace_rate` of the non-picked tokens by random ones, so that visible tokens cannot
simply be copied (docs/design.md, "Dense and sparse MLM"). [CLS]/[SEP]/[PAD] are never labelled:
predicting them is trivial.

The picks are drawn before any other random choice, from the same generator, so a dense and a
sparse run with the same seed pick the same positions. This module imports no torch and no
model code, so data-loader workers stay light.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.shard_format import MASK_ID, SPECIAL_TOKEN_COUNT
from pretrain.config import MLMConfig

IGNORE = -100  # label of positions not scored (torch's cross-entropy default)


@dataclass
class MaskedSample:
    input_ids: np.ndarray  # [S] int64, corrupted
    labels: np.ndarray  # [S] int64, original token where scored, IGNORE elsewhere
    picked: np.ndarray  # [S] bool, picked for masking (the "masked positions" of the metrics)


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    mlm: MLMConfig,
    vocab_size: int,
    continuation: np.ndarray | None = None,
) -> MaskedSample:
    """Corrupt one sequence. `continuation[id]` is True for word pieces that continue a word."""
    dense = mlm.mode == "dense"
    tokens = tokens.astype(np.int64)
    candidates = np.flatnonzero(tokens >= SPECIAL_TOKEN_COUNT)
    picked = np.zeros(tokens.shape, dtype=bool)
    if len(candidates):
        target = max(1, int(round(mlm.mask_rate * len(candidates))))
        if mlm.whole_word and continuation is not None:
            picked[_pick_whole_words(tokens, candidates, continuation, target, rng)] = True
        else:
            picked[rng.permutation(candidates)[:target]] = True

    input_ids = tokens.copy()
    picked_idx = np.flatnonzero(picked)
    roll = rng.random(len(picked_idx))
    input_ids[picked_idx[roll < 0.8]] = MASK_ID
    random_idx = picked_idx[(roll >= 0.8) & (roll < 0.9)]
    input_ids[random_idx] = rng.integers(SPECIAL_TOKEN_COUNT, vocab_size, len(random_idx))

    labels = np.full(tokens.shape, IGNORE, dtype=np.int64)
    if dense:
        visible = candidates[~picked[candidates]]
        if mlm.visible_replace_rate > 0 and len(visible):
            swap = visible[rng.random(len(visible)) < mlm.visible_replace_rate]
            input_ids[swap] = rng.integers(SPECIAL_TOKEN_COUNT, vocab_size, len(swap))
        labels[candidates] = tokens[candidates]
    else:
        labels[picked_idx] = tokens[picked_idx]
    return MaskedSample(input_ids=input_ids, labels=labels, picked=picked)


def _pick_whole_words(
    tokens: np.ndarray,
    candidates: np.ndarray,
    continuation: np.ndarray,
    target: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Positions of randomly chosen whole words, stopping once `target` pieces are reached."""
    starts = ~continuation[tokens[candidates]]
    starts[0] = True
    # A word also starts after a gap in the candidates (a special token between two pieces).
    starts[1:] |= np.diff(candidates) != 1
    word_ids = np.cumsum(starts) - 1
    chosen: list[np.ndarray] = []
    count = 0
    for word in rng.permutation(word_ids[-1] + 1):
        pieces = candidates[word_ids == word]
        if count and count + len(pieces) > target * 1.1:
            continue
        chosen.append(pieces)
        count += len(pieces)
        if count >= target:
            break
    return np.concatenate(chosen)
