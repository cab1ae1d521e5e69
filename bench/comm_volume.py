"""Bytes moved per training step, by process group and collective kind, against the minimum.

    .venv/bin/python -m bench.comm_volume            # ~3 minutes on 2 CPU cores

Runs the real trainer (`torchrun -m pretrain`, gloo) on the tiny config at several dp × tp
layouts with `train.comm_stats=true`, which counts every collective that runs (our tp
mappings, the vocabulary-parallel cross-entropy, LAMB's norms, DDP's bucketed all-reduce,
ZeRO-1's broadcasts) and logs the analytic minimum for the same step beside it
(`pretrain.parallel.comm_stats.analytic_bytes`). Prints one markdown row per layout and kind:
measured bytes per step on rank 0 (the last step; the first steps carry one-time DDP set-up),
the minimum, their ratio, and how much of the tp traffic is Megatron's textbook 4·L·b·s·h
encoder all-reduces.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYOUTS = [  # (processes, tp, zero)
    (2, 2, 0),
    (2, 1, 0),
    (2, 1, 1),
    (4, 2, 0),
    (4, 2, 1),
]


def prepare(work: Path) -> Path:
    """A 1000-piece tokenizer and shards of 300 KB of the built-in corpus."""
    from data_prep.encode import encode_corpus
    from data_prep.sources import CORPUS_DIR
    from data_prep.tokenizer import train_tokenizer

    data = work / "data"
    if not (data / "manifest.json").exists():
        text = gzip.decompress((CORPUS_DIR / "gutenberg_excerpt.txt.gz").read_bytes())
        corpus = work / "corpus.txt.gz"
        corpus.write_bytes(gzip.compress(text[:300_000]))
        train_tokenizer([corpus], work / "tokenizer", "wordpiece", 1000, lang="en")
        encode_corpus([corpus], work / "tokenizer", data, lang="en")
    return data


def run(
    work: Path, data: Path, nproc: int, tp: int, zero: int, mode: str, precision: str, steps: int
) -> dict:
    out = work / f"run-{nproc}-{tp}-{zero}-{mode}-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", "-m", "pretrain",
           "--config", str(REPO / "configs" / "tiny.yaml"), f"data.path={data}",
           f"train.out_dir={out}", f"parallel.tp={tp}", f"parallel.zero={zero}",
           f"mlm.mode={mode}", "mlm.mask_rate=0.15", f"train.precision={precision}",
           f"train.steps={steps}",
           "train.micro_batch=8", "train.global_batch=32", "data.seq_len=128",
           "train.log_every=1", "train.eval_every=1000", "checkpoint.every=1000",
           "train.comm_stats=true"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"run failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r for r in records if "comm_bytes" in r][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bench-comm"))
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare(work)
    from pretrain.config import load_config, resolve_model_shape

    shape = resolve_model_shape(load_config(REPO / "configs" / "tiny.yaml", []), 1000)
    print(
        f"configs/tiny.yaml: {shape.layers} layers, hidden {shape.hidden}, vocab 1000 "
        f"(padded to 128 x tp); global batch 32 x 128 tokens, micro-batch 8; LAMB; rank 0, "
        f"step {args.steps}"
    )
    print()
    print("| processes | dp x tp | ZeRO-1 | MLM | precision | kind | measured bytes/step "
          "| minimum | measured / minimum | textbook 4·L·b·s·h share |")  # fmt: skip
    print("|---:|---|---|---|---|---|---:|---:|---:|---:|")
    cases = [(*layout, "dense", "bf16") for layout in LAYOUTS] + [
        (4, 2, 0, "sparse", "bf16"),
        (4, 2, 0, "dense", "fp32"),
    ]
    for nproc, tp, zero, mode, precision in cases:
        record = run(work, data, nproc, tp, zero, mode, precision, args.steps)
        measured, minimum = record["comm_bytes"], record["comm_bytes_min"]
        dp = nproc // tp
        micro = 32 // (8 * dp)
        width = 2 if precision != "fp32" else 4
        textbook = 2 * shape.layers * micro * 8 * 128 * shape.hidden * (width + 4)
        for kind in sorted(set(measured) | set(minimum)):
            got, want = measured.get(kind, 0), minimum.get(kind, 0)
            share = f"{textbook / got:.0%}" if kind == "tp.all_reduce" else ""
            ratio = f"{got / want:.4f}" if want else "n/a"
            print(
                f"| {nproc} | {dp} x {tp} | {'yes' if zero else 'no'} | {mode} | {precision} | "
                f"{kind} | {got:,} | {want:,} | {ratio} | {share} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
