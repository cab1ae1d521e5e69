"""Scores for fine-tuning: accuracy and macro-F1 for classification, entity-level P/R/F1 for NER.

Entities follow strict IOB2 (as seqeval's `mode="strict", scheme=IOB2`): an entity is a B-X
tag followed by any number of I-X tags; an I-X that does not continue an X entity starts
nothing (it is an ill-formed prediction and earns no credit). A predicted entity counts as
correct only when its type, first token and last token all match a gold entity.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def accuracy(gold: Sequence[int], pred: Sequence[int]) -> float:
    return sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold)


def macro_f1(gold: Sequence[int], pred: Sequence[int], num_labels: int) -> float:
    """Unweighted mean over labels of per-label F1 (labels absent from gold and pred count 0)."""
    scores = []
    for label in range(num_labels):
        tp = sum(g == label and p == label for g, p in zip(gold, pred, strict=True))
        n_pred = sum(p == label for p in pred)
        n_gold = sum(g == label for g in gold)
        scores.append(_f1(tp, n_pred, n_gold))
    return sum(scores) / num_labels


def majority_accuracy(train_labels: Sequence[int], gold: Sequence[int]) -> float:
    """Accuracy of always predicting the most frequent training label: the floor to beat."""
    majority = Counter(train_labels).most_common(1)[0][0]
    return sum(g == majority for g in gold) / len(gold)


def classification_scores(
    gold: Sequence[int], pred: Sequence[int], num_labels: int, train_labels: Sequence[int]
) -> dict[str, float]:
    return {
        "accuracy": accuracy(gold, pred),
        "macro_f1": macro_f1(gold, pred, num_labels),
        "majority_baseline": majority_accuracy(train_labels, gold),
        "examples": len(gold),
    }


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Strict IOB2 entities of one sentence as (type, first token, last token)."""
    spans = set()
    current: tuple[str, int] | None = None  # (type, start) of the open entity
    for i, tag in enumerate([*tags, "O"]):  # the sentinel closes a trailing entity
        inside = tag.startswith("I-") and current is not None and tag[2:] == current[0]
        if inside:
            continue
        if current is not None:
            spans.add((current[0], current[1], i - 1))
            current = None
        if tag.startswith("B-"):
            current = (tag[2:], i)
    return spans


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Micro-averaged entity precision, recall and F1 over sentences, plus the counts."""
    n_gold = n_pred = n_correct = 0
    tokens = token_correct = 0
    for gold_tags, pred_tags in zip(gold, pred, strict=True):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"{len(gold_tags)} gold tags but {len(pred_tags)} predicted")
        gold_spans, pred_spans = entity_spans(gold_tags), entity_spans(pred_tags)
        n_gold += len(gold_spans)
        n_pred += len(pred_spans)
        n_correct += len(gold_spans & pred_spans)
        tokens += len(gold_tags)
        token_correct += sum(g == p for g, p in zip(gold_tags, pred_tags, strict=True))
    return {
        "precision": n_correct / n_pred if n_pred else 0.0,
        "recall": n_correct / n_gold if n_gold else 0.0,
        "f1": _f1(n_correct, n_pred, n_gold),
        "token_accuracy": token_correct / tokens if tokens else 0.0,
        "gold_entities": n_gold,
        "predicted_entities": n_pred,
        "correct_entities": n_correct,
        "examples": len(gold),
    }


def _f1(correct: int, n_pred: int, n_gold: int) -> float:
    # 2PR/(P+R) written with counts: defined (0) when either side is empty.
    return 2 * correct / (n_pred + n_gold) if n_pred + n_gold else 0.0
