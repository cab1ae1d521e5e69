"""`bert-prep`: train a tokenizer, encode a corpus into shards, verify or merge datasets.

    bert-prep tokenizer --input data_prep/corpus/gutenberg_excerpt.txt.gz --out runs/tok
    bert-prep encode --input data_prep/corpus/gutenberg_excerpt.txt.gz --tokenizer runs/tok \\
        --out runs/data
    bert-prep verify runs/data
    bert-prep merge runs/data_a runs/data_b --out runs/data

User errors print one line (`bert-prep: error: ...`) and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from data_prep.errors import PrepError
from data_prep.sentences import LANGS
from data_prep.sources import DOC_SEPS

PROG = "bert-prep"


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="text (.txt) or JSON Lines (.jsonl) files, optionally .gz/.xz/.bz2, or "
        "directories (all files inside, sorted)",
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
        help="field holding the text in .jsonl records (default: text)",
    )
    parser.add_argument(
        "--lang",
        choices=LANGS,
        default="auto",
        help="sentence-splitting rules; auto picks ja when the text is mostly CJK (default)",
    )


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
        "--sample-bytes",
        type=int,
        default=100_000_000,
        metavar="N",
        help="train on about this many bytes of text taken across the inputs (default 100 MB)",
    )

    enc = sub.add_parser(
        "encode",
        help="corpus -> indexed token shards + manifest.json",
        description="Split documents into sentences, encode them and write shards "
        "(shard_00000.bin/.idx, ...), manifest.json and a copy of the tokenizer to --out.",
    )
    _add_source_args(enc)
    enc.add_argument("--tokenizer", required=True, metavar="DIR", help="from `bert-prep tokenizer`")
    enc.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write")
    enc.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="encoding processes (output is identical for any N; default 1)",
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
    stats = manifest.get("stats", {})
    dropped = ", ".join(f"{k} {v}" for k, v in stats.get("dropped", {}).items()) or "none"
    print(f"wrote {len(manifest['shards'])} shard(s) + manifest.json to {out}")
    print(
        f"documents {manifest['num_documents']}, sentences {manifest['num_sentences']}, "
        f"tokens {manifest['num_tokens']} ({manifest['dtype']})"
    )
    print(
        f"dropped documents: {dropped}; invalid UTF-8 lines {stats.get('invalid_utf8_lines', 0)}"
        f", invalid JSON lines {stats.get('invalid_json_lines', 0)}, records without the "
        f"text field {stats.get('missing_field_records', 0)}"
    )


def _run(args: argparse.Namespace) -> int:
    # Imported here so `--help` and argument errors stay fast.
    if args.command == "tokenizer":
        from data_prep.tokenizer import tokenizer_info, train_tokenizer

        out = train_tokenizer(
            args.input,
            args.out,
            args.kind,
            args.vocab_size,
            cased=args.cased,
            lang=args.lang,
            sp_model_type=args.sp_model_type,
            sample_bytes=args.sample_bytes,
            doc_sep=args.doc_sep,
            text_field=args.text_field,
        )
        info = tokenizer_info(out)
        print(f"wrote tokenizer to {out}")
        print(
            f"kind {info['kind']}, vocab_size {info['vocab_size']}, lowercase "
            f"{info['lowercase']}, lang {info['lang']}, hash {info['hash'][:12]}"
        )
        return 0
    if args.command == "encode":
        from data_prep.encode import encode_corpus

        manifest = encode_corpus(
            args.input,
            args.tokenizer,
            args.out,
            doc_sep=args.doc_sep,
            text_field=args.text_field,
            lang=args.lang,
            shard_tokens=args.shard_tokens,
            min_doc_tokens=args.min_doc_tokens,
            workers=args.workers,
        )
        _print_summary(manifest, args.out)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `bert-prep` and `python -m data_prep`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (PrepError, OSError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exception held
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
