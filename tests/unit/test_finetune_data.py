"""Fine-tuning input readers (pretrain/finetune/data.py).

Oracle: small files written here whose contents are known cell by cell; errors must be
DataError (a ConfigError, shown as one line by the CLI) naming the file.
"""

from __future__ import annotations

import gzip
import json

import pytest

from pretrain.finetune import data
from pretrain.finetune.data import DataError, TextExample, TokenExample


def write(path, text: str):
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_tsv_keeps_quotes_as_text_and_reads_gzip(tmp_path):
    """GLUE TSVs are unquoted: a leading quote is part of the sentence, not CSV quoting."""
    path = write(tmp_path / "train.tsv.gz", 'sentence\tlabel\n"a" quoted start \t1\nplain\t0\n')
    examples = data.read_text_examples(path)
    assert examples == [
        TextExample('"a" quoted start ', None, "1"),
        TextExample("plain", None, "0"),
    ]


def test_csv_quoting_pair_columns_and_bom(tmp_path):
    path = write(tmp_path / "d.csv", '\ufeffpremise,hypothesis,label\n"x, y",z,yes\nu,v,no\n')
    examples = data.read_text_examples(
        path, text_column="premise", text_b_column="hypothesis", pair=True
    )
    assert examples == [TextExample("x, y", "z", "yes"), TextExample("u", "v", "no")]


def test_default_columns_for_pairs(tmp_path):
    path = write(tmp_path / "p.tsv", "sentence1\tsentence2\tlabel\na\tb\t1\n")
    assert data.read_text_examples(path, pair=True) == [TextExample("a", "b", "1")]


def test_jsonl_numbers_become_label_strings(tmp_path):
    rows = [{"body": "text one", "category": 3}, {"body": "two", "category": "x"}]
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples = data.read_text_examples(path, text_column="body", label_column="category")
    assert [e.label for e in examples] == ["3", "x"]


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028 and U+0085 verbatim (livedoor news has
    U+2028): only LF ends a JSONL record, and CRLF files read the same."""
    rows = [{"text": "first\u2028second\x85third", "label": "a"}, {"text": "x\x1cy", "label": "b"}]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    for name, newline in (("lf.jsonl", "\n"), ("crlf.jsonl", "\r\n")):
        path = write(tmp_path / name, newline.join(lines) + newline)
        examples = data.read_text_examples(path)
        assert examples == [TextExample(r["text"], None, r["label"]) for r in rows]


def test_unlabelled_test_file_is_accepted_only_when_allowed(tmp_path):
    path = write(tmp_path / "test.tsv", "index\tsentence\n0\tfoo\n")
    assert data.read_text_examples(path, require_labels=False) == [TextExample("foo")]
    with pytest.raises(DataError, match="none of the columns index, sentence"):
        data.read_text_examples(path)


@pytest.mark.parametrize(
    ("name", "text", "kwargs", "message"),
    [
        ("e.tsv", "", {}, "the file is empty"),
        ("h.tsv", "sentence\tlabel\n", {}, "no examples"),
        ("w.tsv", "sentence\tlabel\na\t1\t2\n", {}, "line 2 has 3 fields"),
        ("c.tsv", "sentence\tlabel\na\t1\n", {"text_column": "txt"}, "no column 'txt'"),
        ("l.tsv", "sentence\tlabel\na\t1\n", {"label_column": "y"}, "no column 'y'"),
        ("j.jsonl", '{"text": "a", "label": 1}\nnot json\n', {}, "line 2: not JSON"),
        ("m.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', {}, "line 2 has no value"),
        ("x.parquet", "a", {}, "unknown file type"),
        ("b.tsv", "sentence\tlabel\na\t \n", {}, "empty label"),
    ],
)
def test_text_file_errors_name_the_file(tmp_path, name, text, kwargs, message):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError, match=message) as info:
        data.read_text_examples(path, **kwargs)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.read_text_examples(tmp_path / "nope.tsv")


def test_conll_tab_and_conll2003_columns(tmp_path):
    """token<TAB>tag (NCBI) and 'token POS chunk tag' (CoNLL-2003, -DOCSTART- skipped)."""
    path = write(tmp_path / "a.tsv", "\nBRCA1\tO\nbreast\tB-Disease\ncancer\tI-Disease\n\n\nx\tO\n")
    assert data.read_token_examples(path) == [
        TokenExample(("BRCA1", "breast", "cancer"), ("O", "B-Disease", "I-Disease")),
        TokenExample(("x",), ("O",)),
    ]
    path = write(
        tmp_path / "b.conll", "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
    )
    assert data.read_token_examples(path) == [TokenExample(("EU", "rejects"), ("B-ORG", "O"))]


def test_token_jsonl(tmp_path):
    path = write(tmp_path / "n.jsonl", json.dumps({"tokens": ["a", "b"], "tags": ["B-X", "O"]}))
    assert data.read_token_examples(path) == [TokenExample(("a", "b"), ("B-X", "O"))]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.tsv", "a\tB-X\nb\tFOO\n", "line 2: tag 'FOO' is not a BIO tag"),
        ("t.tsv", "a\tO\nlonely\n", "line 2: expected 'token<TAB>tag'"),
        ("t.tsv", "\n\n", "the file is empty"),
        ("t.tsv", "-DOCSTART-\tO\n\n", "no sentences"),
        ("t.jsonl", '{"tokens": ["a"], "tags": ["O", "O"]}', "1 tokens but 2 tags"),
        ("t.jsonl", '{"tokens": "a b", "tags": ["O"]}', "must be lists"),
    ],
)
def test_token_file_errors(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError, match=message):
        data.read_token_examples(path)


def test_sample_is_fixed_and_ordered():
    items = list(range(100))
    first = data.sample(items, 10)
    assert first == data.sample(items, 10) == sorted(first)
    assert len(set(first)) == 10
    assert data.sample(items, 1000) is items
