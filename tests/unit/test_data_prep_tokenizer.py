"""Tokenizer training and export (data_prep.tokenizer) on slices of the built-in corpus.

The main oracle is `transformers.AutoTokenizer`: a directory we write must load there with no
code of ours and give the same ids as our encoder, because that is what users of an exported
model will run.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.errors import PrepError
from data_prep.sentences import split_sentences
from data_prep.sources import CORPUS_DIR, iter_documents
from data_prep.tokenizer import (
    SPECIAL_TOKENS,
    continuation_mask,
    load_segmenter,
    load_tokenizer,
    tokenizer_info,
    train_tokenizer,
    write_sample,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

transformers = pytest.importorskip("transformers")


def _english_slice(tmp_path: Path, chars: int = 150_000) -> Path:
    text = gzip.decompress((CORPUS_DIR / "gutenberg_excerpt.txt.gz").read_bytes()).decode()
    path = tmp_path / "en.txt"
    path.write_text(text[:chars])
    return path


def _sentences(path: Path, lang: str, n: int, skip: int = 0) -> list[str]:
    out: list[str] = []
    for doc in iter_documents([path]):
        out.extend(split_sentences(doc, lang))
        if len(out) >= skip + n:
            break
    return out[skip : skip + n]


@pytest.fixture(scope="module")
def english(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("en")
    corpus = _english_slice(tmp)
    return corpus, train_tokenizer([corpus], tmp / "tok", "wordpiece", 1000)


def _assert_same_ids_as_transformers(tok_dir: Path, sentences: list[str]) -> None:
    ours = load_tokenizer(tok_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    for sentence in sentences:
        ids = ours.encode(sentence, add_special_tokens=False).ids
        assert hf(sentence, add_special_tokens=False)["input_ids"] == ids, sentence
        assert hf(sentence)["input_ids"] == [2, *ids, 3], sentence
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id) == (0, 1, 2, 3)
    assert hf.mask_token_id == 4


def test_wordpiece_files_specials_and_metadata(english) -> None:
    """Oracle: the contract in docs/design.md and the trainer: specials at ids 0..4 in order, the
    hash is the sha256 of tokenizer.json, vocab.txt lists the vocabulary in id order, English is
    uncased."""
    _, tok_dir = english
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "bert_tokenizer.json",
    ]:
        assert (tok_dir / name).is_file(), name
    info = tokenizer_info(tok_dir)
    assert info["kind"] == "wordpiece" and info["lowercase"] is True and info["lang"] == "en"
    assert info["vocab_size"] == 1000
    assert info["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert info["hash"] == hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()
    tok = load_tokenizer(tok_dir)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    vocab = (tok_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert vocab == [tok.id_to_token(i) for i in range(info["vocab_size"])]
    # Our encoder path adds no specials; "[MASK]" in text is one token, not split.
    assert "[MASK]" in tok.encode("The Cat [MASK] sat", add_special_tokens=False).tokens
    assert tok.encode("Café", add_special_tokens=False).ids == tok.encode("cafe").ids[1:-1]


def test_wordpiece_matches_transformers(english) -> None:
    """Oracle: AutoTokenizer on real sentences from later in the corpus (unseen mix of
    known and unknown words), with and without [CLS]/[SEP]."""
    corpus, tok_dir = english
    sentences = _sentences(corpus, "en", 40, skip=200) + ["Naïve CAFÉ, [MASK] ##x 東京 tea."]
    _assert_same_ids_as_transformers(tok_dir, sentences)


def test_continuation_mask_wordpiece(english) -> None:
    """Oracle: the vocabulary itself: True exactly for '##' tokens, specials False."""
    _, tok_dir = english
    mask = continuation_mask(tok_dir)
    vocab = load_tokenizer(tok_dir).get_vocab()
    assert mask.dtype == np.bool_ and mask.shape == (len(vocab),)
    assert not mask[:5].any()
    for token, i in vocab.items():
        assert mask[i] == token.startswith("##")


def test_cased_wordpiece_keeps_case(tmp_path: Path, english) -> None:
    """Oracle: with --cased, 'The' and 'the' differ; uncased they are the same ids."""
    corpus, uncased_dir = english
    cased_dir = train_tokenizer([corpus], tmp_path / "cased", "wordpiece", 1000, cased=True)
    cased, uncased = load_tokenizer(cased_dir), load_tokenizer(uncased_dir)
    assert cased.encode("The").ids != cased.encode("the").ids
    assert uncased.encode("The").ids == uncased.encode("the").ids
    assert tokenizer_info(cased_dir)["lowercase"] is False
    _assert_same_ids_as_transformers(cased_dir, ["The Café was Naïve.", "ÉLAN and élan"])


@pytest.mark.parametrize(
    ("kind", "sp_model_type"),
    [("sentencepiece", "unigram"), ("sentencepiece", "bpe"), ("wordpiece", "unigram")],
)
def test_japanese_tokenizers(tmp_path: Path, kind: str, sp_model_type: str) -> None:
    """Oracle: AutoTokenizer on Aozora sentences; ガ and カ must stay distinct (BERT's uncased
    accent stripping would merge them); SentencePiece exports agree with the sentencepiece
    library's own encoding of the trained .model."""
    corpus = CORPUS_DIR / "akutagawa.txt"
    tok_dir = train_tokenizer(
        [corpus], tmp_path / "tok", kind, 2000, lang="auto", sp_model_type=sp_model_type
    )
    info = tokenizer_info(tok_dir)
    assert info["lang"] == "ja" and info["lowercase"] is False
    sentences = _sentences(corpus, "ja", 30, skip=100) + ["ガラスのカラスがパンを食べた。"]
    _assert_same_ids_as_transformers(tok_dir, sentences)
    tok = load_tokenizer(tok_dir)
    assert tok.encode("ガ", add_special_tokens=False).ids != tok.encode("カ").ids[1:-1]
    assert "ガ" in "".join(tok.encode("ガラス", add_special_tokens=False).tokens)
    if kind == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "sentencepiece.model"))
        for sentence in sentences:
            assert sp.encode(sentence) == tok.encode(sentence, add_special_tokens=False).ids
        mask = continuation_mask(tok_dir)
        assert not mask[:5].any()
        assert mask.sum() == sum(
            1 for t, i in tok.get_vocab().items() if i >= 5 and not t.startswith("▁")
        )


def test_mixed_english_japanese_defaults_to_cased(tmp_path: Path) -> None:
    """Oracle: docs/design.md: uncased normalisation turns ガ into カ, so a mostly-English corpus
    with some Japanese (lang resolves to en) must still not be lowercased/accent-stripped."""
    text = gzip.decompress((CORPUS_DIR / "gutenberg_excerpt.txt.gz").read_bytes()).decode()
    path = tmp_path / "mixed.txt"
    ja = (CORPUS_DIR / "akutagawa.txt").read_text(encoding="utf-8")[:5000]
    path.write_text(text[:60_000] + "\n\n" + ja, encoding="utf-8")
    tok_dir = train_tokenizer([path], tmp_path / "tok", "wordpiece", 1000)
    info = tokenizer_info(tok_dir)
    assert info["lang"] == "en" and info["lowercase"] is False
    tok = load_tokenizer(tok_dir)
    assert tok.encode("ガ", add_special_tokens=False).ids != tok.encode("カ").ids[1:-1]


@pytest.mark.parametrize("vocab_size", [3, 9])
def test_vocab_too_small_is_a_user_error(tmp_path: Path, vocab_size: int) -> None:
    """Oracle: fewer than the 5 specials (or < 10) cannot make a usable tokenizer."""
    with pytest.raises(PrepError, match="vocab-size"):
        train_tokenizer([CORPUS_DIR / "akutagawa.txt"], tmp_path / "t", "wordpiece", vocab_size)


def test_edited_tokenizer_json_is_refused(tmp_path: Path, english) -> None:
    """Oracle: the hash in bert_tokenizer.json; a changed tokenizer.json would give ids that
    disagree with shards already written."""
    _, tok_dir = english
    copy = tmp_path / "tok"
    copy.mkdir()
    for path in tok_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    data = json.loads((copy / "tokenizer.json").read_text())
    data["truncation"] = {
        "max_length": 3,
        "strategy": "LongestFirst",
        "stride": 0,
        "direction": "Right",
    }
    (copy / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(PrepError, match="hash"):
        load_tokenizer(copy)


def test_mecab_wordpiece_is_what_bert_japanese_tokenizer_computes(tmp_path: Path) -> None:
    """Oracle: transformers' BertJapaneseTokenizer (MeCab via fugashi + unidic-lite, then
    WordPiece on vocab.txt), loaded by AutoTokenizer from the files we write, on real text
    the tokenizer never saw (livedoor news when shared data is there, else held-out Aozora),
    both directly and through `bert-prep encode`'s shards. Accents survive (ガ ≠ カ)."""
    pytest.importorskip("fugashi")
    pytest.importorskip("unidic_lite")
    corpus = CORPUS_DIR / "akutagawa.txt"
    head = tmp_path / "train.txt"
    text = corpus.read_text(encoding="utf-8")
    cut = len(text) * 4 // 5  # the rest is held out when the shared data is absent
    head.write_text(text[:cut], encoding="utf-8")
    tok_dir = train_tokenizer([head], tmp_path / "tok", "wordpiece", 3000, pretokenize="mecab")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BertJapaneseTokenizer"
    assert config["word_tokenizer_type"] == "mecab"
    assert config["subword_tokenizer_type"] == "wordpiece"
    assert config["mecab_kwargs"] == {"mecab_dic": "unidic_lite"}
    assert config["do_lower_case"] is False
    info = tokenizer_info(tok_dir)
    assert info["pretokenize"] == "mecab" and info["lowercase"] is False

    livedoor = SHARED_DATA / "livedoor-news" / "articles.jsonl.gz"
    held_out = tmp_path / "held_out.txt"
    if livedoor.is_file():
        docs = iter_documents([livedoor], text_field="body")
        held_out.write_text("\n\n".join(next(docs) for _ in range(40)), encoding="utf-8")
    else:
        held_out.write_text(text[cut:], encoding="utf-8")
    sentences = _sentences(held_out, "ja", 300) + ["ガラスのカラスがパンを食べた。ｶﾞｷﾞ！"]
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert type(hf).__name__ == "BertJapaneseTokenizer"
    ours, segment = load_tokenizer(tok_dir), load_segmenter(tok_dir)
    for sentence in sentences:
        ids = ours.encode(segment(sentence), add_special_tokens=False).ids
        assert hf(sentence, add_special_tokens=False)["input_ids"] == ids, sentence
    assert ours.encode(segment("ガ"), add_special_tokens=False).ids != ours.encode("カ").ids[1:-1]

    from data_prep.encode import encode_corpus
    from data_prep.shard_format import IndexedDataset

    encode_corpus([held_out], tok_dir, tmp_path / "data", lang="ja", nfkc="off")
    ds = IndexedDataset(tmp_path / "data")
    first = [ds.sentence(i).tolist() for i in range(*ds.document_sentence_range(0))]
    doc = next(iter_documents([held_out]))
    expected = [hf(s, add_special_tokens=False)["input_ids"] for s in split_sentences(doc, "ja")]
    assert first == [ids for ids in expected if ids]


def test_training_sample_is_bounded(tmp_path: Path) -> None:
    """Oracle: --sample-bytes: the sample file never exceeds the budget by more than one
    sentence per input file, however large the input (here 40x the budget)."""
    text = gzip.decompress((CORPUS_DIR / "gutenberg_excerpt.txt.gz").read_bytes()).decode()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(text[:1_200_000])
    (tmp_path / "in" / "b.txt").write_text(text[1_200_000:2_000_000])
    sample = tmp_path / "sample.txt"
    info = write_sample([tmp_path / "in"], sample, sample_bytes=50_000, lang="auto")
    longest = max(len(s.encode()) for s in _sentences(tmp_path / "in" / "a.txt", "en", 10**6))
    assert 50_000 <= sample.stat().st_size <= 50_000 + 2 * (longest + 1)
    assert info.lang == "en"


def test_a_refused_input_leaves_no_tokenizer_directory(tmp_path: Path) -> None:
    """Oracle: the file system. Shift_JIS text without --encoding is refused (one line in the
    CLI); before, the refusal came after --out had been created, leaving an empty directory
    that looked like a tokenizer's."""
    path = tmp_path / "ja.txt"
    path.write_bytes((CORPUS_DIR / "akutagawa.txt").read_text(encoding="utf-8").encode("cp932"))
    out = tmp_path / "tok"
    with pytest.raises(PrepError, match="--encoding cp932"):
        train_tokenizer([path], out, "sentencepiece", 1000)
    assert not out.exists()
