"""Learning efficiency of dense vs sparse MLM (issue 2): held-out masked loss per training step.

Run from the repository root (about 3-5 minutes per variant on 2 CPU cores):

    .venv/bin/python -m bench.learning_efficiency
    .venv/bin/python -m bench.learning_efficiency --steps 600 --variants sparse15,dense_rr10
    .venv/bin/python -m bench.learning_efficiency --reuse   # keep stored runs, run the rest

The shared English corpus (../shared/data/gutenberg-en/clean_all.txt.gz, 13 books joined by
form-feed lines) is prepared once into the cache directory (default runs/bench/learning): an
8000-piece uncased WordPiece tokenizer and indexed shards with one document per book. Every
variant then trains configs/tiny.yaml from scratch through `pretrain.trainer.train` with the
same seed, steps, batch, optimizer (LAMB, lr 1e-2, warmup 10% of the steps, linear decay) and
data order; only the `mlm.*` keys differ. Every `--eval-every` steps the trainer scores the
same fixed masked positions of one held-out book, The Time Machine (pretrain.data.EVAL_MLM: 15%
token-level masking, independent of the training masking), so all variants are measured on
identical positions.

The table gives, per variant: final held-out masked loss and accuracy, the step at which the
held-out masked loss first reaches sparse15's final loss (linear interpolation between eval
points; "not reached" if it never does), the resulting step speed-up over sparse15, and the wall
time per training step relative to sparse15, measured after the runs in interleaved rounds so
that a shared machine's changing load does not skew it. The eval curves and timings go to
CACHE/results.json. Extra `section.key=value` arguments are passed to every run (e.g.
`model.size=null model.layers=4 model.hidden=256 model.heads=4`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "data" / "gutenberg-en" / "clean_all.txt.gz"
CONFIG = REPO / "configs" / "tiny.yaml"
REFERENCE = "sparse15"

VARIANTS: dict[str, list[str]] = {
    "sparse15": ["mlm.mode=sparse", "mlm.mask_rate=0.15"],
    "sparse40": ["mlm.mode=sparse", "mlm.mask_rate=0.40"],
    "dense_rr0": [
        "mlm.mode=dense",
        "mlm.mask_rate=0.15",
        "mlm.visible_weight=1.0",
        "mlm.visible_replace_rate=0.0",
    ],
    "dense_rr10": [
        "mlm.mode=dense",
        "mlm.mask_rate=0.15",
        "mlm.visible_weight=1.0",
        "mlm.visible_replace_rate=0.1",
    ],
    "dense_w0.1_rr10": [
        "mlm.mode=dense",
        "mlm.mask_rate=0.15",
        "mlm.visible_weight=0.1",
        "mlm.visible_replace_rate=0.1",
    ],
    "dense_w0.1_rr0": [
        "mlm.mode=dense",
        "mlm.mask_rate=0.15",
        "mlm.visible_weight=0.1",
        "mlm.visible_replace_rate=0.0",
    ],
    "dense40_w0.1_rr10": [
        "mlm.mode=dense",
        "mlm.mask_rate=0.40",
        "mlm.visible_weight=0.1",
        "mlm.visible_replace_rate=0.1",
    ],
    "dense40_rr10": [
        "mlm.mode=dense",
        "mlm.mask_rate=0.40",
        "mlm.visible_weight=1.0",
        "mlm.visible_replace_rate=0.1",
    ],
}
DEFAULT_VARIANTS = "sparse15,sparse40,dense_rr0,dense_rr10,dense_w0.1_rr10"


def log(message: str) -> None:
    print(f"[learning-efficiency] {message}", flush=True)


def prepare(
    corpus: Path,
    cache: Path,
    vocab_size: int,
    reader_args: tuple[str, ...] = ("--doc-sep", "formfeed", "--lang", "en"),
    kind: str = "wordpiece",
) -> Path:
    """Tokenizer + shards of the corpus, made once and reused. The default reader arguments
    take the shared Gutenberg file as one document per book."""
    from data_prep import cli as prep_cli

    tokenizer_dir, data_dir = cache / "tokenizer", cache / "data"
    common = ["--input", str(corpus), *reader_args]
    if not (tokenizer_dir / "tokenizer.json").is_file():
        log(f"training a {vocab_size}-piece {kind} tokenizer on {corpus}")
        args = ["tokenizer", *common, "--out", str(tokenizer_dir), "--kind", kind]
        if prep_cli.main([*args, "--vocab-size", str(vocab_size)]) != 0:
            raise SystemExit("tokenizer training failed")
    if not (data_dir / "manifest.json").is_file():
        log(f"encoding {corpus} into {data_dir}")
        args = ["encode", *common, "--tokenizer", str(tokenizer_dir), "--out", str(data_dir)]
        if prep_cli.main([*args, "--workers", "2"]) != 0:
            raise SystemExit("encoding failed")
    return data_dir


def run_variant(name: str, common: list[str], cache: Path) -> dict[str, Any]:
    """Train one variant from scratch; returns its eval curve and timing."""
    from pretrain.config import load_config
    from pretrain.trainer import train

    overrides = [*common, *VARIANTS[name], f"train.out_dir={cache / 'runs' / name}"]
    config = load_config(CONFIG, overrides)
    log(f"{name}: {' '.join(VARIANTS[name])}")
    start = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - start
    if result.exit_code != 0 or result.step != config.train.steps:
        raise SystemExit(f"{name}: training stopped early (exit code {result.exit_code})")
    train_seconds = sum(r["elapsed_s"] for r in result.history)
    return {
        "overrides": VARIANTS[name],
        "common": common,
        "steps": result.step,
        "evals": [
            {"step": r["step"], "masked_loss": r["masked_loss"], "mlm_acc": r["mlm_acc"]}
            for r in result.evals
        ],
        "train_log": [
            {k: r[k] for k in ("step", "loss", "masked_loss", "mlm_acc", "tokens_per_s")}
            for r in result.history
        ],
        "baseline_acc": result.baseline_acc,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / result.step,
        "wall_seconds": wall,
    }


def time_steps(names: list[str], common: list[str], rounds: int, steps: int) -> dict[str, float]:
    """Seconds per training step of each variant, measured in interleaved rounds.

    The training runs' own timings are not comparable on a shared machine (the load changes
    between runs), so every variant gets `steps` optimizer steps per round, round after round,
    and the median per-round time per step is reported.
    """
    import statistics

    import torch

    from pretrain.config import load_config, resolve_model_shape
    from pretrain.data import collate, open_training_data
    from pretrain.model import build_model
    from pretrain.objectives import pretraining_loss
    from pretrain.optim import build_optimizer, clip_grad_norm_
    from pretrain.precision import autocast_context

    setups = {}
    for name in names:
        config = load_config(CONFIG, [*common, *VARIANTS[name]])
        data = open_training_data(
            config.data.sources, None, config.data.seq_len, 0.0, config.mlm, config.train.seed
        )
        micro = config.train.micro_batch
        batches = [
            collate([data.train[i] for i in range(k * micro, (k + 1) * micro)], 128)
            for k in range(2)
        ]
        torch.manual_seed(config.train.seed)
        model = build_model(resolve_model_shape(config, data.dataset.vocab_size), "cpu")
        optimizer = build_optimizer(model, "lamb", lr=1e-3, weight_decay=0.01)
        setups[name] = (config, model, optimizer, batches)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds + 1):  # round 0 warms up and is not counted
        for name in names:
            config, model, optimizer, batches = setups[name]
            start = time.perf_counter()
            for i in range(steps):
                with autocast_context(config.train.precision, "cpu"):
                    out = pretraining_loss(model, batches[i % 2], config.mlm)
                out.loss.backward()
                clip_grad_norm_(list(model.parameters()), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if round_index:
                times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def steps_to_reach(evals: list[dict[str, Any]], target: float) -> float | None:
    """First step where the held-out masked loss is <= target, interpolated between evals."""
    previous = None
    for record in evals:
        loss = record["masked_loss"]
        if loss <= target:
            if previous is None or previous["masked_loss"] == loss:
                return float(record["step"])
            fraction = (previous["masked_loss"] - target) / (previous["masked_loss"] - loss)
            return previous["step"] + fraction * (record["step"] - previous["step"])
        previous = record
    return None


def table(
    results: dict[str, dict[str, Any]], names: list[str], seconds_per_step: dict[str, float]
) -> tuple[str, float]:
    """The Markdown result table, and the target loss (sparse15's final held-out loss)."""
    reference = results[REFERENCE]
    target = reference["evals"][-1]["masked_loss"]
    ref_steps = steps_to_reach(reference["evals"], target)
    ref_time = seconds_per_step[REFERENCE]
    lines = [
        "| variant | mlm overrides | final masked loss | final masked acc | "
        f"steps to loss {target:.3f} | step speed-up | time/step vs sparse15 | "
        "time speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        run = results[name]
        final = run["evals"][-1]
        reached = steps_to_reach(run["evals"], target)
        ratio = seconds_per_step[name] / ref_time
        keys = " ".join(o.removeprefix("mlm.") for o in run["overrides"])
        if reached is None:
            steps_text = speedup = time_speedup = "not reached"
        else:
            steps_text = f"{reached:.0f}"
            speedup = f"{ref_steps / reached:.2f}x"
            time_speedup = f"{ref_steps / (reached * ratio):.2f}x"
        lines.append(
            f"| {name} | {keys} | {final['masked_loss']:.3f} | {final['mlm_acc']:.3f} | "
            f"{steps_text} | {speedup} | {ratio:.2f} | {time_speedup} |"
        )
    return "\n".join(lines), target


def curves(results: dict[str, dict[str, Any]], names: list[str]) -> str:
    """Held-out masked loss per eval step, one column per variant."""
    steps = [r["step"] for r in results[names[0]]["evals"]]
    lines = ["| step | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i, step in enumerate(steps):
        cells = []
        for name in names:
            evals = results[name]["evals"]
            cells.append(f"{evals[i]['masked_loss']:.3f}" if i < len(evals) else "")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.learning_efficiency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma-separated, from {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS}); "
        f"{REFERENCE} is always run (or reused) as the reference",
    )
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--eval-every", type=int, default=50, help="default 50")
    parser.add_argument(
        "--warmup", type=int, default=None, help="LAMB warmup steps (default: 10%% of --steps)"
    )
    parser.add_argument(
        "--eval-batches", type=int, default=8, help="held-out batches of 32 samples (default 8)"
    )
    parser.add_argument(
        "--timing-rounds",
        type=int,
        default=3,
        help="interleaved timing rounds for time/step (default 3; 0 = use the training runs' "
        "own timings, which a busy machine skews)",
    )
    parser.add_argument("--timing-steps", type=int, default=5, help="steps per round (default 5)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "bench" / "learning")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse runs stored in CACHE/results.json that have identical settings",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="extra config overrides")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    if not args.corpus.is_file():
        parser.error(f"corpus {args.corpus} not found")

    import torch

    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    cache = args.cache.resolve()
    data_dir = prepare(args.corpus, cache, args.vocab_size)
    common = [
        f"data.path={data_dir}",
        # Books are the documents; every 12th is held out: book 12 of 13, The Time Machine.
        "data.valid_fraction=0.08",
        "data.seq_len=128",
        f"train.steps={args.steps}",
        "train.micro_batch=32",
        "train.global_batch=32",
        "train.precision=bf16",
        f"train.seed={args.seed}",
        "train.resume=start_over",
        f"train.eval_every={args.eval_every}",
        f"train.eval_batches={args.eval_batches}",
        "train.log_every=10",
        f"checkpoint.every={args.steps}",
        "checkpoint.keep=1",
        "optim.name=lamb",
        "optim.lr=0.01",
        f"optim.warmup_steps={warmup}",
        "optim.decay=poly",
        "optim.power=1.0",
        *args.overrides,
    ]

    results_path = cache / "results.json"
    stored: dict[str, Any] = {}
    if results_path.is_file():
        stored = json.loads(results_path.read_text(encoding="utf-8")).get("variants", {})
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        old = stored.get(name)
        if args.reuse and old and old["common"] == common and old["overrides"] == VARIANTS[name]:
            log(f"{name}: reusing the stored run")
            results[name] = old
            continue
        results[name] = run_variant(name, common, cache)
        stored[name] = results[name]
        results_path.write_text(
            json.dumps(
                {
                    "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": f"{platform.processor() or platform.machine()}, "
                    f"torch {torch.__version__}, {torch.get_num_threads()} threads",
                    "variants": stored,
                },
                indent=1,
            ),
            encoding="utf-8",
        )

    if args.timing_rounds > 0:
        log(f"timing: {args.timing_rounds} interleaved rounds of {args.timing_steps} steps")
        seconds = time_steps(names, common, args.timing_rounds, args.timing_steps)
        saved = json.loads(results_path.read_text(encoding="utf-8"))
        saved["timing"] = {"rounds": args.timing_rounds, "steps": args.timing_steps, **seconds}
        results_path.write_text(json.dumps(saved, indent=1), encoding="utf-8")
    else:
        seconds = {name: results[name]["seconds_per_step"] for name in names}
    result_table, target = table(results, names, seconds)
    samples = args.steps * 32
    print()
    print(f"held-out masked loss target (sparse15 after {args.steps} steps): {target:.3f}")
    print(f"{args.steps} steps x 32 samples x 128 tokens = {samples * 128 / 1e6:.2f}M token slots")
    print(result_table)
    print()
    print("seconds per step: " + ", ".join(f"{n} {seconds[n]:.3f}" for n in names))
    print()
    print("held-out masked loss by step:")
    print(curves(results, names))
    baseline = results[REFERENCE].get("baseline_acc")
    if baseline is not None and not math.isnan(baseline):
        print(f"\nmost-frequent-token accuracy baseline: {baseline:.3f}")
    print(f"eval curves: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
