"""Corpus → indexed token shards + manifest.json (the `bert-prep encode` command).

How the work is cut (see data_prep.plan): the inputs become work units of ~`unit_bytes`; unit u
becomes shards `shard_UUUUU_PPPP`. A unit is encoded start to finish by one process: read →
clean → drop (counted by reason) → duplicates within the unit dropped by hash → sentences →
`encode_batch` → shard parts of at most `shard_tokens` tokens. Units go to `--workers`
processes, to the ranks of an `mpirun`/`srun` job (data_prep.ranks) and to array-job pieces
(`--num-shards K --shard-index i`, joined by `bert-prep merge`), and whoever encodes a unit
writes the same bytes, so the dataset is byte-identical for any of these splits.

Duplicates across units are removed at the end, when every unit's document hashes are known
(first occurrence in corpus order wins): units holding a later copy are rewritten from their
shards (token ids, no re-tokenizing). For array-job pieces that step happens in `merge`.

Crash safety and resuming: a unit's shards are written to temporary names and fsynced; then
its record (shard checksums, counts) goes to OUT/.prep/units/ atomically; then the shards are
renamed into place. A unit counts as done only if its record matches this run's plan
fingerprint and its files match the checksums, so a killed run started again with the same
command redoes exactly the unfinished units. manifest.json is written last, by rank 0.

Owning the output: rank 0 holds an flock on OUT/.prep/lock for the whole run (one writer per
dataset), and pool workers die with their parent. A complete dataset of another command is
replaced only on request (`overwrite`), by building the new one in OUT.new and swapping it in
when complete (see must_replace and swap_in).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data_prep.clean import DROP_REASONS, CleanConfig, clean_text, length_reason
from data_prep.dedupe import HashSet, doc_hashes
from data_prep.errors import PrepError
from data_prep.plan import SHARD_PREFIX, Unit, block, fingerprint, plan_units, shard_name
from data_prep.progress import Progress, peak_rss_mb
from data_prep.ranks import RankInfo, detect_rank
from data_prep.sentences import LANGS, detect_lang, split_sentences
from data_prep.shard_format import (
    FORMAT_VERSION,
    MANIFEST,
    IndexedShard,
    ShardWriter,
    dtype_for_vocab,
    file_sha256,
    fsync_dir,
    publish_shard,
    read_manifest,
    save_npy,
    write_json_atomic,
)
from data_prep.sources import (
    SKIP_REASONS,
    ReadConfig,
    SourceStats,
    expand_inputs,
    no_text_message,
    read_range,
    refuse_out_among_inputs,
)
from data_prep.tokenizer import load_segmenter, load_tokenizer, tokenizer_info

DEFAULT_SHARD_TOKENS = 50_000_000
DEFAULT_MIN_DOC_TOKENS = 8
"""Shorter documents (headings, page numbers, "CHAPTER I.") are dropped as too_short."""
DEFAULT_UNIT_BYTES = 256_000_000
WORK_DIR = ".prep"
"""OUT/.prep/units/unit_NNNNN.json (records) and OUT/.prep/hashes/unit_NNNNN.npy (document
hashes for removing duplicates across units; 8 bytes per kept document)."""
REPLACED = "replaced"
"""OUT/.prep/replaced: the old dataset, for the moment of a swap (see swap_in)."""
_BATCH_CHARS = 1_000_000  # ~1 MB of text per encode_batch call
_BATCH_DOCS = 2000
_REPORT_EVERY_S = 0.5
_MAX_PROBLEMS = 1000


@dataclass(frozen=True)
class EncodeSettings:
    """Everything that decides the output bytes (it is hashed into the plan fingerprint)."""

    read: ReadConfig = field(default_factory=ReadConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    lang: str = "auto"
    """Sentence rules and NFKC auto: en, ja, or auto (decided per document)."""
    min_doc_tokens: int = DEFAULT_MIN_DOC_TOKENS
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    unit_bytes: int = DEFAULT_UNIT_BYTES
    dedupe: bool = True
    pattern: str = "*"
    """Which files of an input directory are read."""

    @classmethod
    def build(cls, **options) -> EncodeSettings:
        """Settings from flat keyword options (the names of the CLI flags)."""
        read_keys = {"doc_sep", "text_field", "fmt", "encoding", "max_doc_chars"}
        clean_keys = {"nfkc", "remove_control", "fold_whitespace", "lowercase", "min_doc_chars"}
        own = {f for f in cls.__dataclass_fields__ if f not in ("read", "clean")}
        unknown = set(options) - read_keys - clean_keys - own
        if unknown:
            raise TypeError(f"unknown encode options: {', '.join(sorted(unknown))}")
        return cls(
            read=ReadConfig(**{k: v for k, v in options.items() if k in read_keys}),
            clean=CleanConfig(**{k: v for k, v in options.items() if k in clean_keys}),
            **{k: v for k, v in options.items() if k in own},
        )

    def validate(self) -> None:
        self.read.validate()
        self.clean.validate()
        if self.lang not in LANGS:
            raise PrepError(f"unknown --lang {self.lang!r}; choose one of {', '.join(LANGS)}")
        if self.shard_tokens < 1 or self.unit_bytes < 1 or self.min_doc_tokens < 0:
            raise PrepError("--shard-tokens and --unit-bytes must be >= 1, --min-doc-tokens >= 0")

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Encoding one batch of documents


@dataclass
class EncodedBatch:
    """The kept documents of one batch as flat arrays (cheap to keep and to slice)."""

    ids: np.ndarray  # all token ids of the kept documents
    sentence_lengths: np.ndarray  # int64, tokens per sentence
    document_sentences: np.ndarray  # int64, sentences per kept document
    kept: np.ndarray  # int64, index in the input batch of each kept document
    dropped: Counter = field(default_factory=Counter)

    def documents(self) -> Iterator[list[np.ndarray]]:
        """Each kept document as a list of sentence arrays (views into `ids`)."""
        sentences = np.split(self.ids, np.cumsum(self.sentence_lengths)[:-1])
        start = 0
        for count in self.document_sentences:
            yield sentences[start : start + count]
            start += count


def encode_documents(
    tokenizer: Tokenizer,
    docs: Sequence[str],
    *,
    lang: str | Sequence[str],
    min_doc_tokens: int,
    dtype: np.dtype,
    segment: Callable[[str], str] | None = None,
) -> EncodedBatch:
    """Split and encode a batch of documents; drop (and count) empty and too-short ones.

    `lang` is one language for all or one per document; `segment` (MeCab for
    `--pretokenize mecab`) turns a sentence into space-separated words before encoding.
    """
    langs = [lang] * len(docs) if isinstance(lang, str) else list(lang)
    per_doc = [
        split_sentences(doc, doc_lang) if doc.strip() else []
        for doc, doc_lang in zip(docs, langs, strict=True)
    ]
    flat = [s for sentences in per_doc for s in sentences]
    if segment is not None:
        flat = [segment(s) for s in flat]
    encodings = tokenizer.encode_batch(flat, add_special_tokens=False) if flat else []
    # Whole-batch numpy from here on: a Python loop per sentence costs as much as a tenth of
    # the tokenizer's time.
    id_lists = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    ids = np.fromiter(chain.from_iterable(id_lists), dtype=dtype, count=int(lengths.sum()))
    owner = np.repeat(np.arange(len(docs)), [len(s) for s in per_doc])  # sentence → document
    doc_tokens = np.bincount(owner, weights=lengths, minlength=len(docs))
    empty = doc_tokens == 0
    keep_doc = ~empty & (doc_tokens >= min_doc_tokens)
    keep_sentence = (lengths > 0) & keep_doc[owner]
    dropped: Counter = Counter()
    if empty.any():
        dropped["empty"] = int(empty.sum())
    if (~empty & ~keep_doc).any():
        dropped["too_short"] = int((~empty & ~keep_doc).sum())
    return EncodedBatch(
        ids=ids[np.repeat(keep_sentence, lengths)],
        sentence_lengths=lengths[keep_sentence],
        document_sentences=np.bincount(owner[keep_sentence], minlength=len(docs))[keep_doc],
        kept=np.flatnonzero(keep_doc),
        dropped=dropped,
    )


# ---------------------------------------------------------------------------------------------
# Encoding one unit


@dataclass(frozen=True)
class Job:
    """What every process needs to encode any unit (sent once to each worker)."""

    out: str
    tokenizer_dir: str
    files: tuple[str, ...]
    settings: EncodeSettings
    fingerprint: str
    dtype: str


def _work(out: Path, kind: str, unit: int, suffix: str) -> Path:
    return out / WORK_DIR / kind / f"unit_{unit:05d}{suffix}"


def record_path(out: Path, unit: int) -> Path:
    return _work(out, "units", unit, ".json")


def hashes_path(out: Path, unit: int) -> Path:
    return _work(out, "hashes", unit, ".npy")


def _empty_stats() -> dict:
    stats = SourceStats().as_dict()
    stats["dropped"] = {reason: 0 for reason in DROP_REASONS}
    stats["kept_documents"] = 0
    return stats


class PartWriter:
    """Writes one unit's documents into parts of at most `shard_tokens` tokens (a document is
    never split, so a longer one gets a part of its own); nothing is published here."""

    def __init__(self, out: Path, unit: int, shard_tokens: int, dtype: np.dtype) -> None:
        self.out, self.unit, self.shard_tokens, self.dtype = out, unit, shard_tokens, dtype
        self.entries: list[dict] = []
        self._writer: ShardWriter | None = None

    def add(self, document: list[np.ndarray]) -> None:
        n_tokens = sum(s.size for s in document)
        if self._writer is not None and self._writer.num_tokens + n_tokens > self.shard_tokens:
            self.entries.append(self._writer.close())
            self._writer = None
        if self._writer is None:
            name = shard_name(self.unit, len(self.entries))
            self._writer = ShardWriter(self.out / name, self.dtype)
        self._writer.add_document(document)

    def add_batch(self, batch: EncodedBatch) -> None:
        """All documents of a batch, a run of whole documents per part (same bytes as
        add() one document at a time)."""
        n_docs = len(batch.document_sentences)
        sent_end = np.cumsum(batch.document_sentences)  # per document, into sentences
        tok_end = np.concatenate([[0], np.cumsum(batch.sentence_lengths)])[sent_end]
        first = 0
        while first < n_docs:
            base_tok = int(tok_end[first - 1]) if first else 0
            room = self.shard_tokens - (self._writer.num_tokens if self._writer else 0)
            # documents first..last-1 fit in the open part
            last = int(np.searchsorted(tok_end, base_tok + room, side="right"))
            if last <= first:
                if self._writer is not None and self._writer.num_documents:
                    self.entries.append(self._writer.close())
                    self._writer = None
                    continue
                last = first + 1  # a document longer than a whole part gets one of its own
            if self._writer is None:
                name = shard_name(self.unit, len(self.entries))
                self._writer = ShardWriter(self.out / name, self.dtype)
            s0 = int(sent_end[first - 1]) if first else 0
            s1 = int(sent_end[last - 1])
            self._writer.add_documents(
                batch.ids[base_tok : int(tok_end[last - 1])],
                batch.sentence_lengths[s0:s1],
                batch.document_sentences[first:last],
            )
            first = last

    def close(self) -> list[dict]:
        if self._writer is not None:
            self.entries.append(self._writer.close())
            self._writer = None
        return self.entries

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        for entry in self.entries:
            for suffix in (".bin.tmp", ".idx.tmp"):
                (self.out / (entry["name"] + suffix)).unlink(missing_ok=True)


class UnitEncoder:
    """Per-process state (tokenizer, MeCab) and the encoding of whole units."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.out = Path(job.out)
        self.files = [Path(f) for f in job.files]
        self.settings = job.settings
        self.dtype = np.dtype(job.dtype)
        self.tokenizer = load_tokenizer(job.tokenizer_dir)
        self.segment = load_segmenter(job.tokenizer_dir)

    def encode(self, unit: Unit, report: Callable[[int, int, int], None]) -> dict:
        """Encode `unit` and return its record; `report(bytes, docs, tokens)` gets deltas."""
        s = self.settings
        record_path(self.out, unit.index).unlink(missing_ok=True)
        for stale in self.out.glob(f"{SHARD_PREFIX}{unit.index:05d}_*.tmp"):
            stale.unlink()
        stats = SourceStats()
        dropped: Counter = Counter({reason: 0 for reason in DROP_REASONS})
        seen = HashSet() if s.dedupe else None
        kept_hashes: list[np.ndarray] = []
        parts = PartWriter(self.out, unit.index, s.shard_tokens, self.dtype)
        batch: list[str] = []
        langs: list[str] = []
        chars = 0
        position = [0]
        reported = [0, 0.0]  # bytes, time
        pending = [0, 0]  # docs, tokens not yet reported

        def flush() -> None:
            nonlocal batch, langs, chars
            if not batch:
                return
            hashes = None
            if seen is not None:
                hashes = doc_hashes(batch)
                first = seen.add(hashes)
                dropped["duplicate"] += int((~first).sum())
                batch = [d for d, keep in zip(batch, first, strict=True) if keep]
                langs = [x for x, keep in zip(langs, first, strict=True) if keep]
                hashes = hashes[first]
            encoded = encode_documents(
                self.tokenizer,
                batch,
                lang=langs,
                min_doc_tokens=s.min_doc_tokens,
                dtype=self.dtype,
                segment=self.segment,
            )
            dropped.update(encoded.dropped)
            parts.add_batch(encoded)
            if hashes is not None:
                kept_hashes.append(hashes[encoded.kept])
            pending[0] += len(batch)
            pending[1] += int(encoded.ids.size)
            batch, langs, chars = [], [], 0

        def maybe_report(piece_size: int, force: bool = False) -> None:
            now = time.monotonic()
            if force or now - reported[1] >= _REPORT_EVERY_S:
                # At the end of a piece report all of it (also a skipped file's bytes).
                upto = piece_size if force else min(position[0], piece_size)
                report(max(0, upto - reported[0]), pending[0], pending[1])
                reported[0], reported[1] = upto, now
                pending[0] = pending[1] = 0

        try:
            for piece in unit.pieces:
                path = self.files[piece.file]
                end = path.stat().st_size if piece.end is None else piece.end
                position[0] = reported[0] = 0
                for doc in read_range(path, s.read, stats, piece.start, piece.end, position):
                    if doc is None:
                        dropped["too_long"] += 1
                        continue
                    lang = s.lang if s.lang != "auto" else detect_lang(doc)
                    text = clean_text(doc, s.clean, lang)
                    reason = length_reason(text, s.clean)
                    if reason is not None:
                        dropped[reason] += 1
                        continue
                    batch.append(text)
                    langs.append(lang)
                    chars += len(text)
                    if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
                        flush()
                        maybe_report(end - piece.start)
                flush()
                maybe_report(end - piece.start, force=True)
            entries = parts.close()
            if seen is not None:
                _save_hashes(hashes_path(self.out, unit.index), kept_hashes)
        except BaseException:
            parts.abort()
            raise
        source = stats.as_dict()
        record = {
            "unit": unit.index,
            "fingerprint": self.job.fingerprint,
            "final": not s.dedupe,
            "shards": entries,
            "stats": {
                **source,
                "dropped": dict(dropped),
                "kept_documents": sum(e["documents"] for e in entries),
            },
            "problems": stats.problems[:_MAX_PROBLEMS],
        }
        write_json_atomic(record_path(self.out, unit.index), record)
        for entry in entries:
            publish_shard(self.out / entry["name"])
        return record


def _save_hashes(path: Path, parts: list[np.ndarray]) -> None:
    hashes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_npy(tmp, hashes.astype("<u8"))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(tmp)) from None
    os.replace(tmp, path)


def unit_done(out: Path, unit: int, fp: str, *, check_hashes: bool = True) -> dict | None:
    """The unit's record if it belongs to this plan and its files are complete and intact."""
    path = record_path(out, unit)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fp:
        return None
    for entry in record["shards"]:
        prefix = out / entry["name"]
        for suffix, key in ((".bin", "bin_sha256"), (".idx", "idx_sha256")):
            file = prefix.with_name(prefix.name + suffix)
            if not file.is_file():
                return None
            if check_hashes and file_sha256(file) != entry[key]:
                return None
    if not record.get("final") and not hashes_path(out, unit).is_file():
        return None
    return record


# ---------------------------------------------------------------------------------------------
# Worker processes


_worker: dict = {}


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this worker when its parent dies. Otherwise a `kill -9`
    of bert-prep leaves its workers finishing their units in --out, racing a rerun that
    encodes the same units (the rerun's lock cannot see them)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not fatal: the worker merely outlives a killed parent, as elsewhere
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _init_worker(job: Job, progress_queue, parent: int) -> None:
    _die_with_parent(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _worker["queue"] = progress_queue
    try:
        _worker["encoder"] = UnitEncoder(job)
    except Exception as exc:  # noqa: BLE001 - re-raised by the first task
        # An initializer that raises makes Pool start replacement workers forever; the task
        # raises it instead, which stops the run with the real message.
        _worker["error"] = exc


def _worker_encode(unit: Unit) -> tuple[dict, float]:
    """The unit's record and this worker's peak memory so far (MB)."""
    if "error" in _worker:
        raise _worker["error"]
    record = _worker["encoder"].encode(unit, lambda *delta: _worker["queue"].put(delta))
    return record, peak_rss_mb()


def _run_units(job: Job, units: list[Unit], workers: int, progress: Progress) -> float:
    """Encode `units` here (workers = 1) or in a pool of spawned processes (fork is unsafe
    once the tokenizers' thread pool has started). Units go out one at a time, so a slow unit
    never holds up the others. Returns the largest worker's peak memory (MB, 0 if none)."""
    if not units:
        return 0.0
    if workers <= 1 or len(units) == 1:
        encoder = UnitEncoder(job)
        for unit in units:
            encoder.encode(unit, progress.update)
        return 0.0
    ctx = multiprocessing.get_context("spawn")
    progress_queue = ctx.Queue()
    with ctx.Pool(
        min(workers, len(units)),
        initializer=_init_worker,
        initargs=(job, progress_queue, os.getpid()),
    ) as pool:
        results = [pool.apply_async(_worker_encode, (unit,)) for unit in units]
        while True:
            try:
                progress.update(*progress_queue.get(timeout=0.2))
            except queue.Empty:
                pass
            failed = next((r for r in results if r.ready() and not r.successful()), None)
            if failed is not None:
                failed.get()  # re-raises the worker's exception here
            if all(r.ready() for r in results):
                break
        peaks = [r.get()[1] for r in results]
        while True:
            try:
                progress.update(*progress_queue.get_nowait())
            except queue.Empty:
                break
    return max(peaks)


# ---------------------------------------------------------------------------------------------
# Finishing: duplicates across units, manifest


def remove_cross_unit_duplicates(
    out: Path, records: list[dict], settings: EncodeSettings
) -> list[dict]:
    """Drop documents whose text appeared in an earlier unit (first occurrence in corpus order
    wins); rewrite the affected units from their shards. Idempotent: final units are skipped,
    but their hashes still count as seen."""
    if not settings.dedupe:
        return records
    seen = HashSet()
    result = []
    for record in records:
        hashes = np.load(hashes_path(out, record["unit"]))
        keep = seen.add(hashes)
        if record.get("final"):
            result.append(record)
            continue
        drop = int((~keep).sum())
        record = json.loads(json.dumps(record))  # a copy
        if drop:
            record["shards"] = _rewrite_unit(out, record, keep, settings.shard_tokens)
        record["final"] = True
        record["stats"]["dropped"]["duplicate"] += drop
        record["stats"]["kept_documents"] -= drop
        write_json_atomic(record_path(out, record["unit"]), record)
        for entry in record["shards"]:
            if (out / (entry["name"] + ".bin.tmp")).is_file():
                publish_shard(out / entry["name"])
        result.append(record)
    return result


def _rewrite_unit(out: Path, record: dict, keep: np.ndarray, shard_tokens: int) -> list[dict]:
    """Write the unit's kept documents as new parts (temporary names; the caller records and
    publishes them). Old parts past the new count are removed by the final clean-up."""
    old = [IndexedShard(out / e["name"]) for e in record["shards"]]
    dtype = old[0].dtype if old else np.dtype(np.uint16)
    parts = PartWriter(out, record["unit"], shard_tokens, dtype)
    d = 0
    try:
        for shard in old:
            offsets = np.asarray(shard.token_offsets)
            doc_offsets = np.asarray(shard.document_offsets)
            for i in range(shard.num_documents):
                if keep[d]:
                    first, end = int(doc_offsets[i]), int(doc_offsets[i + 1])
                    parts.add(
                        [
                            np.asarray(shard.tokens[offsets[j] : offsets[j + 1]])
                            for j in range(first, end)
                        ]
                    )
                d += 1
        return parts.close()
    except BaseException:
        parts.abort()
        raise


def _sum_stats(records: list[dict]) -> dict:
    total = _empty_stats()
    for record in records:
        for key, value in record["stats"].items():
            if isinstance(value, dict):
                for k, v in value.items():
                    total[key][k] = total[key].get(k, 0) + v
            else:
                total[key] = total.get(key, 0) + value
    total["skipped_files"] = {r: total["skipped_files"].get(r, 0) for r in SKIP_REASONS}
    return total


def build_manifest(
    records: list[dict],
    *,
    tokenizer: dict,
    dtype: np.dtype,
    settings: EncodeSettings,
    inputs: Sequence[str],
    fp: str,
    n_units: int,
    piece: dict | None = None,
) -> dict:
    """The manifest, identical for any split of the work (timing etc. goes under "run")."""
    shards = [entry for record in records for entry in record["shards"]]
    problems = [p for record in records for p in record.get("problems", [])]
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer,
        "dtype": np.dtype(dtype).name,
        "num_documents": sum(s["documents"] for s in shards),
        "num_sentences": sum(s["sentences"] for s in shards),
        "num_tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
        "stats": _sum_stats(records),
        "problems": problems[:_MAX_PROBLEMS],
        "settings": settings.as_dict(),
        "inputs": list(inputs),
        "plan": {"units": n_units, "fingerprint": fp},
    }
    if piece is not None:
        manifest["piece"] = piece
    return manifest


def remove_stale_files(out: Path, manifest: dict) -> None:
    """Delete shard files, temporary files and records that the manifest does not use (an
    older run with other settings, parts that a rewrite made unnecessary)."""
    keep = {entry["name"] for entry in manifest["shards"]}
    for path in out.glob(f"{SHARD_PREFIX}*"):
        name = path.name.split(".", 1)[0]
        if path.name.endswith(".tmp") or name not in keep:
            path.unlink(missing_ok=True)
    for kind in ("units", "hashes"):
        for path in (out / WORK_DIR / kind).glob("unit_*"):
            try:
                number = int(path.name[5:10])
            except ValueError:
                continue
            if number >= manifest["plan"]["units"] or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)


def _tokenizer_hash_in(out: Path, manifest: dict | None) -> str | None:
    """The hash of the tokenizer whose data `out` holds (None: no data of ours)."""
    if manifest is not None:
        return manifest["tokenizer"].get("hash")
    if (out / "tokenizer" / "bert_tokenizer.json").is_file():
        return tokenizer_info(out / "tokenizer").get("hash")
    return None


def must_replace(out: Path, tokenizer_hash: str, fp: str, overwrite: bool) -> bool:
    """Whether this run builds its dataset aside and swaps it in (True) or writes in `out`.

    `out` is written in place when it holds no complete dataset (nothing to lose; a killed
    run's units are resumed) or the dataset this very command makes (same plan fingerprint:
    only missing or damaged units are redone, with the same bytes). A dataset of other inputs,
    settings or tokenizer is replaced only with `overwrite`, and never before the new one is
    complete. Decided from the files alone, so every rank of a job decides the same.
    """
    try:
        manifest = read_manifest(out) if (out / MANIFEST).is_file() else None
    except PrepError:
        manifest = None  # a cut manifest.json: no usable dataset to keep
    old_hash = _tokenizer_hash_in(out, manifest)
    if old_hash is not None and old_hash != tokenizer_hash:
        what = (
            f"holds data from another tokenizer (hash {str(old_hash)[:12]}, this one "
            f"{tokenizer_hash[:12]})"
        )
    elif manifest is not None and manifest.get("plan", {}).get("fingerprint") != fp:
        what = "holds a dataset made from other inputs or settings"
    else:
        return False
    if not overwrite:
        raise PrepError(
            f"{out}: {what}; pass --overwrite to replace it (the old dataset stays until the "
            "new one is complete), or choose another --out"
        )
    return True


def staging_dir(out: Path) -> Path:
    """Where a replacement of `out` is built: beside it, so the final renames stay on one
    filesystem."""
    return out.with_name(out.name + ".new")


def finish_replacement(out: Path) -> None:
    """Complete a replacement killed between its two renames (see swap_in): `out` is gone and
    its staging directory holds the new dataset with the old one inside."""
    staging = staging_dir(out)
    if out.exists() or not (staging / WORK_DIR / REPLACED).is_dir():
        return
    if not (staging / MANIFEST).is_file():
        return
    try:
        os.rename(staging, out)
    except FileNotFoundError:
        pass  # another rank of this job did it first


def swap_in(staging: Path, out: Path) -> None:
    """Replace `out` by the complete dataset in `staging`. The old dataset first moves into
    the staging directory, which then takes its name: at every moment one directory holds
    both complete datasets, so no kill can lose the old one before the new one is whole
    (finish_replacement completes an interrupted swap)."""
    aside = staging / WORK_DIR / REPLACED
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(out, aside)
    os.rename(staging, out)
    fsync_dir(out.parent)
    shutil.rmtree(out / WORK_DIR / REPLACED)


@contextmanager
def writer_lock(directory: Path) -> Iterator[None]:
    """Be the only `bert-prep` writing `directory`: an exclusive flock on
    DIRECTORY/.prep/lock, which the kernel drops when the process dies (even by kill -9), so
    no stale lock is ever left. Filesystems without flock get a warning and no lock."""
    path = directory / WORK_DIR / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
            raise PrepError(
                f"{directory} is being written by another bert-prep ({holder}); wait for it "
                "to end, or stop it, then run this command again"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            print(
                f"bert-prep: warning: {directory}: the filesystem refuses locks ({exc.strerror})"
                "; make sure no other bert-prep writes there",
                file=sys.stderr,
            )
        else:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        os.close(fd)


def copy_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    target = out / "tokenizer"
    if target.resolve() == tokenizer_dir.resolve():
        return
    target.mkdir(exist_ok=True)
    for path in target.iterdir():  # files of a tokenizer this directory held before
        if path.is_file() and not (tokenizer_dir / path.name).is_file():
            path.unlink()
    for path in sorted(tokenizer_dir.iterdir()):
        if path.is_file():
            shutil.copy2(path, target / path.name)


def _wait_for_units(out: Path, units: range, fp: str, timeout: float, log: Callable) -> list[dict]:
    """Rank 0: wait until every unit of `units` has a complete record (other ranks write
    them); give up after `timeout` seconds without a new one."""
    records: dict[int, dict] = {}
    last_change = time.monotonic()
    last_log = 0.0
    while True:
        for unit in units:
            if unit not in records:
                record = unit_done(out, unit, fp, check_hashes=False)
                if record is not None:
                    records[unit] = record
                    last_change = time.monotonic()
        if len(records) == len(units):
            return [records[u] for u in units]
        now = time.monotonic()
        if now - last_change > timeout:
            missing = [u for u in units if u not in records]
            raise PrepError(
                f"rank 0 waited {timeout:.0f} s without progress for units {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} of other ranks; check that every rank runs "
                "the same command, or raise --rank-timeout"
            )
        if now - last_log > 30:
            log(f"rank 0: {len(records)}/{len(units)} units done, waiting for the other ranks")
            last_log = now
        time.sleep(1.0)


def encode_corpus(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    settings: EncodeSettings | None = None,
    *,
    workers: int = 1,
    num_shards: int = 1,
    shard_index: int = 0,
    ranks: RankInfo | None = None,
    log_every: float = 30.0,
    rank_timeout: float = 3600.0,
    overwrite: bool = False,
    **options,
) -> dict:
    """Encode `inputs` into `out_dir`; return the manifest (also written to
    out_dir/manifest.json, after the shards) or, on ranks other than 0, a short report.

    `options` are EncodeSettings fields by flag name (doc_sep, lang, shard_tokens, ...), for
    callers that do not build EncodeSettings themselves. Re-encoding into a directory resumes
    it (or repairs it) when it holds this command's data or no complete dataset; a dataset of
    other inputs, settings or tokenizer is refused, or with `overwrite` built aside and
    swapped in once complete (see must_replace).
    """
    started = time.monotonic()
    if settings is None:
        settings = EncodeSettings.build(**options)
    elif options:
        settings = replace(settings, **options)
    settings.validate()
    if workers < 1:
        raise PrepError(f"--workers must be >= 1, got {workers}")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise PrepError(
            f"--shard-index must be in [0, --num-shards); got {shard_index} of {num_shards}"
        )
    ranks = ranks or detect_rank()
    tokenizer_dir = Path(tokenizer_dir)
    info = tokenizer_info(tokenizer_dir)
    load_tokenizer(tokenizer_dir)  # fails early (hash check) before anything is written
    load_segmenter(tokenizer_dir)  # and on a missing fugashi
    dtype = dtype_for_vocab(info["vocab_size"])
    final = Path(out_dir)
    files = expand_inputs(inputs, settings.pattern)
    refuse_out_among_inputs(inputs, files, final)
    units = plan_units(files, settings.unit_bytes, settings.read)
    settings_dict = settings.as_dict()
    fp = fingerprint(files, units, settings_dict, info["hash"])

    with ExitStack() as locks:
        out = _claim_output(final, info["hash"], fp, overwrite, ranks.rank, locks)
        replacing = out != final
        for kind in ("units", "hashes"):
            (out / WORK_DIR / kind).mkdir(parents=True, exist_ok=True)
        if ranks.rank == 0:
            copy_tokenizer(tokenizer_dir, out)  # marks the directory as this tokenizer's

        piece_units = block(len(units), shard_index, num_shards)
        my_units = [
            units[piece_units[i]] for i in block(len(piece_units), ranks.rank, ranks.world_size)
        ]
        todo = [u for u in my_units if unit_done(out, u.index, fp) is None]
        total = sum(u.bytes for u in my_units)
        skipped_bytes = total - sum(u.bytes for u in todo)
        if skipped_bytes:
            log(f"resuming: {len(my_units) - len(todo)} of {len(my_units)} unit(s) already done")
        job = Job(
            str(out), str(tokenizer_dir), tuple(str(f) for f in files), settings, fp, dtype.str
        )
        progress = Progress(total, skipped_bytes, log_every=log_every)
        try:
            worker_peak = _run_units(job, todo, workers, progress)
        finally:
            progress.close()
        if ranks.rank != 0:
            return {
                "rank": ranks.rank,
                "world_size": ranks.world_size,
                "units": len(my_units),
                "encoded_units": len(todo),
            }

        records = _wait_for_units(out, piece_units, fp, rank_timeout, log)
        piece = None
        if num_shards == 1:
            records = remove_cross_unit_duplicates(out, records, settings)
        else:
            piece = {
                "index": shard_index,
                "count": num_shards,
                "units": [piece_units.start, piece_units.stop],
            }
        manifest = build_manifest(
            records,
            tokenizer=info,
            dtype=dtype,
            settings=settings,
            inputs=[str(p) for p in inputs],
            fp=fp,
            n_units=len(units),
            piece=piece,
        )
        if not manifest["shards"] and num_shards == 1:
            stats = manifest["stats"]
            if not stats["documents"]:
                source = SourceStats(problems=manifest["problems"])
                raise PrepError(no_text_message(files, source))
            raise PrepError(
                f"every document was dropped ({stats['dropped']}); check the inputs or lower "
                "--min-doc-tokens / --min-doc-chars"
            )
        manifest["run"] = {
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.monotonic() - started, 3),
            "workers": min(workers, len(todo)) if len(todo) > 1 else 1,
            "world_size": ranks.world_size,
            "launcher": ranks.launcher,
            "encoded_bytes": progress.bytes - skipped_bytes,
            "encoded_documents": progress.docs,
            "encoded_tokens": progress.tokens,
            "peak_rss_mb": {"main": round(peak_rss_mb(), 1), "workers": round(worker_peak, 1)},
        }
        write_json_atomic(out / MANIFEST, manifest)
        remove_stale_files(out, manifest)
        if replacing:
            swap_in(out, final.resolve())
        return manifest


def _claim_output(
    final: Path, tokenizer_hash: str, fp: str, overwrite: bool, rank: int, locks: ExitStack
) -> Path:
    """The directory this run writes: `final` itself, or its staging directory when a
    dataset there is to be replaced. Rank 0 takes the writer lock of each (held until `locks`
    closes); the other ranks of an mpirun/srun job write only their own units and rely on it."""
    finish_replacement(final)
    final.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        locks.enter_context(writer_lock(final))
        if (final / WORK_DIR / REPLACED).exists():
            shutil.rmtree(final / WORK_DIR / REPLACED)  # a swap killed at its very end
    if not must_replace(final, tokenizer_hash, fp, overwrite):
        return final
    staging = staging_dir(final.resolve())
    staging.mkdir(exist_ok=True)
    if rank == 0:
        locks.enter_context(writer_lock(staging))
        log(f"building the new dataset in {staging}; it replaces {final} once complete")
    return staging


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
