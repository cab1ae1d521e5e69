"""Reading inputs (data_prep.sources) and sentence splitting (data_prep.sentences)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pytest

from data_prep.errors import PrepError
from data_prep.sentences import detect_lang, split_sentences
from data_prep.sources import SourceStats, expand_inputs, iter_documents

TEXT = "Doc one line one.\nDoc one line two.\n\nDoc two.\n\f\nDoc three.\n\n\n\nDoc four.\n"


def _docs(path: Path | list[Path], **kwargs) -> list[str]:
    return list(iter_documents(path if isinstance(path, list) else [path], **kwargs))


def test_blank_lines_and_form_feeds_both_separate_by_default(tmp_path: Path) -> None:
    """Oracle: the documents written by hand; repeated separators make no empty documents."""
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    assert _docs(path) == [
        "Doc one line one.\nDoc one line two.",
        "Doc two.",
        "Doc three.",
        "Doc four.",
    ]


def test_formfeed_mode_keeps_blank_lines_inside_documents(tmp_path: Path) -> None:
    """Oracle: only the form-feed line splits; the blank lines stay as paragraph breaks."""
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    assert _docs(path, doc_sep="formfeed") == [
        "Doc one line one.\nDoc one line two.\n\nDoc two.",
        "Doc three.\n\n\n\nDoc four.",
    ]


def test_line_mode_is_one_document_per_nonblank_line(tmp_path: Path) -> None:
    """Oracle: the non-blank, non-form-feed lines of TEXT."""
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    assert _docs(path, doc_sep="line") == [
        "Doc one line one.",
        "Doc one line two.",
        "Doc two.",
        "Doc three.",
        "Doc four.",
    ]


def test_crlf_and_bom_are_not_text(tmp_path: Path) -> None:
    """Oracle: Windows line endings and a UTF-8 BOM must not leak into the documents."""
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffFirst.\r\nSame doc.\r\n\r\nSecond.\r\n".encode())
    assert _docs(path) == ["First.\nSame doc.", "Second."]


def test_jsonl_text_field_and_bad_records_counted(tmp_path: Path) -> None:
    """Oracle: the records written; a broken JSON line and a record without the field are
    dropped but counted, never silently."""
    path = tmp_path / "a.jsonl"
    rows = [{"body": "Alpha."}, {"other": 1}, {"body": ""}, {"body": "Beta.\n\nGamma."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    stats = SourceStats()
    assert _docs(path, text_field="body", stats=stats) == ["Alpha.", "", "Beta.\n\nGamma."]
    assert stats.invalid_json_lines == 1
    assert stats.missing_field_records == 1
    assert stats.documents == 3


def test_jsonl_wrong_field_is_a_user_error(tmp_path: Path) -> None:
    """Oracle: no record has the field, which is almost always a wrong --text-field."""
    path = tmp_path / "a.jsonl"
    path.write_text('{"body": "Alpha."}\n')
    with pytest.raises(PrepError, match="--text-field"):
        _docs(path)


@pytest.mark.parametrize(
    ("suffix", "compress"),
    [(".gz", gzip.compress), (".xz", lzma.compress), (".bz2", bz2.compress)],
)
def test_compressed_inputs_read_like_plain_ones(tmp_path: Path, suffix: str, compress) -> None:
    """Oracle: the same bytes uncompressed; also .jsonl inside a compressed file."""
    plain = tmp_path / "a.txt"
    plain.write_text(TEXT)
    packed = tmp_path / ("a.txt" + suffix)
    packed.write_bytes(compress(TEXT.encode()))
    assert _docs(packed) == _docs(plain)
    jsonl = tmp_path / ("b.jsonl" + suffix)
    jsonl.write_bytes(compress(b'{"text": "Inside."}\n'))
    assert _docs(jsonl) == ["Inside."]


def test_invalid_utf8_line_is_dropped_and_counted(tmp_path: Path) -> None:
    """Oracle: only the bad line disappears, and the count says so."""
    path = tmp_path / "a.txt"
    path.write_bytes(b"Good one.\nBad \xff\xfe line.\nGood two.\n")
    stats = SourceStats()
    assert _docs(path, stats=stats) == ["Good one.\nGood two."]
    assert stats.invalid_utf8_lines == 1


def test_binary_file_is_a_user_error(tmp_path: Path) -> None:
    """Oracle: NUL bytes in the first 8 KB mean binary; the message names the file."""
    path = tmp_path / "model.bin"
    path.write_bytes(b"abc\0def" * 10)
    with pytest.raises(PrepError, match="model.bin.*binary"):
        _docs(path)


def test_missing_path_is_a_user_error(tmp_path: Path) -> None:
    """Oracle: the message names the path that does not exist."""
    with pytest.raises(PrepError, match="nope.txt"):
        _docs(tmp_path / "nope.txt")


def test_inputs_without_text_are_a_user_error(tmp_path: Path) -> None:
    """Oracle: files holding only whitespace and separators give no dataset."""
    a = tmp_path / "a.txt"
    a.write_text("\n\n\f\n  \n")
    b = tmp_path / "b.txt"
    b.write_text("")
    with pytest.raises(PrepError, match="no text"):
        _docs([a, b])


def test_directories_expand_sorted_and_skip_hidden(tmp_path: Path) -> None:
    """Oracle: sorted relative paths; dot-files (editor droppings) are not corpus."""
    (tmp_path / "sub").mkdir()
    for name in ["b.txt", "a.txt", "sub/c.txt", ".hidden.txt"]:
        (tmp_path / name).write_text(name)
    names = [p.relative_to(tmp_path).as_posix() for p in expand_inputs([tmp_path])]
    assert names == ["a.txt", "b.txt", "sub/c.txt"]
    assert _docs(tmp_path) == ["a.txt", "b.txt", "sub/c.txt"]


def test_english_sentences() -> None:
    """Oracle: hand-split text; abbreviations, initials, decimals, lowercase continuations and
    wrapped lines do not end a sentence; quotes stay with their sentence."""
    text = (
        "Mr. Smith went to Washington. He said “Hi!” Then he left.\n"
        "Dr. J. Watson arrived at 5 p.m. in St. Louis, e.g. Missouri. It was\n"
        "3.5 km away. Was it? Yes! 2 cats sat.\n\nNew paragraph without a stop"
    )
    assert split_sentences(text, "en") == [
        "Mr. Smith went to Washington.",
        "He said “Hi!”",
        "Then he left.",
        "Dr. J. Watson arrived at 5 p.m. in St. Louis, e.g. Missouri.",
        "It was 3.5 km away.",
        "Was it?",
        "Yes!",
        "2 cats sat.",
        "New paragraph without a stop",
    ]


def test_japanese_sentences_do_not_split_inside_brackets() -> None:
    """Oracle: hand-split text; 。inside 「」『』（）is not a boundary, closing brackets
    stay with their sentence, and lines of a paragraph join with nothing."""
    text = (
        "「雨がやんだ。帰ろう。」と下人は言った。外は暗い！『本当か？』\n"
        "（嘘だ。）そうか？\n\n　はい。いいえ"
    )
    assert split_sentences(text, "ja") == [
        "「雨がやんだ。帰ろう。」と下人は言った。",
        "外は暗い！",
        "『本当か？』（嘘だ。）そうか？",
        "はい。",
        "いいえ",
    ]


def test_auto_language_detection() -> None:
    """Oracle: mostly-CJK text is ja, Latin text is en, and auto splits accordingly."""
    assert detect_lang("羅生門の下で雨やみを待っていた。") == "ja"
    assert detect_lang("It is a truth universally acknowledged.") == "en"
    assert split_sentences("雨だ。晴れだ。", "auto") == ["雨だ。", "晴れだ。"]
    assert split_sentences("It rains. It shines.", "auto") == ["It rains.", "It shines."]
    with pytest.raises(ValueError):
        split_sentences("x", "fr")
