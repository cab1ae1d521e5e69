"""Fine-tuning metrics (pretrain/finetune/metrics.py).

Oracle: hand-counted cases. Entity matching is strict IOB2 (seqeval's mode="strict",
scheme=IOB2): type, first and last token must all match, and an I- tag that does not continue
an entity of its type is not an entity. When seqeval is installed the same cases are also
checked against it.
"""

from __future__ import annotations

import pytest

from pretrain.finetune import metrics

GOLD = [
    ["B-D", "I-D", "O", "B-D", "O"],  # 2 entities
    ["O", "B-C", "I-C", "I-C"],  # 1
    ["B-D", "B-D", "O"],  # 2 adjacent
]
PRED = [
    ["B-D", "I-D", "O", "B-D", "I-D"],  # (D,0,1) right; (D,3,4) wrong end
    ["O", "I-C", "I-C", "I-C"],  # ill-formed start: no entity
    ["B-D", "B-D", "O"],  # both right
]


def test_entity_spans_strict_iob2():
    assert metrics.entity_spans(["B-D", "I-D", "O", "B-D"]) == {("D", 0, 1), ("D", 3, 3)}
    assert metrics.entity_spans(["I-D", "I-D"]) == set()
    assert metrics.entity_spans(["B-D", "I-C", "I-C"]) == {("D", 0, 0)}  # type change ends it
    assert metrics.entity_spans(["B-D", "B-D", "I-D"]) == {("D", 0, 0), ("D", 1, 2)}
    assert metrics.entity_spans(["O"]) == set()


def test_entity_scores_by_hand():
    """Gold 5 entities, predicted 4 ((D,0,1) (D,3,4) | none | (D,0,0) (D,1,1)), 3 correct."""
    result = metrics.entity_scores(GOLD, PRED)
    assert result["gold_entities"] == 5
    assert result["predicted_entities"] == 4
    assert result["correct_entities"] == 3
    assert result["precision"] == pytest.approx(3 / 4)
    assert result["recall"] == pytest.approx(3 / 5)
    assert result["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert result["token_accuracy"] == pytest.approx(10 / 12)


def test_entity_scores_all_o_is_zero():
    result = metrics.entity_scores(GOLD, [["O"] * len(g) for g in GOLD])
    assert (result["precision"], result["recall"], result["f1"]) == (0.0, 0.0, 0.0)


def test_matches_seqeval_strict_when_installed():
    seqeval = pytest.importorskip("seqeval.metrics")
    from seqeval.scheme import IOB2

    ours = metrics.entity_scores(GOLD, PRED)
    kwargs = {"mode": "strict", "scheme": IOB2}
    assert ours["precision"] == pytest.approx(seqeval.precision_score(GOLD, PRED, **kwargs))
    assert ours["recall"] == pytest.approx(seqeval.recall_score(GOLD, PRED, **kwargs))
    assert ours["f1"] == pytest.approx(seqeval.f1_score(GOLD, PRED, **kwargs))


def test_classification_scores():
    gold = [0, 0, 1, 1, 2]
    pred = [0, 1, 1, 1, 0]
    result = metrics.classification_scores(gold, pred, 3, train_labels=[1, 1, 0])
    assert result["accuracy"] == pytest.approx(3 / 5)
    # F1 per label: 0 → P 1/2 R 1/2 = 0.5; 1 → P 2/3 R 1 = 0.8; 2 → 0.
    assert result["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert result["majority_baseline"] == pytest.approx(2 / 5)  # always 1
    assert result["examples"] == 5
