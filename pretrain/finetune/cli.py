"""`bert-finetune`: fine-tune a Hugging Face BERT directory (e.g. a bert-export) and score it.

    bert-finetune --model runs/demo/hf --task classify \\
        --train sst2/train.tsv.gz --dev sst2/dev.tsv --text-column sentence --lr 1e-3
    bert-finetune --model runs/demo/hf --task ner \\
        --train ncbi-disease/conll/train.tsv --dev ncbi-disease/conll/devel.tsv --lr 1e-3
    bert-finetune --model runs/demo/hf --task pair --train pairs.jsonl --dev pairs_dev.jsonl \\
        --text-column premise --text-b-column hypothesis

stdout gets the results: a readable table, then the same numbers as one JSON object on the last
line (`bert-finetune ... | tail -n 1`). Progress and log lines go to stderr. The fine-tuned
model (safetensors, config with the label names, tokenizer) goes to --out with metrics.json
(the report, the options and the dev curve) and test_predictions.jsonl when --test is given.
User errors print one line `bert-finetune: error: ...` and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain.finetune.training import FinetuneOptions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bert-finetune",
        description="Fine-tune an exported BERT with transformers' AutoModelForSequence"
        "Classification / AutoModelForTokenClassification and report dev/test scores.",
        epilog="Inputs: TSV/CSV with a header, JSONL, or CoNLL 'token<TAB>tag' (ner), "
        "optionally gzipped. Defaults suit BERT-base; tiny models want a larger --lr (~1e-3).",
    )
    add = parser.add_argument
    add(
        "--model",
        required=True,
        type=Path,
        help="export directory (config.json, weights, tokenizer)",
    )
    add(
        "--task",
        required=True,
        choices=["classify", "pair", "ner"],
        help="classify: one text; pair: text + text_b; ner: BIO token tags",
    )
    add("--train", required=True, type=Path, help="training file")
    add("--dev", required=True, type=Path, help="dev file (early stopping and the dev score)")
    add(
        "--test",
        type=Path,
        help="test file, scored once with the best dev weights; "
        "without labels, only predictions are written",
    )
    add(
        "--text-column",
        help="text (ner JSONL: token list) column; default: the first of "
        "text, sentence, sentence1, text_a, question (ner: tokens, words)",
    )
    add("--text-b-column", help="second text for --task pair; default text_b or sentence2")
    add(
        "--label-column",
        help="label (ner JSONL: tag list) column; default label, labels, "
        "category or class (ner: tags, ner_tags)",
    )
    add("--epochs", type=float, default=3.0, help="default 3 (fractions allowed)")
    add("--lr", type=float, default=5e-5, help="peak AdamW learning rate (default 5e-5)")
    add("--warmup-ratio", type=float, default=0.1, help="fraction of steps warming up (0.1)")
    add("--weight-decay", type=float, default=0.01, help="default 0.01")
    add("--batch-size", type=int, default=32, help="default 32")
    add(
        "--max-length",
        type=int,
        help="sub-words per example incl. [CLS]/[SEP] (default 128, "
        "or the model's position count if smaller)",
    )
    add("--seed", type=int, default=42, help="head initialisation and data order (default 42)")
    add(
        "--patience",
        type=int,
        default=2,
        help="stop after this many evaluations without a better dev score (default 2; 0 = never)",
    )
    add(
        "--eval-every",
        type=int,
        default=0,
        help="evaluate on dev every N steps (default: once per epoch)",
    )
    add(
        "--max-train-examples",
        type=int,
        help="train on a random subset of this size (the same subset for every --seed)",
    )
    add("--out", type=Path, help="output directory (default: MODEL-TASK beside the model)")
    add("--force", action="store_true", help="replace an earlier bert-finetune output in --out")
    add(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="fp32",
        help="autocast precision (default fp32; auto = fp16 below compute capability 8.0, bf16 "
        "from 8.0, bf16 on CPUs with native bf16, else fp32)",
    )
    add("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    add("--no-progress", action="store_true", help="no progress bar (default: on a terminal)")
    return parser


def table(report: dict) -> str:
    """The readable results: one row per scored split."""
    if report["task"] == "ner":
        columns = ["f1", "precision", "recall", "token_accuracy", "gold_entities"]
    else:
        columns = ["accuracy", "macro_f1", "majority_baseline"]
    rows = [["split", "examples", *columns]]
    for split in ("dev", "test"):
        scores = report.get(split)
        if not scores or scores.get("labelled") is False:
            continue
        cells = [split, str(scores["examples"])]
        for column in columns:
            value = scores[column]
            cells.append(f"{value:.4f}" if isinstance(value, float) else str(value))
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = FinetuneOptions(
        model=args.model,
        task=args.task,
        train=args.train,
        dev=args.dev,
        test=args.test,
        text_column=args.text_column,
        text_b_column=args.text_b_column,
        label_column=args.label_column,
        epochs=args.epochs,
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        patience=args.patience,
        eval_every=args.eval_every,
        max_train_examples=args.max_train_examples,
        out=args.out,
        force=args.force,
        precision=args.precision,
        device=args.device,
        progress=False if args.no_progress else None,
    )
    from pretrain.config import ConfigError
    from pretrain.finetune.training import run

    try:
        report = run(options)
    except ConfigError as error:  # DataError and FinetuneError are ConfigErrors
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"bert-finetune: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bert-finetune: interrupted", file=sys.stderr)
        return 130
    print(table(report))
    print(json.dumps({k: v for k, v in report.items() if k != "labels"}, ensure_ascii=False))
    print(f"bert-finetune: wrote {report['out']} (model, tokenizer, metrics.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
