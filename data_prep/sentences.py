"""Rule-based sentence splitting for English and Japanese.

BERT's sentence-pair tasks and the trainer's segment packing only need plausible sentence
boundaries, not perfect ones, so a few rules beat a heavy dependency. Inside a document a blank
line ends a paragraph (always a boundary); single newlines are just line wrapping (Project
Gutenberg wraps at ~70 characters; Aozora puts one paragraph per line), so the lines of a
paragraph are joined: with a space for English, with nothing for Japanese.
"""

from __future__ import annotations

import re

LANGS = ("en", "ja", "auto")

# Lowercased words that end with a period without ending the sentence ("Mr. Darcy").
ABBREVIATIONS = frozenset(
    "mr mrs ms messrs mme mlle dr st jr sr prof rev hon gen col capt lt sgt mt ft vs viz cf "
    "e.g i.e approx fig vol ch pp".split()
)
_EN_CANDIDATE = re.compile(r"[.!?]+[\"'”’)\]]*\s+")
_EN_OPENERS = "\"'“‘([«"

_JA_TERMINALS = "。！？!?"
_JA_OPEN = "「『（(【〈《"
_JA_CLOSE = "」』）)】〉》"
# Closing brackets/quotes right after a terminal stay with the sentence they close.
_JA_TRAILERS = _JA_TERMINALS + _JA_CLOSE + "”’"


_CJK = re.compile("[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
"""CJK punctuation, hiragana, katakana, CJK ideographs, full-width forms."""
_KANA = re.compile("[\u3040-\u30ff]")
_SPACE = re.compile(r"\s+")


def char_counts(text: str) -> tuple[int, int, int]:
    """(non-space characters, CJK characters, kana characters), counted with C-speed regexes."""
    text = _SPACE.sub("", text)
    return len(text), len(text) - len(_CJK.sub("", text)), len(text) - len(_KANA.sub("", text))


def detect_lang(text: str, sample_chars: int = 4000) -> str:
    """'ja' if at least 30% of the non-space characters (of the first few thousand) are CJK."""
    chars, cjk, _ = char_counts(text[:sample_chars])
    return "ja" if chars and cjk >= 0.3 * chars else "en"


def _paragraphs(text: str, joiner: str) -> list[str]:
    paragraphs: list[str] = []
    lines: list[str] = []
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped:
            lines.append(stripped)
        elif lines:
            paragraphs.append(joiner.join(lines))
            lines = []
    if lines:
        paragraphs.append(joiner.join(lines))
    return paragraphs


def _split_en(paragraph: str) -> list[str]:
    sentences: list[str] = []
    start = 0
    for match in _EN_CANDIDATE.finditer(paragraph):
        end = match.end()
        if end >= len(paragraph):
            break
        nxt = paragraph[end]
        if not (nxt.isupper() or nxt.isdigit() or nxt in _EN_OPENERS):
            continue
        punct = match.group(0).rstrip()
        if punct.rstrip("\"'”’)]") == ".":
            word = paragraph[start : match.start()].rsplit(None, 1)[-1].lstrip(_EN_OPENERS)
            if word.lower() in ABBREVIATIONS or (len(word) == 1 and word.isupper()):
                continue  # "Mr. Darcy", "e.g. This", initials such as "J. Smith"
        sentences.append(paragraph[start : match.start() + len(punct)])
        start = end
    sentences.append(paragraph[start:])
    return [s.strip() for s in sentences if s.strip()]


_JA_SPECIAL = re.compile("[" + re.escape(_JA_OPEN + _JA_CLOSE + _JA_TERMINALS) + "]")


def _split_ja(paragraph: str) -> list[str]:
    # Only brackets and terminals matter, so visit just those (a regex finds them at C speed)
    # instead of every character: this was the slowest step of encoding Japanese.
    sentences: list[str] = []
    depth = 0
    start = 0
    n = len(paragraph)
    for match in _JA_SPECIAL.finditer(paragraph):
        i = match.start()
        if i < start:
            continue  # absorbed as a trailer of the previous sentence
        ch = paragraph[i]
        if ch in _JA_OPEN:
            depth += 1
        elif ch in _JA_CLOSE:
            depth = max(0, depth - 1)
        elif depth == 0:
            i += 1
            while i < n and paragraph[i] in _JA_TRAILERS:
                i += 1
            sentences.append(paragraph[start:i])
            start = i
    sentences.append(paragraph[start:])
    return [s.strip() for s in sentences if s.strip()]


def split_sentences(text: str, lang: str = "auto") -> list[str]:
    """Split one document into sentences; `lang` is 'en', 'ja' or 'auto' (detect per call)."""
    if lang == "auto":
        lang = detect_lang(text)
    if lang == "ja":
        return [s for p in _paragraphs(text, "") for s in _split_ja(p)]
    if lang == "en":
        return [s for p in _paragraphs(text, " ") for s in _split_en(p)]
    raise ValueError(f"unknown language {lang!r}; choose one of {', '.join(LANGS)}")
