"""Document cleaning before sentence splitting and tokenization, each step a flag.

Order: control characters out → NFKC → whitespace folded → lower-cased → length checks. Every
document that is dropped is dropped for one named reason (DROP_REASONS), counted by the encoder.

Defaults: control-character removal and whitespace folding on (they never remove words); NFKC
"auto" = on for Japanese documents only (full-width Latin and digits, half-width katakana and
compatibility kanji become their standard forms, which Japanese corpora mix freely; for English
NFKC would also fold ligatures and superscripts, which the tokenizer handles); lower-casing off
(an uncased WordPiece tokenizer lower-cases by itself, and Japanese must stay cased).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from tokenizers.normalizers import NFKC

from data_prep.errors import PrepError

NFKC_MODES = ("auto", "on", "off")
DROP_REASONS = ("too_long", "too_few_chars", "empty", "duplicate", "too_short")
"""too_long: more than --max-doc-chars; too_few_chars: fewer than --min-doc-chars after
cleaning; empty: no tokens; duplicate: the same cleaned text as an earlier document;
too_short: fewer than --min-doc-tokens tokens."""

# C0 and C1 controls and DEL, except tab and newline (which the folding step handles); also
# the Unicode line/paragraph separators, which behave like newlines in some readers only.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_SPACES = re.compile(r"[^\S\n]+")  # runs of whitespace other than newline
_SPACE_AROUND_NEWLINE = re.compile(r" ?\n ?")
_BLANK_RUNS = re.compile(r"\n{3,}")
# The tokenizers library's NFKC: the same result as unicodedata.normalize on the shared
# corpora and 2.5x faster, which is 5% of Japanese encode time (docs/benchmarks.md).
_NFKC = NFKC()


@dataclass(frozen=True)
class CleanConfig:
    """The cleaning flags (part of what decides the output bytes)."""

    nfkc: str = "auto"
    remove_control: bool = True
    fold_whitespace: bool = True
    lowercase: bool = False
    min_doc_chars: int = 1
    """Documents shorter than this after cleaning are dropped (too_few_chars). The upper limit
    is the reader's (ReadConfig.max_doc_chars), so that a huge document is never held."""

    def validate(self) -> None:
        if self.nfkc not in NFKC_MODES:
            raise PrepError(f"unknown --nfkc {self.nfkc!r}; choose one of {', '.join(NFKC_MODES)}")
        if self.min_doc_chars < 0:
            raise PrepError(f"--min-doc-chars must be >= 0, got {self.min_doc_chars}")

    def as_dict(self) -> dict:
        return asdict(self)


def clean_text(text: str, cfg: CleanConfig, lang: str) -> str:
    """Apply the enabled cleaning steps to one document; `lang` is 'en' or 'ja'."""
    if cfg.remove_control:
        text = _CONTROL.sub("", text)
    if cfg.nfkc == "on" or (cfg.nfkc == "auto" and lang == "ja"):
        text = _NFKC.normalize_str(text)
    if cfg.fold_whitespace:
        # Spaces/tabs (and NBSP, ideographic space ...) → one space; line ends trimmed; at
        # most one blank line in a row, so paragraph breaks survive.
        text = _SPACES.sub(" ", text)
        text = _SPACE_AROUND_NEWLINE.sub("\n", text)
        text = _BLANK_RUNS.sub("\n\n", text).strip()
    if cfg.lowercase:
        text = text.lower()
    return text


def length_reason(text: str, cfg: CleanConfig) -> str | None:
    """The drop reason for a cleaned document's length, or None to keep it."""
    if not text.strip():
        return "empty"
    if len(text) < cfg.min_doc_chars:
        return "too_few_chars"
    return None
