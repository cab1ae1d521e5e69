"""Read documents from input files: plain text, JSON Lines or WikiExtractor `<doc>` files,
optionally gz/xz/bz2/zstd-compressed, in any ASCII-compatible encoding.

Everything streams line by line with a cap on the line length, so neither a corpus larger than
RAM nor a 50 MB line without a newline can exhaust memory. Problems are counted, never silent:

- a line that does not decode in the declared encoding is dropped (`invalid_utf8_lines`, named
  for the usual encoding); but when more than 1% of a file's lines (and more than 10) fail,
  the encoding is wrong, and reading stops with an error that suggests the right one;
- a document longer than `max_doc_chars` is dropped as too long (the reader yields None for it
  and never holds more than the cap);
- a whole file that is binary (NUL bytes in its first 8 KB), empty, or corrupt from its
  start is skipped and counted by reason, with its name kept in `problems`;
- a compressed file that breaks later (cut short or damaged) is counted as truncated: the
  documents read before the damage are kept, and `problems` says how many documents and
  lines that was.

Uncompressed files can be read by byte range. `split_points` finds offsets where a document
starts, so one large file can be encoded by several workers or nodes as independent units.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import html
import io
import json
import lzma
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from data_prep.errors import PrepError

DOC_SEPS = ("blank", "line", "formfeed")
"""blank: blank lines and form-feed lines end a document; line: one document per line;
formfeed: only form-feed lines end a document (blank lines stay inside as paragraph breaks)."""
FORMATS = ("auto", "text", "jsonl", "wikiextractor")
"""auto: .jsonl/.ndjson/.json → jsonl; files whose first line is `<doc ...>` → wikiextractor;
everything else → text (documents separated as --doc-sep says)."""
SKIP_REASONS = ("binary", "empty", "corrupt")
UNDECODABLE_SHARE = 0.01
UNDECODABLE_MIN = 10
"""A file (or byte range) with more than this share and this number of undecodable lines is
in another encoding than --encoding: refused, since keeping the rest would lose most of it."""
_GUESS_CODECS = ("utf-8", "euc-jp", "cp932", "cp1252")
"""Tried in this order on the undecodable lines: EUC-JP before cp932, because EUC-JP bytes
often also decode (wrongly) as cp932 half-width katakana while Shift_JIS fails as EUC-JP."""
_SAMPLE_LINES = 50
DEFAULT_MAX_DOC_CHARS = 10_000_000
"""Longer documents are dropped (counted as too_long). A whole novel is 0.5-3 M characters;
anything past 10 M is a dump without separators, not a document."""

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
"""The built-in demo corpus (installed as package data)."""

_COMPRESSED = (".gz", ".xz", ".bz2", ".zst", ".zstd")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_SNIFF_BYTES = 8192
_BUFFER = 1 << 16
_SKIP_CHUNK = 1 << 20
_WIKI_DOC = re.compile(rb"^<doc[\s>]")
_WIKI_TITLE = re.compile(r'\btitle="([^"]*)"')
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class ReadConfig:
    """How to turn input files into documents (part of what decides the output bytes)."""

    doc_sep: str = "blank"
    text_field: str = "text"
    fmt: str = "auto"
    encoding: str = "utf-8"
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS

    def validate(self) -> None:
        if self.doc_sep not in DOC_SEPS:
            raise PrepError(
                f"unknown --doc-sep {self.doc_sep!r}; choose one of {', '.join(DOC_SEPS)}"
            )
        if self.fmt not in FORMATS:
            raise PrepError(f"unknown --format {self.fmt!r}; choose one of {', '.join(FORMATS)}")
        if self.max_doc_chars < 1:
            raise PrepError(f"--max-doc-chars must be >= 1, got {self.max_doc_chars}")
        try:
            codec = codecs.lookup(self.encoding)
        except LookupError:
            raise PrepError(
                f"unknown --encoding {self.encoding!r}; use a Python codec name such as utf-8, "
                "cp932, shift_jis or euc-jp"
            ) from None
        if "\n".encode(codec.name) != b"\n" or "a".encode(codec.name) != b"a":
            raise PrepError(
                f"--encoding {self.encoding}: only ASCII-compatible encodings can be streamed by "
                "line; convert the files first (iconv -f UTF-16 -t UTF-8)"
            )

    @property
    def codec(self) -> str:
        return codecs.lookup(self.encoding).name

    def line_cap(self, fmt: str) -> int:
        """Longest line kept in memory: past it the line cannot hold a document of at most
        max_doc_chars characters (UTF-8 needs <= 4 bytes per character, JSON escapes <= 6)."""
        return (6 if fmt == "jsonl" else 4) * self.max_doc_chars + 4096


@dataclass
class SourceStats:
    """What reading the inputs saw; goes into manifest.json so losses are visible later."""

    files: int = 0
    bytes: int = 0
    """Bytes read from disk (compressed size for compressed files)."""
    documents: int = 0
    """Documents found, including the too-long ones that were dropped."""
    invalid_utf8_lines: int = 0
    """Lines that did not decode in the declared --encoding (usually UTF-8)."""
    invalid_json_lines: int = 0
    missing_field_records: int = 0
    too_long_documents: int = 0
    truncated_files: int = 0
    """Compressed files that broke after their start; what came before is kept."""
    lines: int = 0
    """Lines read (for the share of undecodable ones; not in the manifest)."""
    undecodable_sample: list = field(default_factory=list)
    """The first undecodable lines (bytes) of the file being read, to guess its encoding."""
    skipped_files: Counter = field(default_factory=Counter)
    problems: list = field(default_factory=list)
    """[path, reason] of skipped files, for the report."""

    def skip(self, path: Path, reason: str, detail: str = "") -> None:
        self.skipped_files[reason] += 1
        self.problems.append([str(path), reason + (f": {detail}" if detail else "")])

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "documents": self.documents,
            "invalid_utf8_lines": self.invalid_utf8_lines,
            "invalid_json_lines": self.invalid_json_lines,
            "missing_field_records": self.missing_field_records,
            "truncated_files": self.truncated_files,
            "skipped_files": {r: self.skipped_files.get(r, 0) for r in SKIP_REASONS},
        }


# ---------------------------------------------------------------------------------------------
# Finding the files


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def expand_inputs(paths: Iterable[str | Path], pattern: str = "*") -> list[Path]:
    """Turn files, directories and glob patterns into a file list, in the order given.

    Directories are searched recursively for files whose name matches `pattern` (sorted;
    hidden files skipped, so editor/VCS droppings in a corpus folder are not read). Globs
    (`data/*.jsonl.gz`, quoted so the shell leaves them alone) expand sorted. A directory or
    glob that matches nothing is a user error, not an empty dataset.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob(pattern) if p.is_file() and not _is_hidden(p, path)
            )
            if not found:
                raise PrepError(
                    f"{path}: no files matching {pattern!r} in this directory; check --input "
                    "and --pattern"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif _GLOB_CHARS.search(str(raw)):
            found = sorted(Path(p) for p in glob.glob(str(raw), recursive=True))
            found = [p for p in found if p.is_file()]
            if not found:
                raise PrepError(f"{raw}: the pattern matches no files; check --input")
            files.extend(found)
        else:
            raise PrepError(f"{path}: no such file or directory; check the --input path")
    if not files:
        raise PrepError("no input files given; pass --input PATH")
    return files


def refuse_out_among_inputs(
    inputs: Iterable[str | Path], files: Sequence[Path], out: str | Path
) -> None:
    """PrepError if --out lies in an --input directory (the tool would read its own output
    on the next run) or an input file lies in --out (replacing --out would delete it)."""
    out_path = Path(out).resolve()
    for raw in inputs:
        path = Path(raw)
        if path.is_dir() and out_path.is_relative_to(path.resolve()):
            raise PrepError(
                f"--out {out} is inside the input directory {path}, so its output would be "
                "read as input; choose an --out outside every --input"
            )
    for path in files:
        if path.resolve().is_relative_to(out_path):
            raise PrepError(
                f"input {path} is inside --out {out}; choose an --out that holds no input"
            )


def is_compressed(path: Path) -> bool:
    return path.name.lower().endswith(_COMPRESSED)


# ---------------------------------------------------------------------------------------------
# Opening and sniffing


class _Counted(io.RawIOBase):
    """A raw file that remembers how many bytes were read (on-disk progress for MB/s)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._f.readinto(buffer)
        self.count += n or 0
        return n

    def seekable(self) -> bool:
        return self._f.seekable()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()
        super().close()


def _zstd_reader(raw: BinaryIO) -> BinaryIO:
    try:
        import zstandard
    except ImportError:
        raise PrepError(
            "reading .zst files needs the zstandard package: pip install "
            "'bert-pretrain[zstd]' (or pip install zstandard)"
        ) from None
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)


def _decompressor(path: Path, raw: BinaryIO) -> BinaryIO:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if name.endswith(".xz"):
        return lzma.LZMAFile(raw, "rb")
    if name.endswith(".bz2"):
        return bz2.BZ2File(raw, "rb")
    if name.endswith((".zst", ".zstd")):
        return _zstd_reader(raw)
    return raw


class InputFile:
    """One input file opened for streaming; `disk_bytes` tells how far reading has got."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._raw = _Counted(open(path, "rb"))  # closed in close()
        except OSError as exc:
            raise PrepError(
                f"{path}: cannot open ({exc.strerror or exc}); check permissions"
            ) from exc
        stream = _decompressor(path, self._raw)
        # BufferedReader gives every kind the same peek()/readline(limit).
        self.stream = io.BufferedReader(stream, buffer_size=_BUFFER)  # type: ignore[arg-type]

    @property
    def disk_bytes(self) -> int:
        return self._raw.count

    def seek(self, offset: int) -> None:
        self.stream.seek(offset)

    def close(self) -> None:
        self.stream.close()
        self._raw.close()

    def __enter__(self) -> InputFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DECOMPRESS_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError)


def _zstd_errors() -> tuple:
    try:
        import zstandard

        return (zstandard.ZstdError,)
    except ImportError:
        return ()


def sniff(path: Path) -> tuple[str | None, bytes]:
    """(skip reason or None, the first bytes of the decompressed file)."""
    try:
        with InputFile(path) as f:
            head = f.stream.peek(_SNIFF_BYTES)[:_SNIFF_BYTES]
    except PrepError:
        raise
    except _DECOMPRESS_ERRORS + _zstd_errors():
        return "corrupt", b""
    if not head:
        return "empty", b""
    if b"\0" in head:
        return "binary", head
    return None, head


def detect_format(path: Path, head: bytes, cfg: ReadConfig) -> str:
    if cfg.fmt != "auto":
        return cfg.fmt
    name = path.name.lower()
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if _WIKI_DOC.match(first):
        return "wikiextractor"
    return "text"


# ---------------------------------------------------------------------------------------------
# Lines


OVERLONG = object()
"""Yielded by _lines instead of a line longer than the cap (its bytes were skipped)."""


def _raw_lines(stream: BinaryIO, cap: int, end: int | None, start: int) -> Iterator[bytes | object]:
    """Lines as bytes (with their ending) from `start` up to byte offset `end`, never holding
    more than `cap` bytes of one line."""
    pos = start
    readline = stream.readline
    while end is None or pos < end:
        raw = readline(cap)
        if not raw:
            return
        pos += len(raw)
        if len(raw) == cap and not raw.endswith(b"\n"):
            while True:  # skip the rest of the overlong line in bounded chunks
                more = readline(_SKIP_CHUNK)
                pos += len(more)
                if not more or more.endswith(b"\n"):
                    break
            yield OVERLONG
            continue
        yield raw


def _decoded_lines(
    f: InputFile, cfg: ReadConfig, fmt: str, stats: SourceStats, start: int, end: int | None
) -> Iterator[str | object]:
    """Decoded lines without their line ending; undecodable ones are counted and dropped."""
    codec = cfg.codec
    first = start == 0
    for raw in _raw_lines(f.stream, cfg.line_cap(fmt), end, start):
        stats.lines += 1
        if raw is OVERLONG:
            first = False
            yield OVERLONG
            continue
        try:
            line = raw.decode(codec)  # type: ignore[union-attr]
        except UnicodeDecodeError:
            stats.invalid_utf8_lines += 1
            if len(stats.undecodable_sample) < _SAMPLE_LINES:
                stats.undecodable_sample.append(raw[:1000])  # type: ignore[index]
            first = False
            continue
        if first:
            line = line.removeprefix("\ufeff")  # a BOM is not text
            first = False
        yield line.rstrip("\r\n")


# ---------------------------------------------------------------------------------------------
# Documents (None = a document that was too long and has been dropped)


def _is_formfeed(line: str) -> bool:
    return line.strip(" \t\r") == "\f"


def _is_separator(line: str, doc_sep: str) -> bool:
    return _is_formfeed(line) if doc_sep == "formfeed" else not line.strip()


def _text_documents(lines: Iterable, cfg: ReadConfig) -> Iterator[str | None]:
    """Group lines into documents according to cfg.doc_sep (see DOC_SEPS)."""
    limit = cfg.max_doc_chars
    if cfg.doc_sep == "line":
        for line in lines:
            if line is OVERLONG:
                yield None
            elif line.strip():
                text = line.strip()
                yield text if len(text) <= limit else None
        return
    block: list[str] = []
    chars = 0
    too_long = False
    for line in lines:
        if line is not OVERLONG and _is_separator(line, cfg.doc_sep):
            if too_long:
                yield None
            elif any(x.strip() for x in block):
                yield "\n".join(block).strip("\n")
            block, chars, too_long = [], 0, False
        elif line is OVERLONG or too_long or chars + len(line) > limit:
            block, too_long = [], True  # stop holding text; wait for the separator
        else:
            block.append(line)
            chars += len(line) + 1
    if too_long:
        yield None
    elif any(x.strip() for x in block):
        yield "\n".join(block).strip("\n")


def _jsonl_documents(
    path: Path, lines: Iterable, cfg: ReadConfig, stats: SourceStats
) -> Iterator[str | None]:
    """One document per JSON object; bad records are counted, and a field that is never
    present is a user error (almost always a wrong --text-field)."""
    records = found = 0
    for line in lines:
        if line is OVERLONG:
            records += 1
            found += 1
            yield None
            continue
        if not line.strip():
            continue
        records += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            stats.invalid_json_lines += 1
            continue
        value = obj.get(cfg.text_field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            stats.missing_field_records += 1
            continue
        found += 1
        yield value if len(value) <= cfg.max_doc_chars else None
    if records and not found:
        raise PrepError(
            f"{path}: no record has a string field {cfg.text_field!r}; set --text-field to the "
            "name of the text field"
        )


def _wiki_documents(lines: Iterable, cfg: ReadConfig) -> Iterator[str | None]:
    """WikiExtractor output: `<doc id=.. url=.. title=..>`, the title line, paragraphs one per
    line, `</doc>`. The title line is dropped (a heading, not a sentence); every line is its
    own paragraph; HTML escapes (WikiExtractor's --html-safe default) are undone."""
    inside = too_long = False
    title = None
    block: list[str] = []
    chars = 0
    for line in lines:
        if line is OVERLONG:
            too_long = too_long or inside
            continue
        if line.startswith("<doc") and (len(line) == 4 or line[4] in " \t>"):
            inside, too_long, block, chars = True, False, [], 0
            match = _WIKI_TITLE.search(line)
            title = html.unescape(match.group(1)) if match else None
            continue
        if line.strip() == "</doc>":
            if too_long:
                yield None
            elif block:
                yield "\n\n".join(block)
            inside, block = False, []
            continue
        if not inside or too_long:
            continue
        text = html.unescape(line.strip()) if "&" in line else line.strip()
        if not text or (not block and text == title):
            continue
        chars += len(text) + 2
        if chars > cfg.max_doc_chars:
            too_long, block = True, []
        else:
            block.append(text)
    if inside:
        if too_long:
            yield None
        elif block:
            yield "\n\n".join(block)


def read_range(
    path: Path,
    cfg: ReadConfig,
    stats: SourceStats,
    start: int = 0,
    end: int | None = None,
    progress: list[int] | None = None,
) -> Iterator[str | None]:
    """Documents of one file, or of its byte range [start, end) when both ends are document
    starts from `split_points` (uncompressed files only). None stands for a document that
    was dropped as too long. Skipped files are counted (once, by the range that starts at 0).
    Raises PrepError at the end if the range is mostly in another encoding (check_decoding).

    `progress`, if given, is a one-element list kept at the number of bytes read from disk.
    """
    first_range = start == 0
    reason, head = sniff(path)
    if reason is not None:
        if first_range:
            stats.files += 1
            stats.skip(path, reason)
        return
    fmt = detect_format(path, head, cfg)
    if first_range:
        stats.files += 1
    lines_before, bad_before, docs = stats.lines, stats.invalid_utf8_lines, 0
    stats.undecodable_sample.clear()
    with InputFile(path) as f:
        if start:
            f.seek(start)
        lines = _decoded_lines(f, cfg, fmt, stats, start, end)
        if fmt == "jsonl":
            documents = _jsonl_documents(path, lines, cfg, stats)
        elif fmt == "wikiextractor":
            documents = _wiki_documents(lines, cfg)
        else:
            documents = _text_documents(lines, cfg)
        try:
            for doc in documents:
                stats.documents += 1
                docs += 1
                if doc is None:
                    stats.too_long_documents += 1
                if progress is not None:
                    progress[0] = f.disk_bytes
                yield doc
        except _DECOMPRESS_ERRORS + _zstd_errors() as exc:
            # The document being assembled when the stream broke is lost with the file's
            # tail; everything before it was yielded and is kept.
            stats.truncated_files += 1
            reason = truncated_reason(exc, docs, stats.lines - lines_before)
            stats.problems.append([str(path), reason])
        finally:
            if progress is not None:
                progress[0] = f.disk_bytes
    check_decoding(
        path, cfg, stats.lines - lines_before, stats.invalid_utf8_lines - bad_before, stats
    )
    # On-disk bytes of the range (not what buffering happened to read), so that the sum over
    # the ranges of a file is its size whatever the split.
    stats.bytes += (path.stat().st_size if end is None else end) - start


def truncated_reason(exc: BaseException, documents: int, lines: int) -> str:
    """The `problems` entry of a file that broke after its start: what was kept."""
    return (
        f"truncated ({type(exc).__name__}: {exc}): kept the {documents:,} document(s) "
        f"({lines:,} lines) before the damage; the document being read and the rest of the "
        "file are lost"
    )


def guess_encoding(sample: Sequence[bytes], declared: str) -> str | None:
    """The first of utf-8, euc-jp, cp932, cp1252 (not `declared`) that decodes every line of
    `sample`, or None."""
    declared_name = codecs.lookup(declared).name
    for codec in _GUESS_CODECS:
        if codecs.lookup(codec).name == declared_name:
            continue
        try:
            for raw in sample:
                raw.decode(codec)
        except UnicodeDecodeError:
            continue
        return codec
    return None


def check_decoding(path: Path, cfg: ReadConfig, lines: int, bad: int, stats: SourceStats) -> None:
    """Refuse a file whose share of undecodable lines says it is in another encoding; a few
    bad lines (<= UNDECODABLE_MIN, or <= UNDECODABLE_SHARE of the lines) are only counted."""
    if bad <= UNDECODABLE_MIN or bad <= UNDECODABLE_SHARE * lines:
        return
    guess = guess_encoding(stats.undecodable_sample, cfg.encoding)
    hint = (
        f"they decode as {guess}: pass --encoding {guess}"
        if guess
        else "find its encoding (`file -i`) and pass --encoding, or convert it to UTF-8"
    )
    raise PrepError(
        f"{path}: {bad:,} of {lines:,} lines ({100 * bad / lines:.1f}%) do not decode as "
        f"{cfg.encoding}, so most of its text would be lost; {hint}"
    )


def split_points(path: Path, unit_bytes: int, cfg: ReadConfig) -> list[int]:
    """Byte offsets (> 0) where a document starts, about every `unit_bytes`, so that ranges
    between them can be read independently with `read_range`. Empty for compressed or small
    files. Each offset is a function of the file's bytes and the settings only, so every
    process that computes it gets the same answer."""
    size = path.stat().st_size
    if is_compressed(path) or size <= unit_bytes:
        return []
    reason, head = sniff(path)
    if reason is not None:
        return []
    fmt = detect_format(path, head, cfg)
    points: list[int] = []
    with open(path, "rb") as f:
        for target in range(unit_bytes, size, unit_bytes):
            if points and points[-1] >= target:
                continue
            point = _next_doc_start(f, target, fmt, cfg.doc_sep)
            if point is None:
                break
            if point < size and (not points or point > points[-1]):
                points.append(point)
    return points


def _next_doc_start(f: BinaryIO, target: int, fmt: str, doc_sep: str) -> int | None:
    """First offset >= target where a document starts (None if there is none)."""
    f.seek(target - 1)
    f.readline()  # the rest of the line holding byte target-1: next line starts >= target
    pos = f.tell()
    if fmt == "jsonl" or (fmt == "text" and doc_sep == "line"):
        return pos
    prev_sep = False
    while True:
        line = f.readline(_SKIP_CHUNK)
        if not line:
            return None
        whole = line.endswith(b"\n")
        if fmt == "wikiextractor":
            if _WIKI_DOC.match(line):
                return pos
        else:
            stripped = line.strip(b" \t\r\n")
            is_sep = stripped == b"\f" if doc_sep == "formfeed" else not line.strip()
            if not is_sep and prev_sep:
                return pos
            prev_sep = is_sep and whole
        while not whole:  # finish a long line
            more = f.readline(_SKIP_CHUNK)
            if not more:
                return None
            whole = more.endswith(b"\n")
            prev_sep = False
        pos = f.tell()


# ---------------------------------------------------------------------------------------------
# Convenience for callers that want plain documents (tokenizer sample, tests)


def iter_file_documents(
    path: Path,
    *,
    doc_sep: str = "blank",
    text_field: str = "text",
    stats: SourceStats | None = None,
    cfg: ReadConfig | None = None,
) -> Iterator[str]:
    """Stream the documents of one file (too-long ones are counted and left out)."""
    cfg = cfg or ReadConfig(doc_sep=doc_sep, text_field=text_field)
    cfg.validate()
    stats = stats if stats is not None else SourceStats()
    for doc in read_range(Path(path), cfg, stats):
        if doc is not None:
            yield doc


def iter_documents(
    paths: Sequence[str | Path],
    *,
    doc_sep: str = "blank",
    text_field: str = "text",
    stats: SourceStats | None = None,
    cfg: ReadConfig | None = None,
    pattern: str = "*",
) -> Iterator[str]:
    """Stream documents (str, lines joined by "\\n") from all inputs in order.

    Raises PrepError at the end if the inputs held no text at all, because an empty dataset
    would only fail later, far from the cause. JSONL documents may be empty strings; the
    encoder counts them as dropped.
    """
    cfg = cfg or ReadConfig(doc_sep=doc_sep, text_field=text_field)
    stats = stats if stats is not None else SourceStats()
    files = expand_inputs(paths, pattern)
    any_text = False
    for path in files:
        for doc in iter_file_documents(path, stats=stats, cfg=cfg):
            any_text = any_text or bool(doc.strip())
            yield doc
    if not any_text:
        raise PrepError(no_text_message(files, stats))


def no_text_message(files: Sequence[Path], stats: SourceStats) -> str:
    names = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
    skipped = "; ".join(f"{p} skipped ({r})" for p, r in stats.problems[:3])
    return (
        f"no text found in {names}"
        + (f" ({skipped})" if skipped else "")
        + "; check the files, --format, --doc-sep, --text-field and --encoding"
    )
