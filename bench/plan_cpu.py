"""bert-plan's predicted step time against bert-train's measured one, on this CPU.

    .venv/bin/python -m bench.plan_cpu                 # ~15 min on 2 idle cores
    .venv/bin/python -m bench.plan_cpu --repeats 3 --steps 16

Run it on an idle machine: one other single-threaded process at nice 19 doubled the tp 2
step here (0.65 s against 0.27-0.34 s), since every rank waits for the slowest at each
collective.

1. Prepares a small English dataset from the built-in corpus (WordPiece, 2,000 tokens).
2. Calibrates with `bert-plan --measure` on each config before its cells, as a user would
   on the config they plan (one process, at 1 and at 2 threads, and at 1 thread beside a
   neighbour process training the same step, which the 2-process cells use; what it fits,
   from real steps at two micro-batches and two depths, is the elementwise rate per byte and
   the dispatch cost per layer and per micro-batch; the gloo all-reduce's cost per small call
   is timed inside two processes' real steps of the config, as a step meets it). The
   1-process cells are what it was calibrated on; the 2- and 4-process cells are predictions.
3. For tiny and base at 1 process, dp 2 and tp 2 (torchrun, gloo; one thread per process
   everywhere, as the calibration the cells use), and
   for 4 processes (dp 2 x tp 2, oversubscribing 2 cores: reported, not gated), runs bert-train
   for `--steps` steps `--repeats` times and takes the median of its logged ms_per_step after
   the first WARMUP steps (a 2-process run's steps 3-5 ran 20-30% slower than its later ones
   here); the prediction is the plan model's step time of that exact layout with the
   stored calibration.
4. Prints a Markdown table (docs/benchmarks.md): predicted, measured median and run-to-run
   spread (max - min of the runs' medians over their mean) per cell, the error, and the median
   absolute error of the 2-process cells, which must be within 25%.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEQ = 128
WARMUP = 4  # steps left out of each run's median
CELLS = [  # (config, processes, tp, micro-batch, global batch); each config's 1 process first
    ("tiny", 1, 1, 32, 32),
    ("tiny", 2, 1, 16, 32),
    ("tiny", 2, 2, 32, 32),
    ("tiny", 4, 2, 16, 32),
    ("base", 1, 1, 8, 8),
    ("base", 2, 1, 4, 8),
    ("base", 2, 2, 8, 8),
    ("base", 4, 2, 4, 8),
]


def prepare(out: Path) -> tuple[Path, int]:
    """(data directory, vocabulary size) of a small dataset from the built-in corpus."""
    from tokenizers import Tokenizer

    from data_prep.encode import encode_corpus
    from data_prep.sources import CORPUS_DIR
    from data_prep.tokenizer import train_tokenizer

    corpus = out / "corpus.txt.gz"
    text = gzip.decompress((CORPUS_DIR / "gutenberg_excerpt.txt.gz").read_bytes())
    corpus.write_bytes(gzip.compress(text[:400_000]))
    train_tokenizer([corpus], out / "tokenizer", "wordpiece", 2000, lang="en")
    encode_corpus([corpus], out / "tokenizer", out / "data", lang="en")
    vocab = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json")).get_vocab_size()
    return out / "data", vocab


def overrides(data: Path, micro: int, global_batch: int, tp: int, steps: int) -> list[str]:
    return [
        f"data.path={data}",
        f"data.seq_len={SEQ}",
        "data.valid_fraction=0",
        "data.workers=1",
        f"train.micro_batch={micro}",
        f"train.global_batch={global_batch}",
        f"parallel.tp={tp}",
        f"train.steps={steps}",
        "train.log_every=1",
        "checkpoint.every=100000",
    ]


def measure(config: str, processes: int, args: list[str], out: Path) -> float:
    """Median ms_per_step of one bert-train run, after its first WARMUP steps."""
    command = [sys.executable, "-m", "pretrain", "--config", str(REPO / "configs" / config)]
    if processes > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "pretrain",
            "--config",
            str(REPO / "configs" / config),
        ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [*command, *args, f"train.out_dir={out}", "train.resume=none"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"bert-train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    records = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"ms_per_step"' in line
    ]
    return statistics.median(r["ms_per_step"] for r in records[WARMUP:]) / 1000


def predict(config: str, processes: int, tp: int, micro: int, global_batch: int, vocab: int):
    from pretrain.config import load_config, resolve_model_shape
    from pretrain.memory import Layout
    from pretrain.plan import plan_precision
    from pretrain.plan_measure import load_calibration
    from pretrain.plan_model import step_time

    cfg = load_config(REPO / "configs" / f"{config}.yaml", [f"data.seq_len={SEQ}"])
    shape = resolve_model_shape(cfg, vocab)
    precision = plan_precision(cfg.train.precision, "cpu")
    rates = load_calibration("cpu", precision, processes, shape)
    if rates is None:
        raise SystemExit("no calibration stored: the --measure step failed")
    dp = processes // tp
    layout = Layout(
        seq_len=SEQ,
        micro_batch=micro,
        tp=tp,
        dp=dp,
        precision=precision,
        mlm_mode=cfg.mlm.mode,
        mask_rate=cfg.mlm.mask_rate,
        accumulation=global_batch // (micro * dp),
        device="cpu",
    )
    return step_time(shape, layout, rates, processes).total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="plan-cpu-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("XDG_CACHE_HOME", str(work / "cache"))
        # One thread per process in every cell (2 cores): the plan reads OMP_NUM_THREADS, and
        # the calibration at one thread is the one every cell uses.
        os.environ["OMP_NUM_THREADS"] = "1"
        data, vocab = prepare(work)
        print(
            "| config | processes | layout | predicted s | measured s (median) | spread | error |"
        )
        print("|---|---:|---|---:|---:|---:|---:|")
        gated = []
        calibrated = None
        for config, processes, tp, micro, global_batch in CELLS:
            if config != calibrated:  # as a user would: --measure on the config to be planned
                one = next(c for c in CELLS if c[0] == config and c[1] == 1)
                calibrate = ["--config", str(REPO / "configs" / f"{config}.yaml"), "--cluster"]
                cell = overrides(data, one[3], one[4], 1, args.steps)
                # In its own process, as a user runs it (and in this process, base's steps in
                # the cells after it ran 1.5x slower: 7.3 s against 4.7-5.1).
                done = subprocess.run(
                    [sys.executable, "-m", "pretrain.plan", *calibrate, "cpu", "--measure"]
                    + [*cell, f"model.vocab_size={vocab}"],
                    cwd=REPO,
                    stdout=sys.stderr,
                )
                if done.returncode:
                    raise SystemExit(f"bert-plan --measure failed on {config}")
                calibrated = config
            cell_args = overrides(data, micro, global_batch, tp, args.steps)
            runs = [
                measure(
                    f"{config}.yaml", processes, cell_args, work / f"{config}-{processes}-{tp}-{i}"
                )
                for i in range(args.repeats)
            ]
            measured = statistics.median(runs)
            spread = (max(runs) - min(runs)) / statistics.mean(runs)
            predicted = predict(config, processes, tp, micro, global_batch, vocab)
            error = predicted / measured - 1
            layout = f"tp {tp} x dp {processes // tp}, mb {micro}"
            if processes == 1:
                layout += " (calibrated on)"
            elif processes == 2:
                gated.append(abs(error))
            print(
                f"| {config} | {processes} | {layout} | {predicted:.3f} | {measured:.3f} | "
                f"{spread:.0%} | {error:+.0%} |",
                flush=True,
            )
        median_error = statistics.median(gated)
        verdict = "within" if median_error <= 0.25 else "OUTSIDE"
        print(f"\nmedian |error| of the 2-process cells: {median_error:.0%} ({verdict} 25%)")


if __name__ == "__main__":
    main()
