"""The indexed token format: writer (used by `bert-prep`) and memory-mapped reader (the trainer).

A dataset directory holds `manifest.json`, `tokenizer/` and shards. Per shard:

- `NAME.bin`: the token ids of all sentences, back to back (uint16 when the vocabulary has
  at most 65535 entries, else uint32).
- `NAME.idx`: little-endian; 8-byte magic b"BERTIDX1", uint64 dtype code (= itemsize, 2 or
  4), uint64 n_sentences, uint64 n_documents, int64[n_sentences + 1] token offsets of sentence
  starts, int64[n_documents + 1] sentence offsets of document starts.

Readers memory-map both files, so opening a dataset costs O(1) RAM in its size and DataLoader
workers share the page cache. Global sentence/document numbers run over the shards in manifest
order.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_prep.errors import PrepError

MAGIC = b"BERTIDX1"
FORMAT_VERSION = 1
# Every tokenizer bert-prep writes holds these five tokens at ids 0..4, in this order; the
# shards, the masking and the model rely on it. The one definition of the special-token ids.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
SPECIAL_TOKEN_COUNT = len(SPECIAL_TOKENS)
MANIFEST = "manifest.json"
_HEADER = np.dtype([("magic", "S8"), ("code", "<u8"), ("sentences", "<u8"), ("documents", "<u8")])
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32; halves disk and page cache
    for the usual 30k-64k vocabularies."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _fsync_rename(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _with_path(exc: OSError, path: Path) -> OSError:
    """The same error naming `path` (a failed write() reports no file name of its own)."""
    if exc.filename is not None:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to a temporary name, fsync, rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _fsync_rename(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _with_path(exc, tmp) from None


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write `array` as a `.npy` file (what np.save writes) and fsync it.

    np.save hands small arrays to C stdio and drops a failed write without an error (measured
    with numpy 2.4: a 608-byte array under a 500-byte file-size limit left a cut file and no
    exception), so the header and the data go through Python's file object here, where a full
    disk raises OSError."""
    array = np.ascontiguousarray(array)
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, np.lib.format.header_data_from_array_1_0(array)
        )
        handle.write(array.data)
        handle.flush()
        os.fsync(handle.fileno())


class ShardWriter:
    """Stream documents into one shard; files appear (atomically renamed) only on finish()."""

    def __init__(self, prefix: str | Path, dtype: np.dtype | type | str) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype.itemsize not in _DTYPES or self.dtype.kind != "u":
            raise ValueError(f"shard dtype must be uint16 or uint32, got {self.dtype}")
        self._max_id = np.iinfo(self.dtype).max
        self._bin_tmp = self.prefix.with_name(self.prefix.name + ".bin.tmp")
        self._idx_tmp = self.prefix.with_name(self.prefix.name + ".idx.tmp")
        self._bin = open(self._bin_tmp, "wb")  # closed in finish() or abort()
        self._bin_hash = hashlib.sha256()
        self._token_offsets = array("q", [0])  # 8 bytes per sentence, not a Python int each
        self._doc_offsets = array("q", [0])

    @property
    def num_tokens(self) -> int:
        return self._token_offsets[-1]

    @property
    def num_documents(self) -> int:
        return len(self._doc_offsets) - 1

    def add_document(self, sentences: Sequence[Sequence[int] | np.ndarray]) -> bool:
        """Append one document; empty sentences are skipped, and a document without tokens is
        not written at all (returns False) so readers never meet empty documents."""
        arrays = []
        for sentence in sentences:
            ids = np.asarray(sentence)
            if ids.size == 0:
                continue
            if ids.min() < 0 or ids.max() > self._max_id:
                raise ValueError(
                    f"token id out of range for {self.dtype}: {ids.min()}..{ids.max()}"
                )
            arrays.append(ids.astype(self.dtype, copy=False))
        if not arrays:
            return False
        for ids in arrays:
            self._write(ids.tobytes())
            self._token_offsets.append(self._token_offsets[-1] + ids.size)
        self._doc_offsets.append(len(self._token_offsets) - 1)
        return True

    def add_documents(
        self, ids: np.ndarray, sentence_lengths: np.ndarray, document_sentences: np.ndarray
    ) -> None:
        """Append many documents at once: `ids` back to back, split by `sentence_lengths`
        (all > 0) into sentences, grouped by `document_sentences` (all > 0) into documents;
        the same bytes as add_document() one document at a time."""
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) > self._max_id):
            raise ValueError(f"token id out of range for {self.dtype}: {ids.min()}..{ids.max()}")
        self._write(ids.astype(self.dtype, copy=False).tobytes())
        ends = self._token_offsets[-1] + np.cumsum(sentence_lengths, dtype=np.int64)
        self._token_offsets.extend(array("q", ends.tobytes()))
        doc_ends = self._doc_offsets[-1] + np.cumsum(document_sentences, dtype=np.int64)
        self._doc_offsets.extend(array("q", doc_ends.tobytes()))

    def _write(self, data: bytes) -> None:
        try:
            self._bin.write(data)
        except OSError as exc:
            raise _with_path(exc, self._bin_tmp) from None
        self._bin_hash.update(data)

    def close(self) -> dict:
        """Write the index and fsync both files under their temporary names; return the
        manifest entry. The shard is not visible until publish()."""
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
        except OSError as exc:
            raise _with_path(exc, self._bin_tmp) from None
        self._bin.close()
        n_sentences = len(self._token_offsets) - 1
        header = np.array(
            [(MAGIC, self.dtype.itemsize, n_sentences, self.num_documents)], dtype=_HEADER
        )
        idx = (
            header.tobytes()
            + np.frombuffer(self._token_offsets, dtype=np.int64).astype("<i8").tobytes()
            + np.frombuffer(self._doc_offsets, dtype=np.int64).astype("<i8").tobytes()
        )
        try:
            with open(self._idx_tmp, "wb") as f:
                f.write(idx)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise _with_path(exc, self._idx_tmp) from None
        return {
            "name": self.prefix.name,
            "documents": self.num_documents,
            "sentences": n_sentences,
            "tokens": self.num_tokens,
            "bin_sha256": self._bin_hash.hexdigest(),
            "idx_sha256": hashlib.sha256(idx).hexdigest(),
        }

    def publish(self) -> None:
        """Rename the closed temporary files to their final names (atomic on POSIX)."""
        publish_shard(self.prefix)

    def finish(self) -> dict:
        """close() + publish(): write, fsync and rename both files; return the entry."""
        entry = self.close()
        self.publish()
        return entry

    def abort(self) -> None:
        """Close and delete the temporary files (after an error)."""
        try:
            self._bin.close()
        except OSError:
            pass  # the buffer could not be flushed (disk full): the file goes anyway
        self._bin_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)


def publish_shard(prefix: Path) -> None:
    """Rename PREFIX.bin.tmp/.idx.tmp (closed and fsynced) to PREFIX.bin/.idx; the directory
    entry is fsynced too, so the rename survives a crash."""
    for suffix in (".bin", ".idx"):
        os.replace(
            prefix.with_name(prefix.name + suffix + ".tmp"), prefix.with_name(prefix.name + suffix)
        )
    fsync_dir(prefix.parent)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is atomic
    finally:
        os.close(fd)


class IndexedShard:
    """One shard, memory-mapped. Pickles as its path, so DataLoader workers reopen the maps
    instead of copying the data."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        if not idx_path.is_file() or not bin_path.is_file():
            raise PrepError(f"{self.prefix}: .bin or .idx missing; re-run `bert-prep encode`")
        header = np.fromfile(idx_path, dtype=_HEADER, count=1)
        if header.size != 1 or header["magic"][0] != MAGIC or int(header["code"][0]) not in _DTYPES:
            raise PrepError(f"{idx_path}: not a BERTIDX1 index; re-run `bert-prep encode`")
        self.dtype = _DTYPES[int(header["code"][0])]
        n_sent = int(header["sentences"][0])
        n_docs = int(header["documents"][0])
        expected = _HEADER.itemsize + 8 * (n_sent + 1 + n_docs + 1)
        if idx_path.stat().st_size != expected:
            raise PrepError(f"{idx_path}: truncated or corrupt; run `bert-prep verify`")
        self.token_offsets = np.memmap(
            idx_path, dtype="<i8", mode="r", offset=_HEADER.itemsize, shape=(n_sent + 1,)
        )
        self.document_offsets = np.memmap(
            idx_path,
            dtype="<i8",
            mode="r",
            offset=_HEADER.itemsize + 8 * (n_sent + 1),
            shape=(n_docs + 1,),
        )
        n_tokens = int(self.token_offsets[-1])
        if bin_path.stat().st_size != n_tokens * self.dtype.itemsize:
            raise PrepError(f"{bin_path}: size does not match its index; run `bert-prep verify`")
        # np.memmap refuses empty files.
        self.tokens = (
            np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(n_tokens,))
            if n_tokens
            else np.zeros(0, dtype=self.dtype)
        )

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    @property
    def num_sentences(self) -> int:
        return len(self.token_offsets) - 1

    @property
    def num_documents(self) -> int:
        return len(self.document_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.token_offsets[-1])

    def sentence(self, i: int) -> np.ndarray:
        """Token ids of local sentence i (a read-only view into the memory map)."""
        return self.tokens[self.token_offsets[i] : self.token_offsets[i + 1]]


class IndexedDataset:
    """All shards of a dataset directory, numbered globally in manifest order."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.shards = [IndexedShard(self.directory / s["name"]) for s in self.manifest["shards"]]
        for shard, entry in zip(self.shards, self.manifest["shards"], strict=True):
            counts = (shard.num_documents, shard.num_sentences, shard.num_tokens)
            if counts != (entry["documents"], entry["sentences"], entry["tokens"]):
                raise PrepError(
                    f"{shard.prefix}: counts differ from manifest; run `bert-prep verify`"
                )
        self._sentence_base = np.cumsum(
            [0] + [s.num_sentences for s in self.shards], dtype=np.int64
        )
        self._document_base = np.cumsum(
            [0] + [s.num_documents for s in self.shards], dtype=np.int64
        )

    @property
    def num_documents(self) -> int:
        return int(self._document_base[-1])

    @property
    def num_sentences(self) -> int:
        return int(self._sentence_base[-1])

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def tokenizer_hash(self) -> str:
        return self.manifest["tokenizer"]["hash"]

    @property
    def special_ids(self) -> dict[str, int]:
        """{'pad': 0, 'unk': 1, 'cls': 2, 'sep': 3, 'mask': 4}."""
        return dict(self.manifest["tokenizer"]["special_ids"])

    def _locate(self, base: np.ndarray, i: int, count: int, what: str) -> tuple[int, int]:
        if not 0 <= i < count:
            raise IndexError(f"{what} {i} out of range [0, {count})")
        shard = int(np.searchsorted(base, i, side="right")) - 1
        return shard, i - int(base[shard])

    def sentence(self, i: int) -> np.ndarray:
        """Token ids of global sentence i."""
        shard, local = self._locate(self._sentence_base, i, self.num_sentences, "sentence")
        return self.shards[shard].sentence(local)

    def document_sentence_range(self, doc: int) -> tuple[int, int]:
        """(first, end) global sentence numbers of global document `doc`."""
        shard, local = self._locate(self._document_base, doc, self.num_documents, "document")
        offsets = self.shards[shard].document_offsets
        base = int(self._sentence_base[shard])
        return base + int(offsets[local]), base + int(offsets[local + 1])

    def sentence_lengths(self) -> np.ndarray:
        """int64[num_sentences]: tokens per sentence, from the offsets only."""
        parts = [np.diff(s.token_offsets) for s in self.shards]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def document_sentence_offsets(self) -> np.ndarray:
        """int64[num_documents + 1]: global sentence number where each document starts."""
        parts = [
            np.asarray(s.document_offsets[:-1]) + b
            for s, b in zip(self.shards, self._sentence_base[:-1], strict=True)
        ]
        parts.append(np.array([self.num_sentences], dtype=np.int64))
        return np.concatenate(parts).astype(np.int64)


_MANIFEST_KEYS = {"format_version": int, "tokenizer": dict, "dtype": str, "shards": list}
"""What every reader of a manifest relies on, with its JSON type."""


def read_manifest(directory: str | Path) -> dict:
    """manifest.json of a dataset directory, with a user error if it is not one."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise PrepError(f"{path}: missing; pass a directory written by `bert-prep encode`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrepError(
            f"{path}: not valid JSON ({exc}), probably cut short; run `bert-prep encode` "
            "again with the same command to rewrite it"
        ) from None
    if (
        not isinstance(manifest, dict)
        or not all(isinstance(manifest.get(key), kind) for key, kind in _MANIFEST_KEYS.items())
        or not all(isinstance(e, dict) and "name" in e for e in manifest["shards"])
    ):
        raise PrepError(
            f"{path}: not a bert-prep manifest (it needs {', '.join(_MANIFEST_KEYS)}); run "
            "`bert-prep encode` again with the same command to rewrite it"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PrepError(
            f"{path}: format_version {manifest.get('format_version')!r}, expected "
            f"{FORMAT_VERSION}; re-run `bert-prep encode` with this version"
        )
    return manifest


def file_sha256(path: Path) -> str | None:
    """sha256 of a file read in 1 MB chunks (shards can be gigabytes); None if it is missing."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(directory: str | Path) -> list[str]:
    """Re-hash every shard; return the names of shards that are missing or differ."""
    directory = Path(directory)
    bad = []
    for entry in read_manifest(directory)["shards"]:
        prefix = directory / entry["name"]
        if (
            file_sha256(prefix.with_name(prefix.name + ".bin")) != entry["bin_sha256"]
            or file_sha256(prefix.with_name(prefix.name + ".idx")) != entry["idx_sha256"]
        ):
            bad.append(entry["name"])
    return bad
