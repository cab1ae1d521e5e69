"""Samples from indexed shards: packing, splits, pair construction and stream determinism.

Oracles: the shard reader's own sentences (every training sentence lands in exactly one sample,
in order), the document split rule, and a second loader with a different worker count.
"""

from __future__ import annotations

import numpy as np
import torch

from data_prep.shard_format import IndexedDataset
from pretrain.blend import parse_data_path
from pretrain.config import MLMConfig
from pretrain.data import (
    CLS_ID,
    SEP_ID,
    PretrainingData,
    StreamBatches,
    build_loader,
    build_split,
    open_training_data,
    split_documents,
)


def _open(path, seq_len, valid_fraction, mlm, seed):
    return open_training_data(parse_data_path(str(path)), None, seq_len, valid_fraction, mlm, seed)


def test_split_documents_is_disjoint_and_covers():
    train, valid = split_documents(1000, 0.05)
    assert len(np.intersect1d(train, valid)) == 0
    assert len(train) + len(valid) == 1000
    assert len(valid) == 50


def test_packing_covers_every_sentence_once_within_budget(small_dataset):
    dataset = IndexedDataset(small_dataset)
    docs = np.arange(dataset.num_documents)
    split = build_split(dataset, docs, seq_len=64, pairs=False)
    starts, ends = split.samples[:, 0], split.samples[:, 1]
    assert starts[0] == 0 and ends[-1] == len(split.sentences)
    assert (starts[1:] == ends[:-1]).all()  # contiguous, no sentence lost or repeated
    data = PretrainingData(dataset, split, 64, MLMConfig(mode="sparse"), seed=0, shuffle=False)
    for position in range(0, len(data), 7):
        item = data[position]
        tokens = item["input_ids"]
        assert len(tokens) <= 64 and item["labels"].shape == tokens.shape
    # Unmasked content of sample 0 equals the reader's sentences joined with [SEP]s.
    first, end = split.samples[0]
    pieces = []
    for i in range(first, end):
        if i > first and split.doc_start[i]:
            pieces.append([SEP_ID])
        pieces.append(list(dataset.sentence(int(split.sentences[i]))))
    expected = [CLS_ID, *np.concatenate(pieces)[:62].tolist(), SEP_ID]
    item = data[0]
    original = np.where(item["labels"] >= 0, item["labels"], item["input_ids"])
    assert original.tolist() == expected


def test_pairs_have_two_segments_and_balanced_labels(small_dataset):
    for task in ("nsp", "sop"):
        mlm = MLMConfig(mode="dense", pair_task=task)
        data = _open(small_dataset, 64, 0.05, mlm, seed=3).train
        labels = []
        for position in range(200):
            item = data[position]
            types = item["token_type_ids"]
            assert types[0] == 0 and types[-1] == 1 and (np.diff(types) >= 0).all()
            sep = np.flatnonzero(item["input_ids"] == SEP_ID)
            assert item["input_ids"][0] == CLS_ID and len(item["input_ids"]) <= 64
            assert sep[-1] == len(types) - 1
            labels.append(int(item["pair_labels"]))
        assert 0.35 < np.mean(labels) < 0.65, task


def test_stream_is_identical_with_worker_processes(small_dataset):
    """Masks are drawn per (seed, position): worker processes must not change a batch."""
    data = _open(small_dataset, 64, 0.05, MLMConfig(), seed=5).train
    streams = []
    for workers in (0, 2):
        loader = build_loader(data, StreamBatches(40, 16, 4, dp_rank=1, dp_size=2), workers)
        iterator = iter(loader)
        streams.append([next(iterator) for _ in range(4)])
    for a, b in zip(*streams, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_epochs_are_reshuffled_and_resume_positions_match(small_dataset):
    data = _open(small_dataset, 64, 0.05, MLMConfig(), seed=5).train
    n = len(data)
    first_epoch = [data.sample_id(i) for i in range(n)]
    second_epoch = [data.sample_id(n + i) for i in range(n)]
    assert sorted(first_epoch) == list(range(n)) == sorted(second_epoch)
    assert first_epoch != second_epoch
    sampler = iter(StreamBatches(24, 8, 4, dp_rank=0, dp_size=1))
    assert next(sampler) == [24, 25, 26, 27] and next(sampler) == [28, 29, 30, 31]
    assert next(sampler) == [32, 33, 34, 35]


def test_no_held_out_split_trains_without_evaluation(small_dataset, tmp_path):
    """data.valid_fraction=0 (documented as allowed) and a one-document corpus have no valid
    split; both raised IndexError in the sentence split before. Oracle: every sentence of the
    corpus is in the training split."""
    from data_prep.encode import encode_corpus

    whole = _open(small_dataset, 64, 0.0, MLMConfig(), 1)
    assert whole.valid is None
    assert len(whole.train.split.sentences) == IndexedDataset(small_dataset).num_sentences

    text = tmp_path / "one.txt"
    text.write_text("The only document has one sentence. And then a second one.\n")
    encode_corpus([text], small_dataset / "tokenizer", tmp_path / "one", lang="en")
    one = _open(tmp_path / "one", 64, 0.01, MLMConfig(), 1)
    assert one.valid is None and len(one.train) == 1
    assert one.train[0]["input_ids"][0] == CLS_ID


def test_token_ids_beyond_the_vocabulary_are_refused(small_dataset):
    """Oracle: the manifest's vocabulary size; ids at or above it end in a ConfigError."""
    import pytest

    from pretrain.config import ConfigError
    from pretrain.data import check_token_ids, collate

    data = _open(small_dataset, 64, 0.0, MLMConfig(), 1)
    batch = collate([data.train[i] for i in range(4)], 64)
    check_token_ids(batch, data.dataset.vocab_size, str(small_dataset))
    largest = max(int(batch["input_ids"].max()), int(batch["labels"].max()))
    with pytest.raises(ConfigError, match=f"holds token id {largest}"):
        check_token_ids(batch, largest, str(small_dataset))


def test_a_truncated_manifest_is_a_one_line_error(small_dataset, tmp_path):
    """Before: a JSONDecodeError traceback from bert-train. The format's reader reports it
    (PrepError, which bert-train prints as one line)."""
    import shutil

    import pytest

    from data_prep.errors import PrepError

    cut = tmp_path / "cut"
    shutil.copytree(small_dataset, cut)
    text = (cut / "manifest.json").read_text()
    (cut / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(PrepError, match="manifest.json") as error:
        _open(cut, 64, 0.0, MLMConfig(), 1)
    assert "\n" not in str(error.value)
