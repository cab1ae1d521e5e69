"""bert-plan's time model against every published BERT pre-training throughput we use, and the
plans of docs/benchmarks.md.

    .venv/bin/python -m bench.plan_published            # the table (a second)
    .venv/bin/python -m bench.plan_published --plans    # + the xlarge and 3.9B plans

The table: for each of NVIDIA's BERT-Large figures (pretrain/plan_published.py says where each
comes from), the predicted sequences per second at the efficiency fitted for that GPU kind, the
error, and whether the figure was the one fitted or only checked.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from pretrain.plan_published import check_table, fitted_efficiency

REPO = Path(__file__).resolve().parents[1]
TOKENS = "59e9"  # NVIDIA's BERT-Large phase 1: 7,038 steps x 65,536 sequences x 128 tokens


def table() -> None:
    print(
        "| source | node | GPUs | seq | micro-batch x accumulation | published seq/s | "
        "predicted | error | use |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---|")
    errors: dict[tuple[str, str, int], list[float]] = {}
    for row in check_table():
        f = row["figure"]
        use = "fitted" if f.fitted else "held out"
        print(
            f"| NVIDIA DLE {f.source} | {f.node} ({f.gpu}) | {f.nodes} x {f.gpus} | {f.seq_len} "
            f"| {f.micro_batch} x {f.accumulation} | {f.sequences_per_s:g} | "
            f"{row['predicted']:.0f} | {row['error']:+.0%} | {use} |"
        )
        if not f.fitted:
            errors.setdefault((f.source, f.gpu, f.seq_len), []).append(abs(row["error"]))
    print()
    for kind in ("V100-SXM2", "A100-80GB"):
        print(f"fitted efficiency {kind}: {fitted_efficiency(kind):.3f}")
    for (source, gpu, seq), values in errors.items():
        print(
            f"held out {source} {gpu} seq {seq}: median |error| {statistics.median(values):.0%} "
            f"over {len(values)}"
        )


def plans() -> None:
    from pretrain.plan import main as bert_plan

    common = ["--tokens", TOKENS, "--walltime", "72:00:00", "--top", "6"]
    v100 = ["--cluster", "abci2", "--nodes", "192", *common, "train.global_batch=12288"]
    runs = [
        ["--config", "configs/xlarge.yaml", *v100],
        ["--config", "configs/3.9b.yaml", *v100],
        ["--config", "configs/3.9b.yaml", "--cluster", "abci3", "--nodes", "8", *common],
    ]
    for argv in runs:
        print(f"\n$ bert-plan {' '.join(argv)}")
        bert_plan(argv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", action="store_true")
    args = parser.parse_args()
    table()
    if args.plans:
        plans()


if __name__ == "__main__":
    main()
