"""Read documents from input files: plain text or JSON Lines, optionally gz/xz/bz2-compressed.

Everything streams line by line, so a corpus larger than RAM is fine. Lines that are not valid
UTF-8 are dropped and counted (never silently), because one bad byte should not stop a
multi-hour run, but the user must be able to see how much was lost.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from data_prep.errors import PrepError

DOC_SEPS = ("blank", "line", "formfeed")
"""blank: blank lines and form-feed lines end a document; line: one document per line;
formfeed: only form-feed lines end a document (blank lines stay inside as paragraph breaks)."""

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
"""The built-in demo corpus (installed as package data)."""

_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SNIFF_BYTES = 8192
_BUFFER = 1 << 16


@dataclass
class SourceStats:
    """What reading the inputs saw; goes into manifest.json so losses are visible later."""

    files: int = 0
    documents: int = 0
    invalid_utf8_lines: int = 0
    invalid_json_lines: int = 0
    missing_field_records: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Turn files and directories into a file list (directories sorted, recursively).

    Hidden files are skipped so that editor/VCS droppings in a corpus folder are not read.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise PrepError(f"{path}: directory holds no files; pass a folder with text files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise PrepError(f"{path}: no such file or directory; check the --input path")
    if not files:
        raise PrepError("no input files given; pass --input PATH")
    return files


def open_binary(path: Path) -> BinaryIO:
    """Open a file for binary reading, decompressing .gz/.xz/.bz2 transparently."""
    opener = _OPENERS.get(path.suffix.lower())
    if opener is None:
        return open(path, "rb", buffering=_BUFFER)  # the caller closes it
    # BufferedReader gives every kind the same peek() for the binary sniff.
    return io.BufferedReader(opener(path, "rb"), buffer_size=_BUFFER)


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    for suffix in _OPENERS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.endswith(_JSONL_SUFFIXES)


def _text_lines(path: Path, stats: SourceStats) -> Iterator[str]:
    """Yield decoded lines without their line ending; count and drop undecodable ones."""
    try:
        stream = open_binary(path)
    except OSError as exc:
        raise PrepError(f"{path}: cannot open ({exc.strerror or exc}); check permissions") from exc
    with stream:
        try:
            head = stream.peek(_SNIFF_BYTES)[:_SNIFF_BYTES]
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise PrepError(f"{path}: cannot decompress ({exc}); is the suffix right?") from exc
        if b"\0" in head:
            raise PrepError(
                f"{path}: looks binary (NUL bytes); pass text, .jsonl or .gz/.xz/.bz2 files only"
            )
        first = True
        try:
            for raw in stream:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    stats.invalid_utf8_lines += 1
                    first = False
                    continue
                if first:
                    line = line.removeprefix("\ufeff")  # a UTF-8 BOM is not text
                    first = False
                yield line.rstrip("\r\n")
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise PrepError(
                f"{path}: corrupt or truncated ({exc}); re-download or re-compress it"
            ) from exc


def _is_formfeed(line: str) -> bool:
    return line.strip(" \t\r") == "\f"


def _text_documents(lines: Iterable[str], doc_sep: str) -> Iterator[str]:
    """Group lines into documents according to `doc_sep` (see DOC_SEPS)."""
    if doc_sep == "line":
        for line in lines:
            if line.strip():
                yield line.strip()
        return
    block: list[str] = []
    for line in lines:
        ends_doc = _is_formfeed(line) if doc_sep == "formfeed" else not line.strip()
        if ends_doc:
            if any(x.strip() for x in block):
                yield "\n".join(block).strip("\n")
            block = []
        else:
            block.append(line)
    if any(x.strip() for x in block):
        yield "\n".join(block).strip("\n")


def _jsonl_documents(
    path: Path, lines: Iterable[str], text_field: str, stats: SourceStats
) -> Iterator[str]:
    """One document per JSON object; bad records are counted, and a field that is never
    present is a user error (almost always a wrong --text-field)."""
    records = 0
    found = 0
    for line in lines:
        if not line.strip():
            continue
        records += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            stats.invalid_json_lines += 1
            continue
        value = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            stats.missing_field_records += 1
            continue
        found += 1
        yield value
    if records and not found:
        raise PrepError(
            f"{path}: no record has a string field {text_field!r}; set --text-field to the "
            "name of the text field"
        )


def iter_file_documents(
    path: Path,
    *,
    doc_sep: str = "blank",
    text_field: str = "text",
    stats: SourceStats | None = None,
) -> Iterator[str]:
    """Stream the documents of one file (an empty file simply yields nothing)."""
    if doc_sep not in DOC_SEPS:
        raise PrepError(f"unknown --doc-sep {doc_sep!r}; choose one of {', '.join(DOC_SEPS)}")
    stats = stats if stats is not None else SourceStats()
    stats.files += 1
    lines = _text_lines(path, stats)
    if _is_jsonl(path):
        docs = _jsonl_documents(path, lines, text_field, stats)
    else:
        docs = _text_documents(lines, doc_sep)
    for doc in docs:
        stats.documents += 1
        yield doc


def iter_documents(
    paths: Sequence[str | Path],
    *,
    doc_sep: str = "blank",
    text_field: str = "text",
    stats: SourceStats | None = None,
) -> Iterator[str]:
    """Stream documents (str, lines joined by "\\n") from all inputs in order.

    Raises PrepError at the end if the inputs held no text at all, because an empty dataset
    would only fail later, far from the cause. JSONL documents may be empty strings; the
    encoder counts them as dropped.
    """
    files = expand_inputs(paths)
    any_text = False
    for path in files:
        for doc in iter_file_documents(path, doc_sep=doc_sep, text_field=text_field, stats=stats):
            any_text = any_text or bool(doc.strip())
            yield doc
    if not any_text:
        names = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
        raise PrepError(f"no text found in {names}; check the files, --doc-sep and --text-field")
