"""Training samples from the indexed token format, in a deterministic, resumable order.

- Documents are split into train and valid by a fixed rule (every k-th document is held out).
- Packing (mlm.pair_task=none): RoBERTa's FULL-SENTENCES. Whole sentences are packed into
  `seq_len - 2` tokens, crossing document boundaries with an extra [SEP].
- Pairs (nsp|sop): a document is cut into chunks of whole sentences; each chunk becomes segments
  A and B split at a random sentence boundary; NSP swaps B for a chunk of another document half
  of the time, SOP swaps A and B half of the time.
- A split's sample index is built once and cached in the run directory (pretrain.sample_index).
- Order: the training stream is an endless sequence of epochs, each a permutation of the
  samples keyed by (seed, epoch) (a Feistel permutation: no per-epoch table). Stream position
  g is masked with a generator seeded by (seed, g), so a run resumed at `consumed_samples`
  sees exactly what it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_prep.shard_format import CLS_ID, PAD_ID, SEP_ID, IndexedDataset
from data_prep.tokenizer import continuation_mask
from launch.signals import leave_stop_signals_to_the_trainer
from pretrain.blend import DataSource, blend_index
from pretrain.config import ConfigError, MLMConfig
from pretrain.masking import IGNORE, mask_tokens
from pretrain.sample_index import Shuffle, Split, build_split, index_key, load_or_build

# Validation always uses the same corruption so that runs with any training masking compare.
EVAL_MLM = MLMConfig(mode="sparse", mask_rate=0.15, whole_word=False)


def split_documents(num_documents: int, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and valid document ids: every k-th document (k = 1 / fraction) is held out."""
    docs = np.arange(num_documents)
    if valid_fraction <= 0 or num_documents < 2:
        return docs, docs[:0]
    period = max(2, int(round(1.0 / valid_fraction)))
    is_valid = docs % period == period - 1
    if not is_valid.any():
        is_valid[-1] = True
    return docs[~is_valid], docs[is_valid]


class PretrainingData(Dataset):
    """Maps a stream position to a masked sample (numpy arrays, collated by `collate`)."""

    def __init__(
        self,
        dataset: IndexedDataset,
        split: Split,
        seq_len: int,
        mlm: MLMConfig,
        seed: int,
        *,
        shuffle: bool = True,
        continuation: np.ndarray | None = None,
    ) -> None:
        if len(split.samples) == 0:
            raise ConfigError("the dataset split has no samples: the corpus is too small")
        self.dataset = dataset
        self.split = split
        self.seq_len = seq_len
        self.mlm = mlm
        self.seed = seed
        self.shuffle = shuffle
        self.continuation = continuation
        self.vocab_size = dataset.vocab_size
        self._shuffle: Shuffle | None = None

    def __len__(self) -> int:
        return len(self.split.samples)

    def sample_id(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.split.samples))
        if not self.shuffle:
            return offset
        if self._shuffle is None or self._shuffle.epoch != epoch:
            self._shuffle = Shuffle(len(self.split.samples), self.seed, epoch)
        return int(self._shuffle(np.array([offset]))[0])

    def _sentences(self, start: int, end: int, budget: int) -> list[np.ndarray]:
        """Tokens of split sentences [start, end), with [SEP] at document boundaries."""
        pieces: list[np.ndarray] = []
        used = 0
        for i in range(start, end):
            if i > start and self.split.doc_start[i]:
                pieces.append(np.array([SEP_ID]))
                used += 1
            tokens = np.asarray(self.dataset.sentence(int(self.split.sentences[i])))
            tokens = tokens[: max(0, budget - used)]
            pieces.append(tokens)
            used += len(tokens)
        return pieces

    def _tokens(self, sample: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        start, end = (int(x) for x in self.split.samples[sample])
        task = self.mlm.pair_task
        if task == "none":
            body = np.concatenate(self._sentences(start, end, self.seq_len - 2)).astype(np.int64)
            tokens = np.concatenate([[CLS_ID], body, [SEP_ID]])
            return tokens, np.zeros(len(tokens), dtype=np.int64), -1
        budget = self.seq_len - 3
        if end - start >= 2:
            cut = int(rng.integers(start + 1, end))
            a = np.concatenate(self._sentences(start, cut, budget))
            b = np.concatenate(self._sentences(cut, end, budget))
        else:  # a single long sentence: split it in the middle
            whole = np.concatenate(self._sentences(start, end, budget))
            a, b = whole[: len(whole) // 2], whole[len(whole) // 2 :]
        label = 0
        if rng.random() < 0.5:
            label = 1
            if task == "sop":
                a, b = b, a
            else:
                other = int(rng.integers(len(self.split.samples)))
                o_start, o_end = (int(x) for x in self.split.samples[other])
                b = np.concatenate(self._sentences(o_start, o_end, budget))
        a, b = _truncate_pair(a.astype(np.int64), b.astype(np.int64), budget)
        tokens = np.concatenate([[CLS_ID], a, [SEP_ID], b, [SEP_ID]])
        types = np.concatenate([np.zeros(len(a) + 2, np.int64), np.ones(len(b) + 1, np.int64)])
        return tokens, types, label

    def __getitem__(self, position: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, position])
        tokens, types, pair_label = self._tokens(self.sample_id(position), rng)
        masked = mask_tokens(tokens, rng, self.mlm, self.vocab_size, self.continuation)
        item = {
            "input_ids": masked.input_ids,
            "token_type_ids": types,
            "labels": masked.labels,
            "picked": masked.picked,
        }
        if pair_label >= 0:
            item["pair_labels"] = np.array(pair_label)
        return item


def _truncate_pair(a: np.ndarray, b: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Trim the longer segment from its end until both fit (BERT's truncate_seq_pair)."""
    while len(a) + len(b) > budget:
        if len(a) >= len(b):
            a = a[:-1]
        else:
            b = b[:-1]
    return a, b


def collate(items: list[dict[str, np.ndarray]], seq_len: int) -> dict[str, torch.Tensor]:
    """Pad every sample to `seq_len` (fixed shapes keep torch.compile from recompiling)."""
    batch = len(items)
    out = {
        "input_ids": torch.full((batch, seq_len), PAD_ID, dtype=torch.long),
        "token_type_ids": torch.zeros((batch, seq_len), dtype=torch.long),
        "attention_mask": torch.zeros((batch, seq_len), dtype=torch.long),
        "labels": torch.full((batch, seq_len), IGNORE, dtype=torch.long),
        "picked": torch.zeros((batch, seq_len), dtype=torch.bool),
    }
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        out["input_ids"][row, :n] = torch.from_numpy(item["input_ids"])
        out["token_type_ids"][row, :n] = torch.from_numpy(item["token_type_ids"])
        out["attention_mask"][row, :n] = 1
        out["labels"][row, :n] = torch.from_numpy(item["labels"])
        out["picked"][row, :n] = torch.from_numpy(item["picked"])
    if "pair_labels" in items[0]:
        out["pair_labels"] = torch.tensor([int(item["pair_labels"]) for item in items])
    return out


class StreamBatches(Sampler[list[int]]):
    """Micro-batches of stream positions for one data-parallel rank, from a given position on.

    Each optimizer step consumes the next G positions of the stream (G = global batch); micro
    k of rank r takes the slice starting at first + (k*dp_size + r)*micro_batch.
    """

    def __init__(
        self, start_position: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
    ) -> None:
        self.start_position = start_position
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __iter__(self) -> Iterator[list[int]]:
        accumulation = self.global_batch // (self.micro_batch * self.dp_size)
        base = self.start_position
        while True:
            for micro in range(accumulation):
                first = base + (micro * self.dp_size + self.dp_rank) * self.micro_batch
                yield list(range(first, first + self.micro_batch))
            base += self.global_batch


class _Collate:
    """Picklable collate with the sequence length bound (DataLoader workers need pickling)."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len

    def __call__(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        return collate(items, self.seq_len)


def build_loader(data: PretrainingData, sampler: Sampler[list[int]], workers: int) -> DataLoader:
    # Its own generator: a DataLoader iterator otherwise draws a seed from the global torch RNG,
    # which would shift the dropout masks of a resumed run.
    return DataLoader(
        data,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=_Collate(data.seq_len),
        persistent_workers=workers > 0,
        worker_init_fn=leave_stop_signals_to_the_trainer,
        generator=torch.Generator().manual_seed(data.seed),
    )


def eval_batches(
    data: PretrainingData, micro_batch: int, num_batches: int
) -> list[dict[str, torch.Tensor]]:
    """The fixed held-out batches: the first samples of the valid split, masked by EVAL_MLM."""
    count = min(len(data), micro_batch * num_batches)
    batches = []
    for first in range(0, count, micro_batch):
        items = [data[i] for i in range(first, min(first + micro_batch, count))]
        batches.append(collate(items, data.seq_len))
    return batches


class BlendedData(Dataset):
    """Several datasets mixed by weight: stream position g → (dataset d, its own position k)
    by a closed formula (pretrain.blend), so resuming at `consumed_samples` needs nothing else.
    Each part keeps its own epoch shuffle and masking seed."""

    def __init__(self, parts: list[PretrainingData], weights: list[float]) -> None:
        self.parts = parts
        self.weights = weights
        self.seq_len = parts[0].seq_len
        self.seed = parts[0].seed

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __getitem__(self, position: int) -> dict[str, np.ndarray]:
        dataset, local = blend_index(self.weights, [position])
        return self.parts[int(dataset[0])][int(local[0])]


@dataclass
class TrainingData:
    dataset: IndexedDataset  # the first (all share one tokenizer)
    sources: tuple[DataSource, ...]  # data.path, parsed
    train: PretrainingData | BlendedData
    valid: PretrainingData | BlendedData | None
    tokenizer_dir: Path


def _open_dataset(path: str) -> IndexedDataset:
    if not (Path(path) / "manifest.json").is_file():
        raise ConfigError(
            f"data.path={path} has no manifest.json: prepare it with `bert-prep encode`"
        )
    return IndexedDataset(Path(path))  # a cut or invalid manifest raises PrepError (one line)


def _split(
    dataset: IndexedDataset,
    docs: np.ndarray,
    rule: dict[str, Any],
    seq_len: int,
    pairs: bool,
    cache: Path | None,
    say: Callable[[str], None],
) -> Split:
    """A split's sample index: from the `cache` directory when it is current, else built (and
    saved there). `rule` says how `docs` were chosen (part of the cache's key)."""
    if cache is None:
        return build_split(dataset, docs, seq_len, pairs)
    key = index_key(dataset, rule, seq_len, pairs)
    return load_or_build(cache, key, lambda: build_split(dataset, docs, seq_len, pairs), say)


def open_training_data(
    sources: Sequence[DataSource],
    tokenizer: str | None,
    seq_len: int,
    valid_fraction: float,
    mlm: MLMConfig,
    seed: int,
    cache_dir: Path | None = None,
    say: Callable[[str], None] = print,
) -> TrainingData:
    """Open prepared dataset(s) and their train/valid samples; user errors → ConfigError.

    With `cache_dir`, each split's sample index is loaded from there when it was built from the
    same data and settings, else built and saved there (one line via `say`); without, it is
    built in memory."""
    if not sources:
        raise ConfigError(
            "data.path is not set: point it at a directory made by `bert-prep encode`"
        )
    sources = tuple(sources)
    paths, weights = [s.path for s in sources], [s.weight for s in sources]
    datasets = [_open_dataset(p) for p in paths]
    for p, ds in zip(paths[1:], datasets[1:], strict=True):
        if ds.tokenizer_hash != datasets[0].tokenizer_hash:
            raise ConfigError(
                f"data.path: {p} was encoded with another tokenizer than {paths[0]}: "
                "blend only datasets prepared with the same tokenizer"
            )
    tokenizer_dir = Path(tokenizer) if tokenizer else Path(paths[0]) / "tokenizer"
    continuation = continuation_mask(tokenizer_dir) if mlm.whole_word else None
    pairs = mlm.pair_task != "none"
    train_parts, valid_parts = [], []
    for i, dataset in enumerate(datasets):
        part_seed = seed + 1009 * i
        train_docs, valid_docs = split_documents(dataset.num_documents, valid_fraction)
        train_split = _split(
            dataset,
            train_docs,
            {"split": "train", "valid_fraction": valid_fraction},
            seq_len,
            pairs,
            None if cache_dir is None else cache_dir / f"part{i}-train",
            say,
        )
        train_parts.append(
            PretrainingData(
                dataset, train_split, seq_len, mlm, part_seed, continuation=continuation
            )
        )
        valid_split = _split(
            dataset,
            valid_docs,
            {"split": "valid", "valid_fraction": valid_fraction},
            seq_len,
            False,
            None if cache_dir is None else cache_dir / f"part{i}-valid",
            say,
        )
        if len(valid_split.samples):
            valid_parts.append(
                PretrainingData(
                    dataset, valid_split, seq_len, EVAL_MLM, part_seed + 1, shuffle=False
                )
            )
    if len(datasets) == 1:
        valid_part = valid_parts[0] if valid_parts else None
        return TrainingData(datasets[0], sources, train_parts[0], valid_part, tokenizer_dir)
    valid = BlendedData(valid_parts, weights) if len(valid_parts) == len(datasets) else None
    train = BlendedData(train_parts, weights)
    return TrainingData(datasets[0], sources, train, valid, tokenizer_dir)


def most_frequent_token(dataset: IndexedDataset, max_sentences: int = 20000) -> int:
    """The most common non-special token of the corpus (the accuracy baseline of the demo)."""
    counts = np.zeros(dataset.vocab_size, dtype=np.int64)
    step = max(1, dataset.num_sentences // max_sentences)
    for i in range(0, dataset.num_sentences, step):
        counts += np.bincount(np.asarray(dataset.sentence(i)), minlength=dataset.vocab_size)
    counts[:5] = 0
    return int(counts.argmax())


def check_token_ids(batch: dict[str, torch.Tensor], vocab_size: int, source: str | list) -> None:
    """Refuse token ids outside the tokenizer's vocabulary (a shard encoded with another
    tokenizer, or corrupted): two max() per batch on the host, before the ids reach the model.
    Every original token of a sample is in `input_ids` (unchanged positions) or in `labels`
    (the masked ones)."""
    largest = max(int(batch["input_ids"].max()), int(batch["labels"].max()))
    if largest >= vocab_size:
        raise ConfigError(
            f"data.path={source} holds token id {largest}, but the tokenizer's vocabulary has "
            f"{vocab_size} ids: re-encode the data with its tokenizer (bert-prep encode)"
        )
