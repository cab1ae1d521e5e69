"""Reading fine-tuning data: TSV/CSV with a header, JSONL, and CoNLL token<TAB>tag files.

Every reader returns plain examples and raises `DataError` (a one-line message naming the file
and, where it helps, the line) for anything a user can fix: a missing or empty file, a missing
column, a row of the wrong width, a tag that is not BIO. Any of the formats may be gzipped
(`.gz`, e.g. SST-2's train.tsv.gz).

Formats by file name (after stripping `.gz`):

    .tsv .tab              tab-separated, first line = column names, no quoting (GLUE style:
                           quote characters are part of the text)
    .csv                   comma-separated with standard CSV quoting, first line = column names
    .jsonl .ndjson .json   one JSON object per line; its keys are the columns
    .conll .iob .bio .txt  `token<TAB>tag` (or space-separated, token first and tag last, as in
                           CoNLL-2003), blank line between sentences, `-DOCSTART-` lines skipped

For the token-classification task a `.tsv` file is read as CoNLL (NCBI-disease ships its CoNLL
files as `.tsv`), and a JSONL file holds one sentence per line as a token list and a tag list.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import ConfigError

TEXT_COLUMNS = ("text", "sentence", "sentence1", "text_a", "question")
"""Tried in order when --text-column is not given."""
TEXT_B_COLUMNS = ("text_b", "sentence2", "passage")
"""Tried in order for the second text of the pair task when --text-b-column is not given."""
LABEL_COLUMNS = ("label", "labels", "category", "class")
TOKEN_COLUMNS = ("tokens", "words")
TAG_COLUMNS = ("tags", "ner_tags", "labels", "label")

_BIO = re.compile(r"^(O|[BI]-.+)$")


class DataError(ConfigError):
    """A problem with an input file that the user can fix; the message is one line."""


@dataclass(frozen=True)
class TextExample:
    """One sentence (or sentence pair) and its label; label is None in unlabelled test files."""

    text: str
    text_b: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class TokenExample:
    """One pre-tokenised sentence with one BIO tag per token (tags None when unlabelled)."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...] | None = None


def file_format(path: Path, task: str) -> str:
    """'tsv', 'csv', 'jsonl' or 'conll' from the file name (see the module docstring)."""
    name = path.name.lower().removesuffix(".gz")
    suffix = Path(name).suffix
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if task == "ner":
        if suffix in (".tsv", ".tab", ".conll", ".iob", ".bio", ".txt", ".iob2"):
            return "conll"
    else:
        if suffix in (".tsv", ".tab"):
            return "tsv"
        if suffix == ".csv":
            return "csv"
    known = ".tsv, .conll, .txt, .jsonl" if task == "ner" else ".tsv, .csv, .jsonl"
    raise DataError(
        f"{path}: unknown file type {suffix or '(none)'!r} for --task {task} "
        f"(expected {known}, optionally .gz)"
    )


def _read_text(path: Path) -> str:
    """The whole file as text (gzip-aware, UTF-8 with an optional byte-order mark)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        raw = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: cannot read: {error}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def _lines(text: str) -> list[str]:
    """Lines ended by LF (or CR LF) only: str.splitlines() would also cut at U+2028, U+0085
    and other separators that JSON strings and tokens may hold verbatim."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_rows(path: Path, fmt: str) -> tuple[list[str], list[tuple[int, dict[str, object]]]]:
    """Column names and (line number, row) pairs of a TSV, CSV or JSONL file."""
    text = _read_text(path)
    if fmt == "jsonl":
        return _read_jsonl(path, text)
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text))
    try:
        lines = list(reader)
    except csv.Error as error:
        raise DataError(f"{path}: line {reader.line_num}: {error}") from None
    header = [name.strip() for name in lines[0]]
    if len(set(header)) != len(header):
        raise DataError(f"{path}: repeated column name in the header {header}")
    rows = []
    for number, fields in enumerate(lines[1:], start=2):
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank line
        if len(fields) != len(header):
            raise DataError(
                f"{path}: line {number} has {len(fields)} fields, the header has {len(header)} "
                f"({', '.join(header)})"
            )
        rows.append((number, dict(zip(header, fields, strict=True))))
    return header, rows


def _read_jsonl(path: Path, text: str) -> tuple[list[str], list[tuple[int, dict[str, object]]]]:
    rows: list[tuple[int, dict[str, object]]] = []
    columns: dict[str, None] = {}
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object per line")
        columns.update(dict.fromkeys(row))
        rows.append((number, row))
    return list(columns), rows


def _pick_column(
    path: Path, columns: Sequence[str], wanted: str | None, candidates: Sequence[str], option: str
) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(
                f"{path}: no column {wanted!r} (columns: {', '.join(columns)}); check {option}"
            )
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise DataError(
        f"{path}: none of the columns {', '.join(columns)} is one of the defaults "
        f"({', '.join(candidates)}): pass {option}"
    )


def _cell(path: Path, number: int, row: dict[str, object], column: str) -> str:
    value = row.get(column)
    if value is None:
        raise DataError(f"{path}: line {number} has no value for column {column!r}")
    if isinstance(value, (dict, list)):
        raise DataError(f"{path}: line {number}: column {column!r} is not a string or number")
    return str(value)


def read_text_examples(
    path: Path,
    *,
    text_column: str | None = None,
    text_b_column: str | None = None,
    label_column: str | None = None,
    pair: bool = False,
    require_labels: bool = True,
) -> list[TextExample]:
    """Sentences (pairs when `pair`) and labels from a TSV/CSV/JSONL file.

    With `require_labels=False` (test files) a file without the label column is accepted and
    its examples carry label None.
    """
    fmt = file_format(path, "pair" if pair else "classify")
    columns, rows = read_rows(path, fmt)
    if not rows:
        raise DataError(f"{path}: no examples (only a header)")
    text_col = _pick_column(path, columns, text_column, TEXT_COLUMNS, "--text-column")
    b_col = None
    if pair:
        b_col = _pick_column(path, columns, text_b_column, TEXT_B_COLUMNS, "--text-b-column")
    label_col: str | None
    if require_labels or label_column is not None and label_column in columns:
        label_col = _pick_column(path, columns, label_column, LABEL_COLUMNS, "--label-column")
    else:
        label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    examples = []
    for number, row in rows:
        text = _cell(path, number, row, text_col)
        text_b = _cell(path, number, row, b_col) if b_col else None
        label = _cell(path, number, row, label_col).strip() if label_col else None
        if label == "":
            raise DataError(f"{path}: line {number} has an empty label")
        examples.append(TextExample(text, text_b, label))
    return examples


def _check_tags(path: Path, number: int, tags: Sequence[str]) -> None:
    for tag in tags:
        if not _BIO.match(tag):
            raise DataError(
                f"{path}: line {number}: tag {tag!r} is not a BIO tag (O, B-TYPE or I-TYPE)"
            )


def _conll_sentences(path: Path, text: str) -> Iterator[tuple[int, list[str], list[str]]]:
    tokens: list[str] = []
    tags: list[str] = []
    start = 1
    for number, line in enumerate(_lines(text), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("-DOCSTART-"):
            if tokens:
                yield start, tokens, tags
            tokens, tags, start = [], [], number + 1
            continue
        fields = line.split("\t") if "\t" in line else stripped.split()
        if len(fields) < 2:
            raise DataError(
                f"{path}: line {number}: expected 'token<TAB>tag', got {stripped[:40]!r}"
            )
        token, tag = fields[0].strip(), fields[-1].strip()
        if not token:
            raise DataError(f"{path}: line {number}: empty token")
        _check_tags(path, number, [tag])
        tokens.append(token)
        tags.append(tag)
    if tokens:
        yield start, tokens, tags


def read_token_examples(
    path: Path, *, token_column: str | None = None, tag_column: str | None = None
) -> list[TokenExample]:
    """Sentences with BIO tags from a CoNLL file or a JSONL file of token and tag lists."""
    fmt = file_format(path, "ner")
    examples = []
    if fmt == "conll":
        for _, tokens, tags in _conll_sentences(path, _read_text(path)):
            examples.append(TokenExample(tuple(tokens), tuple(tags)))
    else:
        columns, rows = read_rows(path, fmt)
        tok_col = _pick_column(path, columns, token_column, TOKEN_COLUMNS, "--text-column")
        tag_col = _pick_column(path, columns, tag_column, TAG_COLUMNS, "--label-column")
        for number, row in rows:
            tokens, tags = row.get(tok_col), row.get(tag_col)
            if not isinstance(tokens, list) or not isinstance(tags, list):
                raise DataError(f"{path}: line {number}: {tok_col!r} and {tag_col!r} must be lists")
            if len(tokens) != len(tags):
                raise DataError(f"{path}: line {number}: {len(tokens)} tokens but {len(tags)} tags")
            if not tokens:
                continue
            tags = [str(t) for t in tags]
            _check_tags(path, number, tags)
            examples.append(TokenExample(tuple(str(t) for t in tokens), tuple(tags)))
    if not examples:
        raise DataError(f"{path}: no sentences")
    return examples


def sample(examples: list, limit: int | None, seed: int = 0) -> list:
    """At most `limit` examples drawn at random with a fixed seed, in their file order.

    The seed is fixed (not the fine-tuning --seed) so that runs with different seeds train on
    the same slice.
    """
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]
