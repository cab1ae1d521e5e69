"""The built-in demo: corpus → tokenizer → shards → tiny MLM BERT → checkpoint → HF export.

    python -m pretrain.demo --lang en   # `make demo`: Gutenberg excerpt, uncased WordPiece
    python -m pretrain.demo --lang ja   # `make demo-ja`: Akutagawa, cased SentencePiece

Each stage is the real command (bert-prep, bert-train, bert-export) called in-process, so the
demo exercises exactly what a user runs. Extra `key=value` arguments go to bert-train.

The English demo trains on 32-token sequences, 128 per step (the same 4,096 tokens per step as
configs/tiny.yaml's 32 x 128): a 2-layer model leaves the word-frequency plateau within a few
hundred steps on short sequences and stays on it far longer on 128-token ones
(docs/benchmarks.md, "Fine-tuning"). The precision is the config's `auto`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from data_prep import cli as prep_cli
from pretrain import export_hf
from pretrain.config import ConfigError, load_config
from pretrain.trainer import print_summary, train

CORPUS_DIR = Path(__file__).resolve().parent.parent / "data_prep" / "corpus"
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"

LANGUAGES = {
    "en": {
        "corpus": "gutenberg_excerpt.txt.gz",
        "tokenizer": ["--kind", "wordpiece", "--vocab-size", "8000", "--lang", "en"],
        "encode": ["--lang", "en"],
        # Short sequences first (see the module docstring); 300 steps, ~1.2 M tokens.
        "train": ["data.seq_len=32", "train.micro_batch=128", "train.global_batch=128"],
    },
    "ja": {
        "corpus": "akutagawa.txt",
        "tokenizer": ["--kind", "sentencepiece", "--vocab-size", "2000", "--lang", "ja"],
        "encode": ["--lang", "ja"],
        # Five short stories (~30k tokens): hold out more, train less, or it only memorises.
        "train": ["data.valid_fraction=0.1", "train.steps=150", "train.eval_every=50"],
    },
}


def _run(step: str, code: int) -> None:
    if code != 0:
        raise SystemExit(f"demo: {step} failed with exit code {code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__)
    parser.add_argument("--lang", choices=sorted(LANGUAGES), default="en")
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="bert-train overrides")
    args = parser.parse_args(argv)
    spec = LANGUAGES[args.lang]
    out = Path(args.out)
    corpus = str(CORPUS_DIR / spec["corpus"])
    tokenizer_dir, data_dir = out / "tokenizer", out / "data"
    if out.exists():  # the demo owns its run directory: start from scratch every time
        print(f"removing the previous demo run in {out}", flush=True)
        shutil.rmtree(out)
    started = time.perf_counter()

    print(f"== 1/4 tokenizer: {corpus}", flush=True)
    _run(
        "tokenizer",
        prep_cli.main(
            ["tokenizer", "--input", corpus, "--out", str(tokenizer_dir), *spec["tokenizer"]]
        ),
    )
    print("== 2/4 encode", flush=True)
    _run(
        "encode",
        prep_cli.main(
            [
                "encode",
                "--input",
                corpus,
                "--tokenizer",
                str(tokenizer_dir),
                "--out",
                str(data_dir),
                *spec["encode"],
            ]
        ),
    )
    print("== 3/4 pre-train (CPU)", flush=True)
    try:
        config = load_config(
            DEMO_CONFIG,
            [
                f"data.path={data_dir}",
                f"train.out_dir={out}",
                "train.resume=none",
                *spec["train"],
                *args.overrides,
            ],
        )
        result = train(config)
    except ConfigError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 2
    if result.checkpoint is None:
        print("demo: training wrote no checkpoint", file=sys.stderr)
        return 1
    print("== 4/4 export to Hugging Face format", flush=True)
    export_dir = out / "hf"
    _run(
        "export",
        export_hf.main(
            ["--checkpoint", str(result.checkpoint), "--out", str(export_dir), "--force"]
        ),
    )
    print_summary(result)
    print(
        f"summary: Hugging Face export {export_dir} "
        f"(AutoModelForMaskedLM.from_pretrained('{export_dir}'))"
    )
    _print_timing_and_next_steps(export_dir, time.perf_counter() - started)
    return result.exit_code


def _print_timing_and_next_steps(export_dir: Path, seconds: float) -> None:
    """The demo's total time (the training summary above has the throughput) and what to run
    next."""
    print(f"summary: the whole demo took {seconds:.0f} s (tokenizer, encode, training, export)")
    print(
        "next: fine-tune the export (after `make install`, which adds transformers): "
        f"bert-finetune --model {export_dir} --task classify --train train.tsv --dev dev.tsv "
        "--lr 1e-3\n"
        "next: train on your own corpus: README.md, 'Using it on your corpus' "
        "(bert-prep tokenizer, bert-prep encode, bert-train --config configs/base.yaml)"
    )


if __name__ == "__main__":
    sys.exit(main())
