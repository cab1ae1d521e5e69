"""Train and load tokenizers (WordPiece or SentencePiece), always as a HF `tokenizer.json`.

Both kinds end up as one `tokenizers.Tokenizer`, so a single code path encodes the corpus and
the exported model's tokenizer gives the same ids. The special tokens are ids 0..4 in the
order of SPECIAL_TOKENS; the trainer relies on that.

Files written to the tokenizer directory:
- tokenizer.json         the HF tokenizers pipeline (our encoder; transformers loads it too)
- tokenizer_config.json  + special_tokens_map.json: `AutoTokenizer.from_pretrained(DIR)` works
- vocab.txt              WordPiece only (BERT's classic vocabulary file)
- sentencepiece.model    SentencePiece only (the trained model, kept for reference)
- bert_tokenizer.json    our metadata: kind, vocab_size, lowercase, special ids, hash

Japanese: BERT's uncased normalisation strips accents, which turns ガ into カ, so a Japanese
tokenizer is never lowercased/accent-stripped, and SentencePiece never strips accents at all.

`--pretokenize mecab` (WordPiece only) is the Tohoku BERT recipe: NFKC, then MeCab with the
unidic-lite dictionary (fugashi) cuts sentences into words, then WordPiece splits the words.
tokenizer.json then expects text already cut into space-separated words (`load_segmenter`
gives the cutter; the encoder applies it), and tokenizer_config.json names transformers'
`BertJapaneseTokenizer` with the same MeCab settings, so `AutoTokenizer.from_pretrained` on
raw text gives the same ids as our encoder.
"""

from __future__ import annotations

import json
import os
import tempfile
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram, WordPiece
from tokenizers.trainers import WordPieceTrainer

from data_prep.clean import CleanConfig, clean_text, length_reason
from data_prep.errors import PrepError
from data_prep.sentences import char_counts, detect_lang, split_sentences
from data_prep.shard_format import SPECIAL_TOKENS, file_sha256
from data_prep.sources import (
    ReadConfig,
    SourceStats,
    check_decoding,
    expand_inputs,
    read_range,
    refuse_out_among_inputs,
)

SPECIAL_NAMES = ["pad", "unk", "cls", "sep", "mask"]
KINDS = ("wordpiece", "sentencepiece")
PRETOKENIZERS = ("none", "mecab")
SP_MODEL_TYPES = ("unigram", "bpe")
MIN_VOCAB_SIZE = 10
META_FILE = "bert_tokenizer.json"
SP_MODEL_FILE = "sentencepiece.model"
KANA_LIMIT = 0.001
"""Above this share of kana characters in the sample, WordPiece defaults to cased."""
MODEL_MAX_LENGTH = 512
"""Written to tokenizer_config.json; the exporter should overwrite it with model.max_seq_len."""


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Training sample


@dataclass
class SampleInfo:
    """What the training sample looked like; decides the defaults a user did not set."""

    lang: str
    """'en' or 'ja' ('auto' resolved on the sample)."""
    kana_fraction: float
    """Share of kana among non-space characters: any real amount forbids accent stripping."""


def write_sample(
    inputs: Sequence[str | Path],
    out_file: Path,
    *,
    sample_bytes: int,
    lang: str,
    doc_sep: str = "blank",
    text_field: str = "text",
    read: ReadConfig | None = None,
    clean: CleanConfig | None = None,
    pattern: str = "*",
    segment: Callable[[str], str] | None = None,
) -> SampleInfo:
    """Write at most about `sample_bytes` of cleaned sentences (one per line) from the inputs.

    Each file contributes in proportion to its size on disk, taking its first documents, so a
    sample of a many-file corpus is not just the first file and nothing is loaded whole: the
    budget is checked after every sentence, so the sample exceeds `sample_bytes` by at most
    one sentence per file, and memory holds one document (<= --max-doc-chars) at a time.
    """
    read = read or ReadConfig(doc_sep=doc_sep, text_field=text_field)
    clean = clean or CleanConfig()
    files = expand_inputs(inputs, pattern)
    sizes = [max(1, p.stat().st_size) for p in files]
    total = sum(sizes)
    written = 0
    chars = cjk = kana = 0
    stats = SourceStats()
    with open(out_file, "w", encoding="utf-8") as out:
        for path, size in zip(files, sizes, strict=True):
            budget = max(1, sample_bytes * size // total)
            used = 0
            lines_before, bad_before = stats.lines, stats.invalid_utf8_lines
            for doc in read_range(path, read, stats):
                if doc is None:
                    continue
                doc_lang = lang if lang != "auto" else detect_lang(doc)
                doc = clean_text(doc, clean, doc_lang)
                if length_reason(doc, clean) is not None:
                    continue
                counts = char_counts(doc[:1000])  # the head of every document: cheap, spread
                chars, cjk, kana = chars + counts[0], cjk + counts[1], kana + counts[2]
                for sentence in split_sentences(doc, doc_lang):
                    sentence = sentence.replace("\n", " ")
                    if segment is not None:
                        sentence = segment(sentence)
                    line = sentence + "\n"
                    out.write(line)
                    used += len(line.encode("utf-8"))
                    if used >= budget:
                        break
                if used >= budget:
                    break
            # read_range checks a file it reads to the end; the sample often stops early.
            lines, bad = stats.lines - lines_before, stats.invalid_utf8_lines - bad_before
            check_decoding(path, read, lines, bad, stats)
            written += used
    if written == 0:
        raise PrepError("the inputs hold no sentences to train a tokenizer on; check --input")
    if lang == "auto":
        lang = "ja" if cjk >= 0.3 * chars else "en"
    return SampleInfo(lang=lang, kana_fraction=kana / max(1, chars))


def _sample_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")


# ---------------------------------------------------------------------------------------------
# Building the two kinds


def _post_processor() -> processors.TemplateProcessing:
    """[CLS] A [SEP] (B [SEP]) for transformers users; our encoder passes
    add_special_tokens=False and adds them itself when building samples."""
    return processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )


def _train_wordpiece(
    sample: Path, vocab_size: int, lowercase: bool, pretokenize: str = "none"
) -> Tokenizer:
    tok = Tokenizer(WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    if pretokenize == "mecab":
        # Input is NFKC text already cut into words by MeCab: split on the spaces only,
        # exactly like BertJapaneseTokenizer's WordpieceTokenizer (never lowercases).
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:
        # strip_accents=None follows lowercase, exactly like transformers' BertTokenizer, so
        # the exported tokenizer_config (do_lower_case only) rebuilds the same normaliser.
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tok.train_from_iterator(_sample_lines(sample), trainer=trainer)
    return tok


def _spm_normalizer() -> normalizers.Normalizer:
    """Mirror of SentencePiece's 'nfkc' rule + remove_extra_whitespaces (strip, collapse)."""
    return normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    )


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece BPE vocabulary: a piece's rank is its merge
    priority, and every split of it into two known pieces is a merge (as transformers does)."""
    merges: list[tuple[int, int, int, str, str]] = []
    for piece, rank in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def _train_sentencepiece(sample: Path, out_dir: Path, vocab_size: int, model_type: str, lang: str):
    import sentencepiece as spm

    prefix = out_dir / Path(SP_MODEL_FILE).stem
    try:
        spm.SentencePieceTrainer.train(
            input=str(sample),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            # SentencePiece's recommendation: 0.9995 for CJK (rare kanji become [UNK]),
            # 1.0 for small alphabets.
            character_coverage=0.9995 if lang == "ja" else 1.0,
            normalization_rule_name="nfkc",  # plain NFKC: reproducible in tokenizers, no case
            pad_id=0,
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            pad_piece="[PAD]",
            unk_piece="[UNK]",
            user_defined_symbols=SPECIAL_TOKENS[2:],  # ids 2, 3, 4
            hard_vocab_limit=False,  # a small corpus gives a smaller vocabulary, not a crash
            input_sentence_size=10_000_000,
            shuffle_input_sentence=True,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise PrepError(
            f"sentencepiece training failed: {exc}; try a smaller --vocab-size"
        ) from exc
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    if [p for p, _ in pieces[:5]] != SPECIAL_TOKENS:
        raise RuntimeError(f"sentencepiece put special tokens at wrong ids: {pieces[:5]}")
    if model_type == "unigram":
        model = Unigram(pieces, unk_id=1, byte_fallback=False)
    else:
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        model = BPE(vocab, _bpe_merges(vocab), unk_token="[UNK]", fuse_unk=True)
    tok = Tokenizer(model)
    tok.normalizer = _spm_normalizer()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok


# ---------------------------------------------------------------------------------------------
# Public API


def train_tokenizer(
    files: Sequence[str | Path],
    out_dir: str | Path,
    kind: str = "wordpiece",
    vocab_size: int = 30522,
    *,
    cased: bool = False,
    lang: str = "auto",
    sp_model_type: str = "unigram",
    sample_bytes: int = 100_000_000,
    doc_sep: str = "blank",
    text_field: str = "text",
    pretokenize: str = "none",
    read: ReadConfig | None = None,
    clean: CleanConfig | None = None,
    pattern: str = "*",
) -> Path:
    """Train a tokenizer on a sample of `files` and write the directory; returns it.

    The sample is read and cleaned like `bert-prep encode` does (pass the same `read` and
    `clean` settings) so the vocabulary fits the text it will encode.

    WordPiece is lowercased and accent-stripped (BERT uncased) unless `cased` or the sample
    holds Japanese kana (more than KANA_LIMIT of its characters); SentencePiece (unigram or
    bpe) is always cased and never strips accents. The vocabulary may come out smaller than
    `vocab_size` on a small corpus; the actual size is in bert_tokenizer.json.
    """
    if kind not in KINDS:
        raise PrepError(f"unknown --kind {kind!r}; choose one of {', '.join(KINDS)}")
    if sp_model_type not in SP_MODEL_TYPES:
        raise PrepError(f"unknown --sp-model-type {sp_model_type!r}; choose unigram or bpe")
    if vocab_size < max(MIN_VOCAB_SIZE, len(SPECIAL_TOKENS)):
        raise PrepError(
            f"--vocab-size {vocab_size} is too small; use at least {MIN_VOCAB_SIZE} "
            "(real models use 8000-64000)"
        )
    if sample_bytes <= 0:
        raise PrepError(f"--sample-bytes must be positive, got {sample_bytes}")
    if pretokenize not in PRETOKENIZERS:
        raise PrepError(f"unknown --pretokenize {pretokenize!r}; choose none or mecab")
    if pretokenize == "mecab" and kind != "wordpiece":
        raise PrepError(
            "--pretokenize mecab goes with --kind wordpiece (SentencePiece reads raw text)"
        )
    read = read or ReadConfig(doc_sep=doc_sep, text_field=text_field)
    read.validate()
    clean = clean or CleanConfig()
    clean.validate()
    segment = mecab_segmenter() if pretokenize == "mecab" else None
    out = Path(out_dir)
    refuse_out_among_inputs(files, expand_inputs(files, pattern), out)
    with tempfile.TemporaryDirectory(prefix="bert-prep-sample-") as tmp:
        sample = Path(tmp) / "sample.txt"
        sample_info = write_sample(
            files,
            sample,
            sample_bytes=sample_bytes,
            lang=lang,
            read=read,
            clean=clean,
            pattern=pattern,
            segment=segment,
        )
        out.mkdir(parents=True, exist_ok=True)  # only once the input has been read
        lang = sample_info.lang
        if kind == "wordpiece":
            # Uncased = accent stripping, which turns ガ into カ: only for text without kana.
            lowercase = (
                not cased
                and pretokenize == "none"
                and lang == "en"
                and sample_info.kana_fraction < KANA_LIMIT
            )
            tok = _train_wordpiece(sample, vocab_size, lowercase, pretokenize)
        else:
            lowercase = False
            tok = _train_sentencepiece(sample, out, vocab_size, sp_model_type, lang)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != token_id:
            raise RuntimeError(f"{token} got id {tok.token_to_id(token)}, expected {token_id}")
    tok.add_special_tokens(SPECIAL_TOKENS)  # never split, never normalised
    tok.post_processor = _post_processor()
    tok.save(str(out / "tokenizer.json"))
    _write_hf_files(out, tok, kind, lowercase, pretokenize)
    meta = {
        "kind": kind,
        "pretokenize": pretokenize,
        "vocab_size": tok.get_vocab_size(),
        "lowercase": lowercase,
        "lang": lang,
        "sp_model_type": sp_model_type if kind == "sentencepiece" else None,
        "special_tokens": dict(zip(SPECIAL_NAMES, SPECIAL_TOKENS, strict=True)),
        "special_ids": {name: i for i, name in enumerate(SPECIAL_NAMES)},
        "hash": file_sha256(out / "tokenizer.json"),
    }
    _write_json(out / META_FILE, meta)
    return out


def _write_hf_files(
    out: Path, tok: Tokenizer, kind: str, lowercase: bool, pretokenize: str = "none"
) -> None:
    """tokenizer_config.json + special_tokens_map.json (+ vocab.txt) for transformers."""
    special_map = {
        f"{name}_token": token for name, token in zip(SPECIAL_NAMES, SPECIAL_TOKENS, strict=True)
    }
    config: dict = {
        **special_map,
        "model_max_length": MODEL_MAX_LENGTH,
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
    }
    if kind == "wordpiece" and pretokenize == "mecab":
        # The Tohoku BERT settings: transformers runs NFKC + MeCab (fugashi, unidic-lite) and
        # then WordPiece on vocab.txt, which is what our encoder does.
        config.update(
            tokenizer_class="BertJapaneseTokenizer",
            do_lower_case=False,
            word_tokenizer_type="mecab",
            subword_tokenizer_type="wordpiece",
            mecab_kwargs={"mecab_dic": "unidic_lite"},
        )
    elif kind == "wordpiece":
        # transformers 5 rebuilds BERT's pipeline from these flags plus the vocabulary.
        config.update(
            tokenizer_class="BertTokenizerFast",
            do_lower_case=lowercase,
            strip_accents=None,
            tokenize_chinese_chars=True,
        )
    if kind == "wordpiece":
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        with open(out / "vocab.txt", "w", encoding="utf-8") as f:
            f.writelines(token + "\n" for token, _ in vocab)
    else:
        # The generic class loads tokenizer.json as is; sentencepiece-specific classes
        # (Albert, XLNet, ...) rebuild their own normaliser and would lowercase/strip accents.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)


def tokenizer_info(tokenizer_dir: str | Path) -> dict:
    """Contents of bert_tokenizer.json (kind, vocab_size, lowercase, special_ids, hash, ...)."""
    path = Path(tokenizer_dir) / META_FILE
    if not path.is_file():
        raise PrepError(
            f"{path}: missing; pass a directory written by `bert-prep tokenizer` to --tokenizer"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_tokenizer(tokenizer_dir: str | Path) -> Tokenizer:
    """The `tokenizers.Tokenizer`; checks tokenizer.json against the hash in our metadata so a
    hand-edited tokenizer cannot silently produce ids that disagree with existing shards."""
    directory = Path(tokenizer_dir)
    info = tokenizer_info(directory)
    path = directory / "tokenizer.json"
    if not path.is_file() or file_sha256(path) != info["hash"]:
        raise PrepError(
            f"{path}: missing or changed since training (hash mismatch); retrain with "
            "`bert-prep tokenizer`"
        )
    return Tokenizer.from_file(str(path))


def mecab_segmenter() -> Callable[[str], str]:
    """NFKC + MeCab (fugashi, unidic-lite) word segmentation, words joined by one space: the
    same words as transformers' MecabTokenizer(mecab_dic="unidic_lite", normalize_text=True)."""
    try:
        import fugashi
        import unidic_lite
    except ImportError:
        raise PrepError(
            "--pretokenize mecab needs fugashi and unidic-lite: pip install "
            "'bert-pretrain[ja]' (or pip install fugashi unidic-lite)"
        ) from None
    dic = unidic_lite.DICDIR
    tagger = fugashi.GenericTagger(f'-d "{dic}" -r "{os.path.join(dic, "mecabrc")}" -Owakati')

    def segment(text: str) -> str:
        text = unicodedata.normalize("NFKC", text)
        return " ".join(tagger.parse(text).split()) if text.strip() else ""

    return segment


def load_segmenter(tokenizer_dir: str | Path) -> Callable[[str], str] | None:
    """The word segmenter the tokenizer expects before tokenizer.json (None: raw text)."""
    if tokenizer_info(tokenizer_dir).get("pretokenize", "none") == "mecab":
        return mecab_segmenter()
    return None


def continuation_mask(tokenizer_dir: str | Path) -> np.ndarray:
    """bool[vocab_size]: True for tokens that continue a word (for whole-word masking).

    WordPiece: tokens starting with '##'. SentencePiece: pieces not starting with '▁'
    (specials excluded). Note that Japanese has no spaces, so for SentencePiece a "word" is
    everything between spaces: often a whole sentence.
    """
    info = tokenizer_info(tokenizer_dir)
    vocab = load_tokenizer(tokenizer_dir).get_vocab()
    mask = np.zeros(info["vocab_size"], dtype=bool)
    for token, token_id in vocab.items():
        if token_id < len(SPECIAL_TOKENS):
            continue
        if info["kind"] == "wordpiece":
            mask[token_id] = token.startswith("##")
        else:
            mask[token_id] = not token.startswith("▁")
    return mask
