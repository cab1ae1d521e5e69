"""`bert-prep`: train a tokenizer, encode a corpus into shards, verify or merge datasets.

    bert-prep tokenizer --input data_prep/corpus/gutenberg_excerpt.txt.gz --out runs/tok
    bert-prep encode --input data_prep/corpus/gutenberg_excerpt.txt.gz --tokenizer runs/tok \\
        --out runs/data
    bert-prep verify runs/data
    bert-prep merge runs/data_a runs/data_b --out runs/data

Many nodes: `srun -n 8 bert-prep encode ...` / `mpirun -n 8 bert-prep encode ...` (ranks share
the output directory), or a job array running `bert-prep encode ... --num-shards 8
--shard-index $SLURM_ARRAY_TASK_ID --out pieces/$SLURM_ARRAY_TASK_ID` and then
`bert-prep merge pieces/* --out data`. Either way the shards are the bytes one process writes.

User errors print one line (`bert-prep: error: ...`) and exit with code 2.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence

from data_prep.clean import NFKC_MODES
from data_prep.errors import PrepError
from data_prep.sentences import LANGS
from data_prep.sources import DEFAULT_MAX_DOC_CHARS, DOC_SEPS, FORMATS

PROG = "bert-prep"


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="text, JSON Lines (.jsonl) or WikiExtractor files, optionally .gz/.xz/.bz2/.zst; "
        "directories (searched recursively, sorted) or quoted glob patterns",
    )
    parser.add_argument(
        "--pattern",
        default="*",
        metavar="GLOB",
        help="which files of an input directory to read (default: all; e.g. 'wiki_*')",
    )
    parser.add_argument(
        "--format",
        dest="fmt",
        choices=FORMATS,
        default="auto",
        help="auto (default): .jsonl/.ndjson/.json are JSON Lines, files starting with "
        "'<doc ' are WikiExtractor output, the rest plain text",
    )
    parser.add_argument(
        "--doc-sep",
        choices=DOC_SEPS,
        default="blank",
        help="what ends a document in text files: blank = blank lines and form-feed lines "
        "(default); line = every line is a document; formfeed = only form-feed lines",
    )
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="F",
        help="field holding the text in .jsonl records (default: text; livedoor: body)",
    )
    parser.add_argument(
        "--encoding",
        default="utf-8",
        metavar="CODEC",
        help="input encoding (default utf-8; e.g. cp932 for Shift_JIS, euc-jp); lines that "
        "do not decode are dropped and counted, but a file where more than 1%% of the lines "
        "fail stops the run with a suggested encoding",
    )
    parser.add_argument(
        "--lang",
        choices=LANGS,
        default="auto",
        help="sentence-splitting rules; auto picks ja per document when the text is mostly "
        "CJK (default)",
    )
    clean = parser.add_argument_group("cleaning (every dropped document is counted by reason)")
    clean.add_argument(
        "--nfkc",
        choices=NFKC_MODES,
        default="auto",
        help="Unicode NFKC normalisation: auto = Japanese documents only (default)",
    )
    clean.add_argument(
        "--keep-control",
        dest="remove_control",
        action="store_false",
        help="keep control characters (default: removed, except tab and newline)",
    )
    clean.add_argument(
        "--keep-whitespace",
        dest="fold_whitespace",
        action="store_false",
        help="keep whitespace as is (default: runs of spaces folded to one, line ends trimmed, "
        "at most one blank line)",
    )
    clean.add_argument("--lowercase", action="store_true", help="lower-case the text")
    clean.add_argument(
        "--min-doc-chars",
        type=int,
        default=1,
        metavar="N",
        help="drop documents shorter than N characters after cleaning (too_few_chars)",
    )
    clean.add_argument(
        "--max-doc-chars",
        type=int,
        default=DEFAULT_MAX_DOC_CHARS,
        metavar="N",
        help=f"drop longer documents (too_long; default {DEFAULT_MAX_DOC_CHARS:,}); also caps "
        "the memory one line or document can take",
    )


def _read_clean(args: argparse.Namespace):
    from data_prep.clean import CleanConfig
    from data_prep.sources import ReadConfig

    read = ReadConfig(
        doc_sep=args.doc_sep,
        text_field=args.text_field,
        fmt=args.fmt,
        encoding=args.encoding,
        max_doc_chars=args.max_doc_chars,
    )
    clean = CleanConfig(
        nfkc=args.nfkc,
        remove_control=args.remove_control,
        fold_whitespace=args.fold_whitespace,
        lowercase=args.lowercase,
        min_doc_chars=args.min_doc_chars,
    )
    return read, clean


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Prepare BERT pre-training data: tokenizer, indexed token shards, checks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = sub.add_parser(
        "tokenizer",
        help="train a tokenizer",
        description="Train a WordPiece or SentencePiece tokenizer on a sample of the inputs. "
        "Special tokens are ids 0-4: [PAD] [UNK] [CLS] [SEP] [MASK]. The directory loads "
        "with transformers.AutoTokenizer.from_pretrained.",
    )
    _add_source_args(tok)
    tok.add_argument("--out", required=True, metavar="DIR", help="tokenizer directory to write")
    tok.add_argument(
        "--kind",
        choices=("wordpiece", "sentencepiece"),
        default="wordpiece",
        help="wordpiece (BERT; default) or sentencepiece (better for Japanese)",
    )
    tok.add_argument("--vocab-size", type=int, default=30522, metavar="N", help="default 30522")
    tok.add_argument(
        "--cased",
        action="store_true",
        help="WordPiece: keep case and accents (default: uncased for English; Japanese is "
        "always cased so that ガ stays distinct from カ)",
    )
    tok.add_argument(
        "--sp-model-type",
        choices=("unigram", "bpe"),
        default="unigram",
        help="SentencePiece algorithm (default unigram)",
    )
    tok.add_argument(
        "--pretokenize",
        choices=("none", "mecab"),
        default="none",
        help="mecab: cut Japanese into words with MeCab (fugashi + unidic-lite) before "
        "WordPiece, as the Tohoku BERT models do; loads as transformers' "
        "BertJapaneseTokenizer (needs the 'ja' extra)",
    )
    tok.add_argument(
        "--sample-bytes",
        type=int,
        default=100_000_000,
        metavar="N",
        help="train on about this many bytes of text taken across the inputs (default 100 MB)",
    )

    enc = sub.add_parser(
        "encode",
        help="corpus -> indexed token shards + manifest.json",
        description="Read, clean and deduplicate documents, split them into sentences, encode "
        "them and write shards (shard_UUUUU_PPPP.bin/.idx), manifest.json and a copy of the "
        "tokenizer to --out. Restarted with the same command, a killed run redoes only the "
        "unfinished work units. Under mpirun/srun every rank takes its part of the units. "
        "An --out holding a dataset of another command is replaced only with --overwrite.",
    )
    _add_source_args(enc)
    enc.add_argument("--tokenizer", required=True, metavar="DIR", help="from `bert-prep tokenizer`")
    enc.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write")
    enc.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the dataset that --out holds when it was made from other inputs, "
        "settings or tokenizer (without this flag that is refused); the new one is built in "
        "OUT.new and swapped in only once complete",
    )
    enc.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="encoding processes on this node (output is identical for any N; default 1)",
    )
    enc.add_argument(
        "--shard-tokens",
        type=int,
        default=50_000_000,
        metavar="N",
        help="at most this many tokens per shard (default 50M)",
    )
    enc.add_argument(
        "--min-doc-tokens",
        type=int,
        default=8,
        metavar="N",
        help="drop documents with fewer tokens, counted as too_short (default 8)",
    )
    enc.add_argument(
        "--no-dedupe",
        dest="dedupe",
        action="store_false",
        help="keep exact duplicate documents (default: only the first copy is kept)",
    )
    enc.add_argument(
        "--unit-bytes",
        type=int,
        default=256_000_000,
        metavar="N",
        help="input bytes per work unit, the grain of parallel work and of resuming (default "
        "256 MB); part of the output's identity: keep it when resuming or merging pieces",
    )
    enc.add_argument(
        "--num-shards",
        type=int,
        default=1,
        metavar="K",
        help="split the work into K independent pieces (e.g. a job array); run every piece "
        "with --shard-index 0..K-1 and its own --out, then `bert-prep merge`",
    )
    enc.add_argument("--shard-index", type=int, default=0, metavar="I", help="this piece (0-based)")
    enc.add_argument(
        "--log-every",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds between progress lines when stderr is not a terminal (default 30)",
    )
    enc.add_argument(
        "--rank-timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="under mpirun/srun: rank 0 gives up after S seconds without another rank "
        "finishing a unit (default 3600)",
    )

    ver = sub.add_parser(
        "verify",
        help="check shards against the manifest",
        description="Re-hash every shard of a dataset and report any that are missing or "
        "changed. Exit code 1 if any is bad.",
    )
    ver.add_argument("dir", metavar="DIR", help="dataset directory (holds manifest.json)")

    mrg = sub.add_parser(
        "merge",
        help="join datasets encoded with the same tokenizer",
        description="Concatenate the shard lists of several dataset directories (same "
        "tokenizer) into a new one; shard files are hard-linked when possible, else copied.",
    )
    mrg.add_argument("dirs", nargs="+", metavar="DIR", help="dataset directories, in order")
    mrg.add_argument("--out", required=True, metavar="DIR", help="new dataset directory")
    return parser


def _print_summary(manifest: dict, out: str) -> None:
    from data_prep.progress import summary_table

    what = "piece" if "piece" in manifest else "dataset"
    print(f"wrote {len(manifest['shards'])} shard(s) + manifest.json ({what}) to {out}")
    print(summary_table(manifest))
    if "piece" in manifest:
        piece = manifest["piece"]
        print(
            f"piece {piece['index']} of {piece['count']}: when all pieces are done, join them "
            "with `bert-prep merge PIECE_DIR... --out DIR`"
        )


def _run(args: argparse.Namespace) -> int:
    # Imported here so `--help` and argument errors stay fast.
    if args.command == "tokenizer":
        from data_prep.tokenizer import tokenizer_info, train_tokenizer

        read, clean = _read_clean(args)
        out = train_tokenizer(
            args.input,
            args.out,
            args.kind,
            args.vocab_size,
            cased=args.cased,
            lang=args.lang,
            sp_model_type=args.sp_model_type,
            sample_bytes=args.sample_bytes,
            pretokenize=args.pretokenize,
            read=read,
            clean=clean,
            pattern=args.pattern,
        )
        info = tokenizer_info(out)
        print(f"wrote tokenizer to {out}")
        print(
            f"kind {info['kind']}, vocab_size {info['vocab_size']}, lowercase "
            f"{info['lowercase']}, lang {info['lang']}, pretokenize "
            f"{info.get('pretokenize', 'none')}, hash {info['hash'][:12]}"
        )
        return 0
    if args.command == "encode":
        from data_prep.encode import EncodeSettings, encode_corpus

        read, clean = _read_clean(args)
        settings = EncodeSettings(
            read=read,
            clean=clean,
            lang=args.lang,
            min_doc_tokens=args.min_doc_tokens,
            shard_tokens=args.shard_tokens,
            unit_bytes=args.unit_bytes,
            dedupe=args.dedupe,
            pattern=args.pattern,
        )
        result = encode_corpus(
            args.input,
            args.tokenizer,
            args.out,
            settings,
            workers=args.workers,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
            log_every=args.log_every,
            rank_timeout=args.rank_timeout,
            overwrite=args.overwrite,
        )
        if "shards" not in result:  # a rank other than 0
            print(
                f"rank {result['rank']} of {result['world_size']}: encoded "
                f"{result['encoded_units']} of its {result['units']} unit(s) in {args.out}; "
                "rank 0 writes manifest.json"
            )
            return 0
        _print_summary(result, args.out)
        return 0
    if args.command == "verify":
        from data_prep.shard_format import read_manifest, verify

        bad = verify(args.dir)
        n = len(read_manifest(args.dir)["shards"])
        if bad:
            print(f"{len(bad)} of {n} shard(s) missing or changed: {', '.join(bad)}")
            return 1
        print(f"all {n} shard(s) in {args.dir} match manifest.json")
        return 0
    if args.command == "merge":
        from data_prep.merge import merge_datasets

        manifest = merge_datasets(args.dirs, args.out)
        _print_summary(manifest, args.out)
        return 0
    raise AssertionError(args.command)


def _os_error_text(exc: OSError) -> str:
    """`PATH: reason; what to do`: a full disk or a bad permission is the user's to fix, and
    finished work units are kept, so the same command then continues."""
    where = f"{exc.filename}: " if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}: "
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free space (or raise the limit), then run the same command again"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "check the permissions, or choose another path"
    else:
        hint = "check the path"
    return f"{where}{reason}; {hint}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `bert-prep` and `python -m data_prep`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (PrepError, OSError) as exc:
        text = _os_error_text(exc) if isinstance(exc, OSError) else str(exc)
        message = " ".join(text.split())  # one line, whatever the exception held
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
