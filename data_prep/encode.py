"""Corpus → indexed token shards + manifest.json (the `bert-prep encode` command).

Documents stream from the inputs, are split into sentences and encoded in batches with the
Rust tokenizer's encode_batch. With workers > 1 the batches go to a process pool but come back
in order, so the shards are byte-identical for any worker count.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from data_prep.errors import PrepError
from data_prep.sentences import LANGS, split_sentences
from data_prep.shard_format import (
    FORMAT_VERSION,
    MANIFEST,
    ShardWriter,
    dtype_for_vocab,
    write_json_atomic,
)
from data_prep.sources import SourceStats, iter_documents
from data_prep.tokenizer import load_tokenizer, tokenizer_info

DEFAULT_SHARD_TOKENS = 50_000_000
DEFAULT_MIN_DOC_TOKENS = 8
"""Shorter documents (headings, page numbers, "CHAPTER I.") are dropped as too_short."""
DROP_REASONS = ("empty", "too_short")
_BATCH_CHARS = 1_000_000  # ~1 MB of text per encode_batch call / pool task
_BATCH_DOCS = 2000


@dataclass
class EncodedBatch:
    """The kept documents of one batch as flat arrays (cheap to send between processes)."""

    ids: np.ndarray  # all token ids of the kept documents
    sentence_lengths: np.ndarray  # int64, tokens per sentence
    document_sentences: np.ndarray  # int64, sentences per kept document
    dropped: Counter = field(default_factory=Counter)

    def documents(self) -> Iterator[list[np.ndarray]]:
        """Each kept document as a list of sentence arrays (views into `ids`)."""
        sentences = np.split(self.ids, np.cumsum(self.sentence_lengths)[:-1])
        start = 0
        for count in self.document_sentences:
            yield sentences[start : start + count]
            start += count


def encode_documents(
    tokenizer: Tokenizer, docs: Sequence[str], *, lang: str, min_doc_tokens: int, dtype: np.dtype
) -> EncodedBatch:
    """Split and encode a batch of documents; drop (and count) empty and too-short ones."""
    per_doc = [split_sentences(doc, lang) if doc.strip() else [] for doc in docs]
    flat = [s for sentences in per_doc for s in sentences]
    encodings = tokenizer.encode_batch(flat, add_special_tokens=False) if flat else []
    ids: list[np.ndarray] = []
    lengths: list[int] = []
    doc_sentences: list[int] = []
    dropped: Counter = Counter()
    k = 0
    for sentences in per_doc:
        arrays = [np.asarray(e.ids, dtype=dtype) for e in encodings[k : k + len(sentences)]]
        k += len(sentences)
        arrays = [a for a in arrays if a.size]
        n_tokens = sum(a.size for a in arrays)
        if n_tokens == 0:
            dropped["empty"] += 1
        elif n_tokens < min_doc_tokens:
            dropped["too_short"] += 1
        else:
            ids.extend(arrays)
            lengths.extend(a.size for a in arrays)
            doc_sentences.append(len(arrays))
    return EncodedBatch(
        ids=np.concatenate(ids) if ids else np.zeros(0, dtype=dtype),
        sentence_lengths=np.asarray(lengths, dtype=np.int64),
        document_sentences=np.asarray(doc_sentences, dtype=np.int64),
        dropped=dropped,
    )


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# Per-process state of pool workers (set once by the initializer, not sent with every task).
_worker: dict = {}


def _init_worker(tokenizer_dir: str, lang: str, min_doc_tokens: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _worker.update(
        tokenizer=load_tokenizer(tokenizer_dir),
        lang=lang,
        min_doc_tokens=min_doc_tokens,
        dtype=np.dtype(dtype),
    )


def _worker_encode(docs: list[str]) -> EncodedBatch:
    return encode_documents(
        _worker["tokenizer"],
        docs,
        lang=_worker["lang"],
        min_doc_tokens=_worker["min_doc_tokens"],
        dtype=_worker["dtype"],
    )


def _encoded_batches(
    batches: Iterator[list[str]],
    tokenizer_dir: Path,
    workers: int,
    lang: str,
    min_doc_tokens: int,
    dtype: np.dtype,
) -> Iterator[EncodedBatch]:
    """Encode batches in order, in this process or in a pool with a bounded queue (Pool.imap
    would read the whole corpus ahead into memory when the workers are slower than reading)."""
    if workers <= 1:
        tokenizer = load_tokenizer(tokenizer_dir)
        for docs in batches:
            yield encode_documents(
                tokenizer, docs, lang=lang, min_doc_tokens=min_doc_tokens, dtype=dtype
            )
        return
    # spawn, not fork: the parent may already run tokenizers' thread pool, which fork breaks.
    ctx = multiprocessing.get_context("spawn")
    initargs = (str(tokenizer_dir), lang, min_doc_tokens, dtype.str)
    with ctx.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for docs in batches:
            pending.append(pool.apply_async(_worker_encode, (docs,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _check_out_dir(out: Path, tokenizer_hash: str) -> dict | None:
    """Refuse a directory holding data of another tokenizer; return its old manifest."""
    old = None
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        old_hash = old.get("tokenizer", {}).get("hash")
    elif (out / "tokenizer" / "bert_tokenizer.json").is_file():
        old_hash = tokenizer_info(out / "tokenizer").get("hash")
    else:
        return None
    if old_hash != tokenizer_hash:
        raise PrepError(
            f"{out}: already holds shards from another tokenizer (hash {str(old_hash)[:12]}, "
            f"this one {tokenizer_hash[:12]}); choose an empty --out directory"
        )
    return old


def _copy_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    target = out / "tokenizer"
    if target.resolve() == tokenizer_dir.resolve():
        return
    target.mkdir(exist_ok=True)
    for path in sorted(tokenizer_dir.iterdir()):
        if path.is_file():
            shutil.copy2(path, target / path.name)


def encode_corpus(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    doc_sep: str = "blank",
    text_field: str = "text",
    lang: str = "auto",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    min_doc_tokens: int = DEFAULT_MIN_DOC_TOKENS,
    workers: int = 1,
) -> dict:
    """Encode `inputs` into shards of at most `shard_tokens` tokens in `out_dir`; return the
    manifest (also written to out_dir/manifest.json, after the shards).

    A document is never split across shards, so a single document longer than `shard_tokens`
    gets a shard of its own. Re-encoding into a directory made with the same tokenizer
    replaces its dataset; one made with another tokenizer is refused.
    """
    if lang not in LANGS:
        raise PrepError(f"unknown --lang {lang!r}; choose one of {', '.join(LANGS)}")
    if shard_tokens < 1 or workers < 1 or min_doc_tokens < 0:
        raise PrepError("--shard-tokens and --workers must be >= 1, --min-doc-tokens >= 0")
    tokenizer_dir = Path(tokenizer_dir)
    info = tokenizer_info(tokenizer_dir)
    load_tokenizer(tokenizer_dir)  # fails early (hash check) before anything is written
    dtype = dtype_for_vocab(info["vocab_size"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = _check_out_dir(out, info["hash"])
    (out / MANIFEST).unlink(missing_ok=True)  # the old dataset is gone from here on

    source_stats = SourceStats()
    docs = iter_documents(inputs, doc_sep=doc_sep, text_field=text_field, stats=source_stats)
    progress = tqdm(unit="doc", desc="encode", file=sys.stderr, disable=not sys.stderr.isatty())
    dropped: Counter = Counter({reason: 0 for reason in DROP_REASONS})
    shards: list[dict] = []
    writer: ShardWriter | None = None
    try:
        for batch in _encoded_batches(
            _batches(docs), tokenizer_dir, workers, lang, min_doc_tokens, dtype
        ):
            dropped.update(batch.dropped)
            for document in batch.documents():
                n_tokens = sum(s.size for s in document)
                if writer is not None and writer.num_tokens + n_tokens > shard_tokens:
                    shards.append(writer.finish())
                    writer = None
                if writer is None:
                    writer = ShardWriter(out / f"shard_{len(shards):05d}", dtype)
                writer.add_document(document)
            progress.update(len(batch.document_sentences) + sum(batch.dropped.values()))
        if writer is not None:
            shards.append(writer.finish())
            writer = None
    finally:
        progress.close()
        if writer is not None:
            writer.abort()
    if not shards:
        raise PrepError(
            f"every document was dropped ({dict(dropped)}); check the inputs or lower "
            "--min-doc-tokens"
        )

    _copy_tokenizer(tokenizer_dir, out)
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": info,
        "dtype": dtype.name,
        "num_documents": sum(s["documents"] for s in shards),
        "num_sentences": sum(s["sentences"] for s in shards),
        "num_tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
        "stats": {
            **source_stats.as_dict(),
            "kept_documents": sum(s["documents"] for s in shards),
            "dropped": dict(dropped),
        },
        "settings": {
            "doc_sep": doc_sep,
            "text_field": text_field,
            "lang": lang,
            "min_doc_tokens": min_doc_tokens,
            "shard_tokens": shard_tokens,
        },
        "inputs": [str(p) for p in inputs],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(out / MANIFEST, manifest)
    _remove_stale_shards(out, old, {s["name"] for s in shards})
    return manifest


def _remove_stale_shards(out: Path, old: dict | None, keep: set[str]) -> None:
    """Delete shard files of a replaced dataset that the new one no longer uses."""
    for entry in (old or {}).get("shards", []):
        if entry["name"] not in keep:
            for suffix in (".bin", ".idx"):
                (out / (entry["name"] + suffix)).unlink(missing_ok=True)
