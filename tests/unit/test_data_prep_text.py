"""Reading inputs (data_prep.sources) and sentence splitting (data_prep.sentences)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import sys
from pathlib import Path

import pytest

from data_prep.errors import PrepError
from data_prep.sentences import detect_lang, split_sentences
from data_prep.sources import (
    CORPUS_DIR,
    ReadConfig,
    SourceStats,
    expand_inputs,
    iter_documents,
    read_range,
    split_points,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"

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


def test_binary_file_is_skipped_and_counted(tmp_path: Path) -> None:
    """Oracle: NUL bytes in the first 8 KB mean binary: the file is skipped with its name and
    reason recorded, the text beside it is read; alone it gives the one-line 'no text' error
    naming it."""
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"abc\0def" * 10)
    text = tmp_path / "a.txt"
    text.write_text("Some text.\n")
    stats = SourceStats()
    assert _docs([binary, text], stats=stats) == ["Some text."]
    assert stats.skipped_files["binary"] == 1 and stats.files == 2
    assert stats.problems == [[str(binary), "binary"]]
    with pytest.raises(PrepError, match="model.bin skipped \\(binary\\)"):
        _docs(binary)


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


# ---------------------------------------------------------------------------------------------
# Formats, encodings and bad input at corpus scale


def test_zstd_reads_like_plain(tmp_path: Path) -> None:
    """Oracle: the same bytes uncompressed (zstandard is the optional 'zstd' extra)."""
    zstandard = pytest.importorskip("zstandard")
    plain = tmp_path / "a.txt"
    plain.write_text(TEXT)
    packed = tmp_path / "a.txt.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(TEXT.encode()))
    assert _docs(packed) == _docs(plain)


def test_zstd_without_zstandard_is_a_one_line_user_error(tmp_path: Path, monkeypatch) -> None:
    """Oracle: the message names the package and the extra to install."""
    path = tmp_path / "a.txt.zst"
    path.write_bytes(b"(\xb5/\xfd\x00\x00")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails as if not installed
    with pytest.raises(PrepError, match=r"zstandard.*bert-pretrain\[zstd\]"):
        _docs(path)


def test_declared_encoding_cp932(tmp_path: Path) -> None:
    """Oracle: Shift_JIS bytes decode to the original text with --encoding cp932; read as
    UTF-8 the lines are undecodable and counted, not silently garbled."""
    text = "羅生門の下で雨やみを待っていた。\n\n下人は途方にくれた。\n"
    path = tmp_path / "sjis.txt"
    path.write_bytes(text.encode("cp932"))
    assert _docs(path, cfg=ReadConfig(encoding="cp932")) == [
        "羅生門の下で雨やみを待っていた。",
        "下人は途方にくれた。",
    ]
    stats = SourceStats()
    with pytest.raises(PrepError, match="no text"):
        _docs(path, stats=stats)
    assert stats.invalid_utf8_lines == 2
    with pytest.raises(PrepError, match="ASCII-compatible"):
        ReadConfig(encoding="utf-16").validate()


def test_shared_aozora_shift_jis_matches_its_utf8_version() -> None:
    """Oracle: shared/data's UTF-8 conversion of the same Aozora file (decode('cp932'))."""
    raw = SHARED / "aozora-akutagawa" / "raw_sjis" / "rashomon.txt"
    if not raw.is_file():
        pytest.skip(f"shared data not found at {SHARED}")
    utf8 = SHARED / "aozora-akutagawa" / "utf8" / "rashomon.txt"
    assert _docs(raw, cfg=ReadConfig(encoding="cp932")) == _docs(utf8)


def test_wikiextractor_documents(tmp_path: Path) -> None:
    """Oracle: hand-written WikiExtractor output: one document per <doc>, the title line
    dropped, every line its own paragraph, HTML escapes undone, text outside <doc> ignored."""
    path = tmp_path / "wiki_00"
    path.write_text(
        '<doc id="1" url="https://x/?curid=1" title="Anarchism">\nAnarchism\n\n'
        "Anarchism is a political philosophy.\nIt is &lt;old&gt; &amp; new.\n</doc>\n"
        "stray line\n"
        '<doc id="2" url="u" title="Tokyo">\nTokyo\n\n東京は日本の首都である。\n</doc>\n'
    )
    assert _docs(path) == [
        "Anarchism is a political philosophy.\n\nIt is <old> & new.",
        "東京は日本の首都である。",
    ]


def test_globs_and_directory_patterns(tmp_path: Path) -> None:
    """Oracle: sorted matches; a directory or glob matching nothing is a one-line user error."""
    for name in ["b.jsonl", "a.jsonl", "notes.md"]:
        (tmp_path / name).write_text('{"text": "x"}\n')
    assert [p.name for p in expand_inputs([str(tmp_path / "*.jsonl")])] == ["a.jsonl", "b.jsonl"]
    assert [p.name for p in expand_inputs([tmp_path], "*.md")] == ["notes.md"]
    with pytest.raises(PrepError, match="no files matching"):
        expand_inputs([tmp_path], "wiki_*")
    with pytest.raises(PrepError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.txt")])


@pytest.mark.parametrize(
    ("compress", "suffix"),
    [(gzip.compress, ".gz"), (lzma.compress, ".xz"), (bz2.compress, ".bz2")],
)
def test_a_cut_compressed_file_says_what_was_kept(tmp_path: Path, compress, suffix) -> None:
    """Oracle: the documents written; a cut file is not "skipped" (most of it is kept) but
    counted as truncated, and its problem entry states exactly the number of documents and
    lines that were read before the cut. An empty file is skipped."""
    (tmp_path / "a_empty.txt").write_bytes(b"")
    body = "".join(f"Document number {i} has some words.\n\n" for i in range(40000)).encode()
    packed = compress(body)
    # bz2 decodes whole 900 KB blocks: cut into the last one so that the first survives.
    (tmp_path / ("b_cut.txt" + suffix)).write_bytes(packed[: len(packed) - 200])
    stats = SourceStats()
    docs = _docs(tmp_path, stats=stats)
    assert 0 < len(docs) < 40000
    assert docs == [f"Document number {i} has some words." for i in range(len(docs))]
    assert dict(stats.skipped_files) == {"empty": 1}
    assert stats.truncated_files == 1 and stats.as_dict()["truncated_files"] == 1
    assert [p for p, _ in stats.problems] == [
        str(tmp_path / "a_empty.txt"),
        str(tmp_path / ("b_cut.txt" + suffix)),
    ]
    reason = stats.problems[1][1]
    assert reason.startswith("truncated")
    # Every complete document is two lines (text, blank); the lines of the document being
    # read at the cut are counted as read too (at most 2 more).
    assert f"kept the {len(docs):,} document(s) " in reason
    lines = int(reason.split("document(s) (")[1].split(" lines")[0].replace(",", ""))
    assert 2 * len(docs) <= lines <= 2 * len(docs) + 2


def _japanese_lines() -> str:
    """The built-in Japanese corpus (UTF-8), one of the issue's inputs."""
    return (CORPUS_DIR / "akutagawa.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize(("codec", "guess"), [("cp932", "cp932"), ("euc-jp", "euc-jp")])
def test_japanese_in_another_encoding_is_refused_with_the_right_guess(
    tmp_path: Path, codec: str, guess: str
) -> None:
    """Oracle: the issue's case: Shift_JIS (or EUC-JP) text read as UTF-8 used to keep a
    fraction of a percent of the text with no error. Now reading stops with one message
    naming the file, the count, and the codec that decodes it; with that codec every
    document comes back as the UTF-8 original gives it."""
    path = tmp_path / "ja.txt"
    path.write_bytes(_japanese_lines().encode(codec))
    with pytest.raises(
        PrepError, match=f"ja.txt: .* lines .* do not decode as utf-8.*--encoding {guess}$"
    ):
        _docs(path)
    utf8 = tmp_path / "utf8.txt"
    utf8.write_text(_japanese_lines(), encoding="utf-8")
    assert _docs(path, cfg=ReadConfig(encoding=guess)) == _docs(utf8)


def test_a_few_undecodable_lines_are_only_counted(tmp_path: Path) -> None:
    """Oracle: the threshold: 10 bad lines among 2,000 are dropped and counted; 11 bad
    lines among 1,000 (1.1%) stop the run, and without a codec that decodes them the message
    says how to find one."""
    good = [f"Line {i} is fine." for i in range(2000)]
    path = tmp_path / "few.txt"
    path.write_bytes("\n".join(good).encode() + b"\n" + b"bad \xff\xfe\xfa\n" * 10)
    stats = SourceStats()
    assert len(_docs(path, stats=stats)) == 1
    assert stats.invalid_utf8_lines == 10
    path.write_bytes("\n".join(good[:989]).encode() + b"\n" + b"bad \x81\xff\n" * 11)
    with pytest.raises(PrepError, match="11 of 1,000 lines \\(1.1%\\).*file -i"):
        _docs(path)


def test_a_50_mb_line_is_dropped_without_being_held(tmp_path: Path) -> None:
    """Oracle: the line is longer than --max-doc-chars, so it is dropped as too long and
    counted; the reader's peak memory stays far below the line's size (tracemalloc)."""
    import tracemalloc

    path = tmp_path / "big.txt"
    with open(path, "wb") as f:
        f.write(b"Before.\n\n")
        chunk = b"x" * (1 << 20)
        for _ in range(50):
            f.write(chunk)
        f.write(b"\n\nAfter.\n")
    stats = SourceStats()
    cfg = ReadConfig(max_doc_chars=1_000_000)
    tracemalloc.start()
    docs = list(read_range(path, cfg, stats))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert docs == ["Before.", None, "After."]
    assert stats.too_long_documents == 1 and stats.documents == 3
    assert peak < 12 * 2**20, peak  # the cap (4 MB + slack), not 50 MB


def test_byte_ranges_read_the_same_documents_as_the_whole_file(tmp_path: Path) -> None:
    """Oracle: reading the whole file; split points must fall on document starts for every
    format and separator, so the ranges' documents concatenate to the same list."""
    text = "".join(
        f"Para {i} line one.\nline two {i}.\n" + ("\n" if i % 3 else "\n\f\n\n") for i in range(300)
    )
    cases = {
        "blank": ("a.txt", text, ReadConfig()),
        "formfeed": ("a.txt", text, ReadConfig(doc_sep="formfeed")),
        "line": ("a.txt", text, ReadConfig(doc_sep="line")),
        "jsonl": (
            "a.jsonl",
            "".join(json.dumps({"text": f"r{i}"}) + "\n" for i in range(500)),
            ReadConfig(),
        ),
        "wiki": (
            "w",
            "".join(f'<doc id="{i}" title="T{i}">\nT{i}\nBody {i}.\n</doc>\n' for i in range(300)),
            ReadConfig(),
        ),
    }
    for name, (filename, content, cfg) in cases.items():
        path = tmp_path / name / filename
        path.parent.mkdir()
        path.write_text(content)
        whole = list(read_range(path, cfg, SourceStats()))
        points = split_points(path, 997, cfg)
        assert len(points) > 3, name
        bounds = [0, *points, None]
        parts = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            parts.extend(read_range(path, cfg, SourceStats(), start, end))
        assert parts == whole, name
