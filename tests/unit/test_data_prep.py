"""The indexed token format (data_prep.shard_format), corpus encoding and merging."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.encode import encode_corpus
from data_prep.errors import PrepError
from data_prep.merge import merge_datasets
from data_prep.sentences import split_sentences
from data_prep.shard_format import (
    FORMAT_VERSION,
    IndexedDataset,
    IndexedShard,
    ShardWriter,
    dtype_for_vocab,
    save_npy,
    verify,
    write_json_atomic,
)
from data_prep.sources import CORPUS_DIR, iter_documents
from data_prep.tokenizer import load_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
SPECIAL_IDS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def _random_docs(rng: np.random.Generator, n_docs: int, vocab: int) -> list[list[list[int]]]:
    """Documents of 0-6 sentences of 0-40 tokens: empty sentences/documents on purpose."""
    return [
        [rng.integers(0, vocab, rng.integers(0, 41)).tolist() for _ in range(rng.integers(0, 7))]
        for _ in range(n_docs)
    ]


def _write_dataset(directory: Path, shards_docs: list[list], vocab: int) -> list[dict]:
    """Write each list of documents as one shard plus a manifest, as encode would."""
    dtype = dtype_for_vocab(vocab)
    entries = []
    for k, docs in enumerate(shards_docs):
        writer = ShardWriter(directory / f"shard_{k:05d}", dtype)
        for doc in docs:
            writer.add_document(doc)
        entries.append(writer.finish())
    write_json_atomic(
        directory / "manifest.json",
        {
            "format_version": FORMAT_VERSION,
            "tokenizer": {"vocab_size": vocab, "hash": "x", "special_ids": SPECIAL_IDS},
            "dtype": dtype.name,
            "num_documents": sum(e["documents"] for e in entries),
            "num_sentences": sum(e["sentences"] for e in entries),
            "num_tokens": sum(e["tokens"] for e in entries),
            "shards": entries,
        },
    )
    return entries


@pytest.mark.parametrize(("vocab", "dtype"), [(131, np.uint16), (70_001, np.uint32)])
def test_round_trip_across_shards(tmp_path: Path, vocab: int, dtype) -> None:
    """Oracle: the Python lists written, with empty sentences and token-less documents
    removed (the writer's contract); global numbering concatenates the shards."""
    rng = np.random.default_rng(0)
    shards_docs = [_random_docs(rng, 37, vocab), _random_docs(rng, 1, vocab) + [[[vocab - 1]]]]
    _write_dataset(tmp_path, shards_docs, vocab)
    expected = [
        [s for s in doc if s] for docs in shards_docs for doc in docs if any(s for s in doc)
    ]
    ds = IndexedDataset(tmp_path)
    assert ds.dtype == np.dtype(dtype) and ds.vocab_size == vocab
    assert ds.special_ids == SPECIAL_IDS and ds.tokenizer_hash == "x"
    assert ds.num_documents == len(expected)
    assert ds.num_sentences == sum(len(d) for d in expected)
    assert ds.num_tokens == sum(len(s) for d in expected for s in d)
    offsets = ds.document_sentence_offsets()
    assert offsets.dtype == np.int64 and len(offsets) == ds.num_documents + 1
    lengths = ds.sentence_lengths()
    assert lengths.dtype == np.int64
    assert lengths.tolist() == [len(s) for d in expected for s in d]
    for d, doc in enumerate(expected):
        first, end = ds.document_sentence_range(d)
        assert (first, end) == (offsets[d], offsets[d + 1])
        got = [ds.sentence(i).tolist() for i in range(first, end)]
        assert got == doc
        assert all(ds.sentence(i).dtype == np.dtype(dtype) for i in range(first, end))
    with pytest.raises(IndexError):
        ds.sentence(ds.num_sentences)


def test_idx_layout_matches_the_spec(tmp_path: Path) -> None:
    """Oracle: the byte layout written in DESIGN/shard_format's docstring, parsed by hand."""
    writer = ShardWriter(tmp_path / "s", np.uint16)
    writer.add_document([[5, 6, 7], [], [8]])
    writer.add_document([])  # skipped: no tokens
    writer.add_document([np.array([9, 10], dtype=np.int64)])
    entry = writer.finish()
    assert entry["documents"] == 2 and entry["sentences"] == 3 and entry["tokens"] == 6
    raw = (tmp_path / "s.idx").read_bytes()
    magic, code, n_sent, n_docs = struct.unpack("<8sQQQ", raw[:32])
    assert (magic, code, n_sent, n_docs) == (b"BERTIDX1", 2, 3, 2)
    assert struct.unpack("<4q", raw[32:64]) == (0, 3, 4, 6)
    assert struct.unpack("<3q", raw[64:]) == (0, 2, 3)
    assert np.fromfile(tmp_path / "s.bin", dtype="<u2").tolist() == [5, 6, 7, 8, 9, 10]
    assert not list(tmp_path.glob("*.tmp"))


def test_batch_writes_equal_document_writes(tmp_path: Path) -> None:
    """Oracle: add_document() one document at a time; add_documents() (the encoder's batch
    path) must write the same bytes, split into any number of calls."""
    rng = np.random.default_rng(3)
    docs = [d for d in _random_docs(rng, 60, 131) if any(d)]
    docs = [[s for s in d if s] for d in docs]
    one = ShardWriter(tmp_path / "one", np.uint16)
    for doc in docs:
        one.add_document(doc)
    a = one.finish()
    batch = ShardWriter(tmp_path / "batch", np.uint16)
    for chunk in (docs[:1], docs[1:25], [], docs[25:]):
        sentences = [s for d in chunk for s in d]
        batch.add_documents(
            np.asarray([t for s in sentences for t in s], dtype=np.int64),
            np.asarray([len(s) for s in sentences], dtype=np.int64),
            np.asarray([len(d) for d in chunk], dtype=np.int64),
        )
    b = batch.finish()
    assert {k: v for k, v in a.items() if k != "name"} == {
        k: v for k, v in b.items() if k != "name"
    }
    assert (tmp_path / "one.idx").read_bytes() == (tmp_path / "batch.idx").read_bytes()


def test_writer_rejects_ids_that_do_not_fit(tmp_path: Path) -> None:
    """Oracle: uint16 holds 0..65535; anything else would wrap around silently."""
    writer = ShardWriter(tmp_path / "s", np.uint16)
    with pytest.raises(ValueError, match="out of range"):
        writer.add_document([[65536]])
    writer.abort()
    assert dtype_for_vocab(65535) == np.uint16 and dtype_for_vocab(65536) == np.uint32


def test_verify_names_a_shard_with_one_flipped_byte(tmp_path: Path) -> None:
    """Oracle: sha256 in the manifest; one flipped byte in a .bin, a missing .idx."""
    rng = np.random.default_rng(1)
    _write_dataset(tmp_path, [_random_docs(rng, 5, 131) for _ in range(3)], 131)
    assert verify(tmp_path) == []
    path = tmp_path / "shard_00001.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert verify(tmp_path) == ["shard_00001"]
    (tmp_path / "shard_00002.idx").unlink()
    assert verify(tmp_path) == ["shard_00001", "shard_00002"]


def test_shard_pickles_as_its_path(tmp_path: Path) -> None:
    """Oracle: DataLoader workers get a small pickle that reopens the memory maps, not a copy
    of the token data."""
    writer = ShardWriter(tmp_path / "s", np.uint16)
    writer.add_document([list(range(50_000))])
    writer.finish()
    shard = IndexedShard(tmp_path / "s")
    blob = pickle.dumps(shard)
    assert len(blob) < 1000
    assert pickle.loads(blob).sentence(0).tolist() == list(range(50_000))


# ---------------------------------------------------------------------------------------------
# Encoding


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """~60 KB of the built-in English corpus and a small WordPiece tokenizer trained on it."""
    tmp = tmp_path_factory.mktemp("corpus")
    text = gzip.decompress((CORPUS_DIR / "gutenberg_excerpt.txt.gz").read_bytes()).decode()
    path = tmp / "en.txt"
    path.write_text(text[200_000:260_000])
    return path, train_tokenizer([path], tmp / "tok", "wordpiece", 800)


def test_encode_matches_direct_tokenization(tmp_path: Path, corpus) -> None:
    """Oracle: splitting and encoding each document directly with the tokenizer; the reader
    returns exactly those ids; shards respect the token limit; the tokenizer is copied."""
    path, tok_dir = corpus
    manifest = encode_corpus([path], tok_dir, tmp_path / "data", shard_tokens=3000)
    tok = load_tokenizer(tok_dir)
    expected: list[list[list[int]]] = []
    too_short = 0
    # The excerpt has no duplicate paragraphs and no runs of spaces, so cleaning is a no-op.
    for doc in iter_documents([path]):
        ids = [tok.encode(s, add_special_tokens=False).ids for s in split_sentences(doc, "en")]
        ids = [s for s in ids if s]
        if sum(len(s) for s in ids) < 8:
            too_short += 1
        else:
            expected.append(ids)
    ds = IndexedDataset(tmp_path / "data")
    assert manifest["stats"]["dropped"] == {
        "too_long": 0,
        "too_few_chars": 0,
        "empty": 0,
        "duplicate": 0,
        "too_short": too_short,
    }
    assert ds.num_documents == manifest["num_documents"] == len(expected)
    assert ds.num_sentences == manifest["num_sentences"]
    assert ds.num_tokens == manifest["num_tokens"]
    got = [
        [ds.sentence(i).tolist() for i in range(*ds.document_sentence_range(d))]
        for d in range(ds.num_documents)
    ]
    assert got == expected
    assert len(manifest["shards"]) > 3
    assert all(s["tokens"] <= 3000 for s in manifest["shards"])
    assert load_tokenizer(tmp_path / "data" / "tokenizer").get_vocab() == tok.get_vocab()
    assert verify(tmp_path / "data") == []


def test_encode_counts_dropped_documents(tmp_path: Path, corpus) -> None:
    """Oracle: a JSONL file with one empty, one too short and one kept record."""
    _, tok_dir = corpus
    path = tmp_path / "a.jsonl"
    rows = ["", "Hi.", "It was the best of times, it was the worst of times. " * 3]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    manifest = encode_corpus([path], tok_dir, tmp_path / "data")
    dropped = manifest["stats"]["dropped"]
    assert dropped["empty"] == 1 and dropped["too_short"] == 1
    assert manifest["num_documents"] == 1 and manifest["stats"]["documents"] == 3


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard_*"))}


def test_encode_replaces_a_dataset_only_on_request(tmp_path: Path, corpus) -> None:
    """Oracle: the first dataset's files, and fresh encodes in empty directories. Another
    command (settings or tokenizer) on a complete dataset is refused and leaves it as it was;
    with overwrite it is replaced by exactly what an empty --out would get, stale shards and
    the staging directory gone; the same command again changes nothing."""
    path, tok_dir = corpus
    out = tmp_path / "data"
    first = encode_corpus([path], tok_dir, out, shard_tokens=3000)
    before = (_files(out), (out / "manifest.json").read_bytes())
    with pytest.raises(PrepError, match="other inputs or settings; pass --overwrite"):
        encode_corpus([path], tok_dir, out, shard_tokens=1_000_000)
    assert (_files(out), (out / "manifest.json").read_bytes()) == before

    second = encode_corpus([path], tok_dir, out, shard_tokens=1_000_000, overwrite=True)
    fresh = encode_corpus([path], tok_dir, tmp_path / "fresh", shard_tokens=1_000_000)
    assert len(second["shards"]) == 1 < len(first["shards"])
    assert _files(out) == _files(tmp_path / "fresh")
    assert {k: v for k, v in second.items() if k != "run"} == {
        k: v for k, v in fresh.items() if k != "run"
    }
    assert not (tmp_path / "data.new").exists() and not (out / ".prep" / "replaced").exists()
    assert verify(out) == []

    again = encode_corpus([path], tok_dir, out, shard_tokens=1_000_000)
    assert again["run"]["encoded_bytes"] == 0 and _files(out) == _files(tmp_path / "fresh")

    other = train_tokenizer([path], tmp_path / "other", "wordpiece", 700)
    with pytest.raises(PrepError, match="another tokenizer .*pass --overwrite"):
        encode_corpus([path], other, out)
    replaced = encode_corpus([path], other, out, overwrite=True)
    assert replaced["tokenizer"]["hash"] == IndexedDataset(out).tokenizer_hash
    assert replaced["tokenizer"]["hash"] != second["tokenizer"]["hash"]


def test_a_replacement_killed_between_its_renames_is_finished(tmp_path: Path, corpus) -> None:
    """Oracle: the state a kill between swap_in's two renames leaves (--out gone, the new
    dataset in OUT.new holding the old one): both datasets are still whole, and the same
    command completes the swap instead of encoding anything."""
    path, tok_dir = corpus
    out = tmp_path / "data"
    encode_corpus([path], tok_dir, out, shard_tokens=3000)
    new = encode_corpus([path], tok_dir, tmp_path / "data.new", shard_tokens=1_000_000)
    expected = _files(tmp_path / "data.new")
    out.rename(tmp_path / "data.new" / ".prep" / "replaced")
    assert verify(tmp_path / "data.new" / ".prep" / "replaced") == []

    again = encode_corpus([path], tok_dir, out, shard_tokens=1_000_000, overwrite=True)
    assert again["run"]["encoded_bytes"] == 0 and again["shards"] == new["shards"]
    assert _files(out) == expected and verify(out) == []
    assert not (tmp_path / "data.new").exists() and not (out / ".prep" / "replaced").exists()


def test_out_and_inputs_must_not_overlap(tmp_path: Path, corpus) -> None:
    """Oracle: the issue's case (--out inside an --input directory: the next run would read
    the shards as text) and its mirror (an input inside --out, which --overwrite would move
    away); both are refused before anything is written."""
    path, tok_dir = corpus
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "a.txt").write_text(path.read_text()[:20_000])
    with pytest.raises(PrepError, match="inside the input directory"):
        encode_corpus([corpus_dir], tok_dir, corpus_dir / "data")
    assert not (corpus_dir / "data").exists()
    with pytest.raises(PrepError, match="is inside --out"):
        encode_corpus([corpus_dir / "a.txt"], tok_dir, tmp_path)
    with pytest.raises(PrepError, match="inside the input directory"):
        train_tokenizer([corpus_dir], corpus_dir / "tok", "wordpiece", 700)


def test_merge_concatenates_datasets(tmp_path: Path, corpus) -> None:
    """Oracle: the two input datasets read separately, in the order given."""
    path, tok_dir = corpus
    half = tmp_path / "half.txt"
    half.write_text(path.read_text()[:20_000])
    a = encode_corpus([path], tok_dir, tmp_path / "a", shard_tokens=4000)
    b = encode_corpus([half], tok_dir, tmp_path / "b")
    merged = merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert merged["num_tokens"] == a["num_tokens"] + b["num_tokens"]
    assert merged["stats"]["dropped"]["too_short"] == (
        a["stats"]["dropped"]["too_short"] + b["stats"]["dropped"]["too_short"]
    )
    assert verify(tmp_path / "m") == []
    m, da, db = (IndexedDataset(tmp_path / x) for x in "mab")
    assert m.num_documents == da.num_documents + db.num_documents
    tail = [m.sentence(da.num_sentences + i).tolist() for i in range(db.num_sentences)]
    assert tail == [db.sentence(i).tolist() for i in range(db.num_sentences)]
    assert (tmp_path / "m" / "tokenizer" / "tokenizer.json").is_file()
    with pytest.raises(PrepError, match="already holds"):
        merge_datasets([tmp_path / "a"], tmp_path / "m")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format_version": 1, "shards": [', "not valid JSON"),
        ("[]", "not a bert-prep manifest"),
        ('{"format_version": 1, "tokenizer": {}, "dtype": "uint16"}', "not a bert-prep manifest"),
        (
            '{"format_version": 1, "tokenizer": {}, "dtype": "uint16", "shards": [3]}',
            "not a bert-prep manifest",
        ),
    ],
)
def test_a_broken_manifest_is_a_user_error(tmp_path: Path, text: str, message: str) -> None:
    """Oracle: what the trainer and `verify` rely on: a cut or foreign manifest.json raises
    PrepError (printed as one line by both CLIs), never a JSON or KeyError traceback."""
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(PrepError, match=message):
        IndexedDataset(tmp_path)
    with pytest.raises(PrepError, match=message):
        verify(tmp_path)


def test_document_hashes_cut_by_a_full_disk_are_an_error(tmp_path: Path) -> None:
    """Oracle: the kernel refuses writes past RLIMIT_FSIZE (EFBIG, as ENOSPC on a full disk).
    np.save drops that failure for a small array and left a cut hashes file (500 of 608
    bytes) under its final name; now it is an OSError naming the file, and nothing stays."""
    target = tmp_path / "unit_00000.npy"
    code = (
        "import resource, signal, sys; from pathlib import Path; import numpy as np; "
        "from data_prep.encode import _save_hashes; "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (500, 500)); "
        f"_save_hashes(Path({str(target)!r}), [np.arange(60, dtype=np.uint64)])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "File too large" in proc.stderr, proc.stderr
    assert str(target) in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "array",
    [np.arange(60, dtype="<u8"), np.zeros(0, dtype="<i8"), np.arange(12).reshape(3, 4)[:, :2]],
)
def test_save_npy_writes_what_np_save_writes(tmp_path: Path, array: np.ndarray) -> None:
    """Oracle: numpy's own np.save of the same array, byte for byte."""
    expected = io.BytesIO()
    np.save(expected, array)
    save_npy(tmp_path / "a.npy", array)
    assert (tmp_path / "a.npy").read_bytes() == expected.getvalue()
