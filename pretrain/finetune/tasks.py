"""The three tasks: label sets, turning examples into model inputs, and batching.

    classify  one text → one label          AutoModelForSequenceClassification
    pair      (text, text_b) → one label    AutoModelForSequenceClassification, segment ids 0/1
    ner       tokens → one BIO tag each     AutoModelForTokenClassification

Token classification labels the first sub-word of every word and gives the other sub-words
(and [CLS]/[SEP]) the label -100, which the loss ignores; a word's prediction is read from its
first sub-word. Words cut off by --max-length get no prediction and are scored as "O".

Fast tokenizers say which word each sub-word came from (`word_ids()`); slow ones (e.g.
transformers' BertJapaneseTokenizer, which runs MeCab in Python) are handled by tokenizing word
by word, which gives the same alignment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretrain.finetune.data import DataError, TextExample, TokenExample

TASKS = ("classify", "pair", "ner")
IGNORE = -100
"""Label of positions the loss skips (torch.nn.CrossEntropyLoss's ignore_index)."""


def _sort_key(label: str) -> tuple[int, float | str]:
    """Numbers in numeric order first ('2' < '10'), then other labels alphabetically."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def build_labels(task: str, train: Sequence[TextExample | TokenExample]) -> list[str]:
    """The label set, from the training data only.

    For NER every entity type seen gets both B- and I- (a type seen only as B- in training can
    still be tagged I- in dev), with O first.
    """
    if task == "ner":
        types = sorted({tag[2:] for ex in train for tag in ex.tags or () if tag != "O"})
        return ["O", *[f"{prefix}-{t}" for t in types for prefix in ("B", "I")]]
    labels = sorted({ex.label for ex in train if ex.label is not None}, key=_sort_key)
    if len(labels) < 2:
        raise DataError(f"the training data has {len(labels)} distinct label(s): need at least 2")
    return labels


def check_labels(
    path: Path, task: str, examples: Sequence[TextExample | TokenExample], labels: Sequence[str]
) -> bool:
    """Raise DataError if `examples` use a label the training data lacks; True if labelled."""
    known = set(labels)
    seen: set[str] = set()
    for ex in examples:
        if isinstance(ex, TokenExample):
            seen.update(ex.tags or ())
        elif ex.label is not None:
            seen.add(ex.label)
    unknown = sorted(seen - known, key=_sort_key)
    if unknown:
        what = "tag(s)" if task == "ner" else "label(s)"
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise DataError(
            f"{path}: {what} {shown} do not occur in the training data "
            f"(known: {', '.join(labels[:10])}{' ...' if len(labels) > 10 else ''})"
        )
    return bool(seen)


@dataclass
class Encoded:
    """Model inputs of one split. `word_starts[i]` maps word → sub-word position (NER only)."""

    features: list[dict[str, list[int]]]
    word_starts: list[list[int | None]] = field(default_factory=list)
    truncated: int = 0
    """Examples whose input was cut at max_length."""


def encode_text(
    examples: Sequence[TextExample], tokenizer, label2id: dict[str, int], max_length: int
) -> Encoded:
    """Tokenize sentences or pairs; pairs are truncated longest-first, as BERT's GLUE code."""
    texts = [ex.text for ex in examples]
    texts_b = [ex.text_b for ex in examples] if examples[0].text_b is not None else None
    full = tokenizer(texts, texts_b, truncation=False)["input_ids"]
    # Asked for explicitly: some tokenizers (BertJapaneseTokenizer configs without
    # model_input_names) leave segment ids out, and pairs would all read as segment 0.
    enc = tokenizer(
        texts, texts_b, truncation=True, max_length=max_length, return_token_type_ids=True
    )
    features = []
    for i, ex in enumerate(examples):
        feature = {
            "input_ids": enc["input_ids"][i],
            "attention_mask": enc["attention_mask"][i],
            "token_type_ids": _token_types(enc, i),
            "labels": label2id[ex.label] if ex.label is not None else IGNORE,
        }
        features.append(feature)
    truncated = sum(len(f) > max_length for f in full)
    return Encoded(features, truncated=truncated)


def _token_types(enc, i: int) -> list[int]:
    if "token_type_ids" in enc:
        return enc["token_type_ids"][i]
    return [0] * len(enc["input_ids"][i])


def encode_tokens(
    examples: Sequence[TokenExample], tokenizer, label2id: dict[str, int], max_length: int
) -> Encoded:
    """Tokenize pre-split sentences; label first sub-words, -100 elsewhere."""
    if getattr(tokenizer, "is_fast", False):
        return _encode_tokens_fast(examples, tokenizer, label2id, max_length)
    return _encode_tokens_slow(examples, tokenizer, label2id, max_length)


def _encode_tokens_fast(examples, tokenizer, label2id, max_length) -> Encoded:
    words = [list(ex.tokens) for ex in examples]
    enc = tokenizer(
        words,
        is_split_into_words=True,
        truncation=True,
        max_length=max_length,
        return_token_type_ids=True,
    )
    encoded = Encoded([])
    for i, ex in enumerate(examples):
        starts: list[int | None] = [None] * len(ex.tokens)
        labels = []
        previous = None
        for position, word in enumerate(enc.word_ids(i)):
            if word is not None and word != previous:
                starts[word] = position
                labels.append(label2id[ex.tags[word]] if ex.tags else IGNORE)
            else:
                labels.append(IGNORE)
            previous = word
        encoded.features.append(
            {
                "input_ids": enc["input_ids"][i],
                "attention_mask": enc["attention_mask"][i],
                "token_type_ids": _token_types(enc, i),
                "labels": labels,
            }
        )
        encoded.word_starts.append(starts)
        # A word that is not the last with pieces and has no start was cut off.
        last = max((w for w in enc.word_ids(i) if w is not None), default=-1)
        encoded.truncated += any(len(tokenizer.tokenize(t)) for t in ex.tokens[last + 1 :])
    return encoded


def _encode_tokens_slow(examples, tokenizer, label2id, max_length) -> Encoded:
    encoded = Encoded([])
    budget = max_length - 2  # [CLS] ... [SEP]
    for ex in examples:
        ids: list[int] = []
        labels: list[int] = []
        starts: list[int | None] = [None] * len(ex.tokens)
        cut = False
        for word_index, word in enumerate(ex.tokens):
            pieces = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))
            if not pieces:
                continue
            if len(ids) + len(pieces) > budget:
                cut = True
                pieces = pieces[: budget - len(ids)]
                if not pieces:
                    break
            starts[word_index] = len(ids) + 1
            labels += [label2id[ex.tags[word_index]] if ex.tags else IGNORE]
            labels += [IGNORE] * (len(pieces) - 1)
            ids += pieces
            if cut:
                break
        input_ids = [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]
        encoded.features.append(
            {
                "input_ids": input_ids,
                "attention_mask": [1] * len(input_ids),
                "token_type_ids": [0] * len(input_ids),
                "labels": [IGNORE, *labels, IGNORE],
            }
        )
        encoded.word_starts.append(starts)
        encoded.truncated += cut
    return encoded


def collate(features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest member (labels of NER with -100, inputs with [PAD])."""
    longest = max(len(f["input_ids"]) for f in features)
    pad_values = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
    batch = {
        key: torch.tensor([f[key] + [value] * (longest - len(f[key])) for f in features])
        for key, value in pad_values.items()
    }
    labels = [f["labels"] for f in features]
    if isinstance(labels[0], list):
        batch["labels"] = torch.tensor([lab + [IGNORE] * (longest - len(lab)) for lab in labels])
    else:
        batch["labels"] = torch.tensor(labels)
    return batch


def word_predictions(
    encoded: Encoded,
    examples: Sequence[TokenExample],
    logits_argmax: Sequence[list[int]],
    id2label: dict[int, str],
) -> list[list[str]]:
    """Per-word tags from per-sub-word argmax ids; words without a start position get 'O'."""
    out = []
    for ex, starts, ids in zip(examples, encoded.word_starts, logits_argmax, strict=True):
        out.append([id2label[ids[s]] if s is not None else "O" for s in starts][: len(ex.tokens)])
    return out
