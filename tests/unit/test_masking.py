"""Masking: rates, 80/10/10 split, dense vs sparse labels, whole words, determinism.

Oracle: the definitions in docs/design.md ("Dense and sparse MLM"); proportions are checked on
~100k tokens with tolerances of several binomial standard deviations.
"""

import numpy as np

from data_prep.shard_format import MASK_ID
from pretrain.config import MLMConfig
from pretrain.masking import IGNORE, mask_tokens

VOCAB = 1000


def _sequence(rng, n=512):
    tokens = rng.integers(5, VOCAB, n)
    tokens[0], tokens[-1], tokens[100] = 2, 3, 3  # [CLS] ... [SEP] in the middle ... [SEP]
    return tokens


def test_sparse_rates_and_replacements():
    rng = np.random.default_rng(0)
    mlm = MLMConfig(mode="sparse", mask_rate=0.15)
    picked = masked = random = kept = candidates = 0
    for _ in range(200):
        tokens = _sequence(rng)
        out = mask_tokens(tokens, rng, mlm, VOCAB)
        special = tokens < 5
        assert not out.picked[special].any()
        assert (out.labels[~out.picked] == IGNORE).all()
        assert (out.labels[out.picked] == tokens[out.picked]).all()
        assert (out.input_ids[~out.picked] == tokens[~out.picked]).all()
        candidates += (~special).sum()
        picked += out.picked.sum()
        masked += (out.input_ids[out.picked] == MASK_ID).sum()
        kept += (out.input_ids[out.picked] == tokens[out.picked]).sum()
        random += ((out.input_ids != tokens) & (out.input_ids != MASK_ID)).sum()
    assert abs(picked / candidates - 0.15) < 0.002
    assert abs(masked / picked - 0.8) < 0.01
    assert abs(random / picked - 0.1) < 0.01
    assert abs(kept / picked - 0.1) < 0.012  # a random token can equal the original


def test_dense_labels_every_non_special_and_replaces_visible():
    rng = np.random.default_rng(1)
    mlm = MLMConfig(mode="dense", mask_rate=0.15, visible_replace_rate=0.2)
    changed_visible = visible = 0
    for _ in range(100):
        tokens = _sequence(rng)
        out = mask_tokens(tokens, rng, mlm, VOCAB)
        special = tokens < 5
        assert (out.labels[special] == IGNORE).all()
        assert (out.labels[~special] == tokens[~special]).all()
        vis = ~special & ~out.picked
        visible += vis.sum()
        changed_visible += (out.input_ids[vis] != tokens[vis]).sum()
    assert abs(changed_visible / visible - 0.2 * (1 - 1 / VOCAB)) < 0.01


def test_same_seed_picks_same_positions_in_dense_and_sparse():
    tokens = _sequence(np.random.default_rng(2))
    dense = mask_tokens(tokens, np.random.default_rng(7), MLMConfig(mode="dense"), VOCAB)
    sparse = mask_tokens(tokens, np.random.default_rng(7), MLMConfig(mode="sparse"), VOCAB)
    assert (dense.picked == sparse.picked).all()


def test_whole_word_masking_takes_all_pieces():
    rng = np.random.default_rng(3)
    continuation = np.zeros(VOCAB, dtype=bool)
    continuation[500:] = True  # ids >= 500 continue a word
    mlm = MLMConfig(mode="sparse", mask_rate=0.15, whole_word=True)
    for _ in range(50):
        tokens = _sequence(rng)
        out = mask_tokens(tokens, rng, mlm, VOCAB, continuation)
        # Every picked continuation piece has its word start picked too (walk back).
        for pos in np.flatnonzero(out.picked):
            start = pos
            while start > 0 and continuation[tokens[start]] and tokens[start - 1] >= 5:
                start -= 1
                assert out.picked[start], (pos, start)
        ratio = out.picked.sum() / (tokens >= 5).sum()
        assert 0.1 < ratio < 0.25
