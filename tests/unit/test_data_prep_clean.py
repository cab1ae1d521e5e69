"""Cleaning (data_prep.clean) and exact-duplicate detection (data_prep.dedupe)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.clean import CleanConfig, clean_text, length_reason
from data_prep.dedupe import HashSet, doc_hashes
from data_prep.encode import encode_corpus
from data_prep.errors import PrepError
from data_prep.tokenizer import train_tokenizer


def test_default_cleaning() -> None:
    """Oracle: hand-cleaned text: controls gone (tab and newline kept as whitespace), runs of
    spaces folded, line ends trimmed, 3+ newlines → one blank line; English is not NFKC'd."""
    raw = "A\x00B\x1b[0m  c\t\td \u00a0 e  \nnext\x7f line   \n\n\n\nﬁ ①"
    assert clean_text(raw, CleanConfig(), "en") == "AB[0m c d e\nnext line\n\nﬁ ①"


def test_nfkc_auto_is_for_japanese_only_and_never_strips_accents() -> None:
    """Oracle: unicodedata NFKC by hand: full-width Latin/digits and half-width katakana fold,
    the voiced mark stays (ｶﾞ → ガ, never カ); English keeps its ligature under auto."""
    ja = "ＡＢＣ１２３　ｶﾞｷﾞ　パン"
    assert clean_text(ja, CleanConfig(), "ja") == "ABC123 ガギ パン"
    assert clean_text("ﬁne", CleanConfig(), "en") == "ﬁne"
    assert clean_text("ﬁne", CleanConfig(nfkc="on"), "en") == "fine"
    assert clean_text(ja, CleanConfig(nfkc="off"), "ja") == "ＡＢＣ１２３ ｶﾞｷﾞ パン"
    assert clean_text("Hello World", CleanConfig(lowercase=True), "en") == "hello world"


def test_flags_turn_steps_off_and_lengths_have_reasons() -> None:
    """Oracle: the input unchanged with every step off; reasons per DROP_REASONS."""
    raw = "x\x01  y\n\n\n\nz"
    off = CleanConfig(nfkc="off", remove_control=False, fold_whitespace=False)
    assert clean_text(raw, off, "en") == raw
    cfg = CleanConfig(min_doc_chars=5)
    assert length_reason("   ", cfg) == "empty"
    assert length_reason("abc", cfg) == "too_few_chars"
    assert length_reason("abcdef", cfg) is None
    with pytest.raises(PrepError, match="--nfkc"):
        CleanConfig(nfkc="maybe").validate()


def test_hash_set_matches_a_python_set() -> None:
    """Oracle: Python's set on the same stream of batches (duplicates inside a batch, across
    batches, forced collisions in the low bits, growth from a tiny table, the value 0)."""
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**63, 3000, dtype=np.uint64)
    pool[:50] = (pool[:50] & ~np.uint64(0xFFFF)) | np.uint64(7)  # same low 16 bits
    pool[50] = 0
    hs = HashSet(capacity=4)
    ref: set[int] = set()
    for _ in range(40):
        batch = rng.choice(pool, size=rng.integers(0, 300))
        expected = []
        for value in batch.tolist():
            value = value or 1
            expected.append(value not in ref)
            ref.add(value)
        assert hs.add(batch).tolist() == expected
    assert len(hs) == len(ref)
    assert hs.nbytes <= 32 * len(ref)  # 8 bytes a slot at load >= 1/4 (right after growth)


def test_doc_hashes_are_content_hashes() -> None:
    """Oracle: equal texts hash equal, different texts differently, never to 0 (empty mark)."""
    h = doc_hashes(["a", "b", "a", "", "é"])
    assert h[0] == h[2] and len({int(x) for x in h}) == 4 and (h != 0).all()


def test_encode_drops_duplicates_across_files_counting_each_reason(tmp_path: Path) -> None:
    """Oracle: a hand-built JSONL corpus with a known number of documents per drop reason;
    the first copy of a duplicate (in input order) is the one kept."""
    words = "The quick brown fox jumps over the lazy dog again and again."
    docs_a = [f"{words} {i}." for i in range(6)] + ["", "  ", "Tiny."]
    docs_b = [f"{words} {i}." for i in range(4)]  # four duplicates of file a
    docs_b += [f"{words}  {i}." for i in range(6, 8)]  # two new ones
    docs_b += [f"{words}   7."]  # equal to the previous one after whitespace folding
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, docs in (("a.jsonl", docs_a), ("b.jsonl", docs_b)):
        (inputs / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (inputs / "c.jsonl").write_text(json.dumps({"text": "x" * 500}) + "\n")
    tok = train_tokenizer([inputs], tmp_path / "tok", "wordpiece", 200)
    manifest = encode_corpus(
        [inputs], tok, tmp_path / "data", pattern="*.jsonl", unit_bytes=300, max_doc_chars=400
    )
    assert manifest["stats"]["dropped"] == {
        "too_long": 1,
        "too_few_chars": 0,
        "empty": 2,
        "duplicate": 5,
        "too_short": 1,
    }
    assert manifest["num_documents"] == 8 and manifest["stats"]["documents"] == 17
    assert manifest["plan"]["units"] >= 3  # the duplicates cross unit boundaries
