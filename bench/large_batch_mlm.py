"""Dense vs sparse MLM at a large batch with LAMB (issue 21): held-out masked loss per step.

Run from the repository root, one stage after another (each stores every finished run in
CACHE/results.json, default runs/bench/large-batch, and `--reuse` keeps the stored ones):

    .venv/bin/python -m bench.large_batch_mlm --stage lr --reuse        # LAMB rate sweep
    .venv/bin/python -m bench.large_batch_mlm --stage train --reuse     # the four variants
    .venv/bin/python -m bench.large_batch_mlm --stage train --reuse --seeds 1235 \
        --variants dense40,dense15                      # a second seed for the two leaders
    .venv/bin/python -m bench.large_batch_mlm --stage split             # changed vs kept
    .venv/bin/python -m bench.large_batch_mlm --stage time              # time per step
    .venv/bin/python -m bench.large_batch_mlm --stage finetune --reuse  # NCBI-disease F1
    .venv/bin/python -m bench.large_batch_mlm --stage report            # the tables

The regime of Kasagi et al.'s dense-MLM claim, scaled to 2 CPU cores: configs/tiny.yaml
(2 layers, hidden 128), 32-token sequences, a global batch of --global-batch (1,024) sequences
by gradient accumulation over micro-batches of --micro-batch, LAMB with 10% warm-up and linear
decay, the shared English corpus prepared as in bench.learning_efficiency (8000-piece
WordPiece, one document per book, The Time Machine held out). Every run scores the same fixed
held-out positions (pretrain.data.EVAL_MLM) every --eval-every steps; only the `mlm.*` keys
differ between variants.

Stages:
    lr        sparse15 for --lr-steps at each rate of --lrs; the rate with the lowest final
              held-out masked loss is the one `train` uses (unless --lr is given)
    train     every variant of --variants for every seed of --seeds, --steps steps
    split     score each trained run's final checkpoint on the held-out positions split into
              changed ([MASK] / random token) and kept (copyable) ones
    time      seconds per optimizer step of each variant (from --timing-micro-batches
              micro-batches per round, scaled to the whole accumulation), measured in
              interleaved rounds so that a shared machine's changing load does not skew it;
              plus the per-step FLOP ratio dense/sparse of the model's own FLOP count
              (pretrain.model.flops_per_step) at xlarge size
    finetune  export each run of --finetune-variants (first seed) and fine-tune it on
              NCBI-disease with bench.finetune_downstream's bert-finetune command, --ft-seeds
    report    print the Markdown tables from CACHE/results.json
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.learning_efficiency import CORPUS, prepare

SWEEP_SEED = 1234  # the LR sweep's seed, and the default pre-training seed
REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny.yaml"

VARIANTS: dict[str, list[str]] = {
    "sparse15": ["mlm.mode=sparse", "mlm.mask_rate=0.15"],
    "sparse40": ["mlm.mode=sparse", "mlm.mask_rate=0.40"],
    # dense15 is the dense setting every config shipped with before issue 21.
    "dense15": [
        "mlm.mode=dense",
        "mlm.mask_rate=0.15",
        "mlm.visible_weight=0.1",
        "mlm.visible_replace_rate=0.1",
    ],
    "dense40": [
        "mlm.mode=dense",
        "mlm.mask_rate=0.40",
        "mlm.visible_weight=0.1",
        "mlm.visible_replace_rate=0.1",
    ],
}


def log(message: str) -> None:
    print(f"[large-batch-mlm] {message}", flush=True)


def common_overrides(args: argparse.Namespace, data_dir: Path) -> list[str]:
    """The settings every run shares (stored with each run; --reuse compares them)."""
    return [
        f"data.path={data_dir}",
        # Books are the documents; every 12th is held out: book 12 of 13, The Time Machine.
        "data.valid_fraction=0.08",
        "data.seq_len=32",
        f"train.micro_batch={args.micro_batch}",
        f"train.global_batch={args.global_batch}",
        f"train.precision={args.precision}",
        # Each run has its own directory: a run cut short (a stop signal, the end of a session)
        # continues from its last checkpoint when the stage is run again.
        "train.resume=auto",
        f"train.eval_every={args.eval_every}",
        # The same held-out samples whatever the micro-batch: eval_batches x micro_batch.
        f"train.eval_batches={max(1, args.eval_samples // args.micro_batch)}",
        f"train.log_every={args.eval_every}",
        "checkpoint.keep=1",
        "optim.name=lamb",
        "optim.decay=poly",
        "optim.power=1.0",
        *args.overrides,
    ]


def run_overrides(variant: str, lr: float, seed: int, steps: int) -> list[str]:
    return [
        *VARIANTS[variant],
        f"optim.lr={lr:g}",
        f"optim.warmup_steps={max(1, steps // 10)}",
        f"train.seed={seed}",
        f"train.steps={steps}",
        f"checkpoint.every={min(steps, 25)}",
    ]


def run_key(variant: str, lr: float, seed: int, steps: int) -> str:
    return f"{variant}/lr{lr:g}/seed{seed}/steps{steps}"


def train_run(
    key: str, variant: str, lr: float, seed: int, steps: int, common: list[str], cache: Path
) -> dict[str, Any]:
    """Train one variant (continuing its own cut-short run); returns its held-out curve and time."""
    from pretrain.config import load_config
    from pretrain.metrics import read_records
    from pretrain.trainer import train

    overrides = run_overrides(variant, lr, seed, steps)
    out_dir = cache / "runs" / key.replace("/", "-")
    config = load_config(CONFIG, [*common, *overrides, f"train.out_dir={out_dir}"])
    log(f"{key}: {' '.join(overrides)}")
    start = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - start
    if result.exit_code != 0 or result.step != steps or result.checkpoint is None:
        raise SystemExit(f"{key}: training stopped early (exit code {result.exit_code})")
    records = read_records(out_dir / "metrics.jsonl")  # every segment of the run, not just this one
    evals = [r for r in records if r.get("split") == "valid"]
    train_seconds = sum(r["elapsed_s"] for r in records if "elapsed_s" in r)
    log(f"{key}: done in {wall:.0f} s, final held-out {evals[-1]}")
    return {
        "variant": variant,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "global_batch": config.train.global_batch,
        "common": common,
        "overrides": overrides,
        "evals": [
            {"step": r["step"], "masked_loss": r["masked_loss"], "mlm_acc": r["mlm_acc"]}
            for r in evals
        ],
        "baseline_acc": result.baseline_acc,
        "train_seconds": train_seconds,
        "wall_seconds": wall,
        "checkpoint": str(result.checkpoint),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def train_samples(common: list[str]) -> int:
    """Training samples in one epoch (the held-out book excluded)."""
    from pretrain.config import load_config
    from pretrain.data import open_training_data

    config = load_config(CONFIG, common)
    d = config.data
    data = open_training_data(d.sources, d.tokenizer, d.seq_len, d.valid_fraction, config.mlm, 0)
    return len(data.train)


def time_steps(
    variants: list[str], common: list[str], rounds: int, micro_per_round: int
) -> dict[str, dict[str, float]]:
    """Seconds per optimizer step of each variant, measured in interleaved rounds.

    A whole step of 1,024 sequences takes minutes on a loaded machine, so each round gives
    every variant `micro_per_round` micro-batches (forward + backward, accumulated) and one
    clipped LAMB step, and a step's time is the round's time per micro-batch times the
    micro-batches of a global batch (the optimizer step of 1.5 M parameters is a few ms).
    Round 0 warms up and is not counted; the median over rounds is reported, with min and max.
    Freed memory is kept, as bert-train keeps it on a CPU.
    """
    import torch

    from pretrain.cpu_memory import keep_freed_memory

    keep_freed_memory()

    from pretrain.config import load_config, resolve_model_shape
    from pretrain.data import collate, open_training_data
    from pretrain.model import build_model
    from pretrain.objectives import pretraining_loss
    from pretrain.optim import build_optimizer, clip_grad_norm_
    from pretrain.precision import autocast_context

    setups = {}
    for name in variants:
        config = load_config(CONFIG, [*common, *VARIANTS[name]])
        t, d = config.train, config.data
        data = open_training_data(d.sources, d.tokenizer, d.seq_len, 0.0, config.mlm, 1234)
        micro = t.micro_batch
        batches = [
            collate([data.train[i] for i in range(k * micro, (k + 1) * micro)], d.seq_len)
            for k in range(micro_per_round)
        ]
        torch.manual_seed(1234)
        model = build_model(resolve_model_shape(config, data.dataset.vocab_size), "cpu")
        optimizer = build_optimizer(model, "lamb", lr=1e-3, weight_decay=0.01)
        setups[name] = (config, model, optimizer, batches, t.global_batch // micro)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(rounds + 1):
        for name in variants:
            config, model, optimizer, batches, accumulation = setups[name]
            start = time.perf_counter()
            for batch in batches:
                with autocast_context(config.train.precision, "cpu"):
                    out = pretraining_loss(model, batch, config.mlm)
                (out.loss / accumulation).backward()
            clip_grad_norm_(list(model.parameters()), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_index:
                times[name].append((time.perf_counter() - start) / len(batches) * accumulation)
    return {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
        for name, v in times.items()
    }


def split_eval(run: dict[str, Any], common: list[str]) -> dict[str, dict[str, float]]:
    """Held-out masked loss / accuracy of the run's final checkpoint, split into the positions
    whose token was changed ([MASK] or a random token: predicted from context) and the 10% kept
    unchanged (which a model trained on visible tokens, as dense MLM is, can copy)."""
    import torch

    from pretrain.checkpoint import load_model_weights
    from pretrain.config import load_config, resolve_model_shape
    from pretrain.data import EVAL_MLM, eval_batches, open_training_data
    from pretrain.masking import IGNORE
    from pretrain.model import build_model
    from pretrain.objectives import pretraining_loss
    from pretrain.precision import autocast_context

    config = load_config(CONFIG, [*common, *run["overrides"]])
    t, d = config.train, config.data
    data = open_training_data(
        d.sources, d.tokenizer, d.seq_len, d.valid_fraction, config.mlm, t.seed
    )
    model = build_model(resolve_model_shape(config, data.dataset.vocab_size), "cpu")
    load_model_weights(Path(run["checkpoint"]), model)
    model.eval()
    sums = {"changed": [0.0, 0.0, 0.0], "kept": [0.0, 0.0, 0.0]}
    for batch in eval_batches(data.valid, t.micro_batch, t.eval_batches):
        kept = batch["input_ids"] == batch["labels"]
        for name, chosen in (
            ("changed", batch["picked"] & ~kept),
            ("kept", batch["picked"] & kept),
        ):
            part = {
                **batch,
                "picked": chosen,
                "labels": batch["labels"].masked_fill(~chosen, IGNORE),
            }
            with torch.no_grad(), autocast_context(t.precision, "cpu"):
                out = pretraining_loss(model, part, EVAL_MLM)
            for i, value in enumerate((out.masked_loss_sum, out.masked_correct, out.masked_count)):
                sums[name][i] += float(value)
    return {
        name: {"masked_loss": loss / count, "mlm_acc": correct / count, "positions": count}
        for name, (loss, correct, count) in sums.items()
    }


def xlarge_flop_ratios(seq_lens: tuple[int, ...] = (128, 512)) -> dict[str, float]:
    """Model FLOPs per step, dense (every non-special position scored) over sparse (the picked
    fraction scored), at xlarge size with a 32768-piece vocabulary: a prediction from
    pretrain.model.flops_per_step, not a measurement."""
    from pretrain.config import load_config, resolve_model_shape
    from pretrain.model import flops_per_step

    shape = resolve_model_shape(load_config(REPO / "configs" / "xlarge.yaml", []), 32768)
    ratios = {}
    for seq_len in seq_lens:
        scorable = seq_len - 2  # [CLS] and [SEP] are never scored
        dense = flops_per_step(shape, seq_len, 1, scorable)
        for rate in (0.15, 0.40):
            sparse = flops_per_step(shape, seq_len, 1, rate * scorable)
            ratios[f"S{seq_len}/sparse{round(rate * 100)}"] = dense / sparse
    return ratios


def choose_lr(stored: dict[str, Any], sweep: dict[float, str]) -> float | None:
    """The sweep's rate with the lowest final held-out masked loss; None until all ran."""
    if not all(key in stored for key in sweep.values()):
        return None
    return min(sweep, key=lambda lr: stored[sweep[lr]]["evals"][-1]["masked_loss"])


def finetune_export(run: dict[str, Any], key: str, cache: Path, args: argparse.Namespace) -> Path:
    """Export the run's final checkpoint to CACHE/exports/KEY (made once)."""
    from pretrain import export_hf

    export = cache / "exports" / key.replace("/", "-")
    if not (export / "config.json").is_file():
        log(f"export {run['checkpoint']} -> {export}")
        export_hf.export_checkpoint(Path(run["checkpoint"]), export, force=True)
    return export


def eval_at(run: dict[str, Any], step: int) -> dict[str, float] | None:
    return next((e for e in run["evals"] if e["step"] == step), None)


def report(
    results: dict[str, Any], sweep_keys: list[str], main_keys: list[str], samples: int | None
) -> str:
    """The Markdown tables of the stored runs named (the sweep's and the compared ones)."""
    runs = results.get("runs", {})
    lines: list[str] = []
    sweep = [runs[k] for k in sweep_keys if k in runs]
    if sweep:
        lines += ["LR sweep (sparse15):", "", "| lr | steps | final masked loss | final acc |"]
        lines.append("|---:|---:|---:|---:|")
        for r in sorted(sweep, key=lambda r: r["lr"]):
            final = r["evals"][-1]
            lines.append(
                f"| {r['lr']:g} | {r['steps']} | {final['masked_loss']:.3f} | "
                f"{final['mlm_acc']:.3f} |"
            )
        lines.append("")
    main = {k: runs[k] for k in main_keys if k in runs}
    if main:
        timing = results.get("timing", {}).get("seconds", {})
        lines += [
            "| run | final masked loss | final masked acc | train time (s) | s/step (run) | "
            "s/step (interleaved) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for key, r in main.items():
            final = r["evals"][-1]
            interleaved = timing.get(r["variant"], {}).get("median")
            lines.append(
                f"| {key} | {final['masked_loss']:.3f} | {final['mlm_acc']:.3f} | "
                f"{r['train_seconds']:.0f} | {r['train_seconds'] / r['steps']:.2f} | "
                + (f"{interleaved:.2f} |" if interleaved else "- |")
            )
        lines.append("")
        keys = list(main)
        steps = [e["step"] for e in main[keys[0]]["evals"]]
        header = "| step | epochs | " + " | ".join(keys) + " |"
        lines += ["Held-out masked loss / acc by step:", "", header]
        lines.append("|---:|---:|" + "---:|" * len(keys))
        for step in steps:
            batch = main[keys[0]]["global_batch"]
            epochs = f"{step * batch / samples:.2f}" if samples else "-"
            cells = []
            for key in keys:
                e = eval_at(main[key], step)
                cells.append(f"{e['masked_loss']:.3f} / {e['mlm_acc']:.3f}" if e else "")
            lines.append(f"| {step} | {epochs} | " + " | ".join(cells) + " |")
        baseline = main[keys[0]].get("baseline_acc")
        if baseline is not None:
            lines.append(f"\nmost-frequent-token accuracy on these positions: {baseline:.3f}")
        lines.append("")
    if results.get("timing"):
        t = results["timing"]
        lines.append(f"interleaved timing ({t['rounds']} rounds, load {t['load']}):")
        for name, s in t["seconds"].items():
            lines.append(
                f"  {name}: median {s['median']:.2f} s/step (min {s['min']:.2f}, "
                f"max {s['max']:.2f})"
            )
        lines.append("xlarge FLOP ratio dense/sparse per step (prediction from flops_per_step):")
        lines += [f"  {k}: {v:.3f}" for k, v in t["xlarge_flop_ratio"].items()]
        lines.append("")
    finetuned = results.get("finetune", {})
    if finetuned:
        lines += ["| run | NCBI dev entity F1 per seed | mean ± sd |", "|---|---|---:|"]
        for key, seeds in finetuned.items():
            f1 = [s["dev"]["f1"] for s in seeds.values()]
            spread = statistics.stdev(f1) if len(f1) > 1 else 0.0
            lines.append(
                f"| {key} | {', '.join(f'{v:.3f}' for v in f1)} | "
                f"{statistics.fmean(f1):.3f} ± {spread:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.large_batch_mlm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--stage", choices=["lr", "train", "split", "time", "finetune", "report"], required=True
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--seeds", default=str(SWEEP_SEED), help=f"pre-training seeds (default {SWEEP_SEED})"
    )
    parser.add_argument("--steps", type=int, default=400, help="default 400")
    parser.add_argument("--lrs", default="3e-3,1e-2,3e-2", help="the sweep's LAMB rates")
    parser.add_argument("--lr-steps", type=int, default=100, help="sweep run length (default 100)")
    parser.add_argument("--lr", type=float, help="LAMB rate for train (default: sweep's best)")
    parser.add_argument("--micro-batch", type=int, default=128, help="default 128")
    parser.add_argument("--global-batch", type=int, default=1024, help="default 1024")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--eval-every", type=int, default=25, help="default 25")
    parser.add_argument(
        "--eval-samples", type=int, default=1024, help="held-out samples scored (default 1024)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a loaded 2-core machine, 2 threads spun 3x slower)",
    )
    parser.add_argument("--timing-rounds", type=int, default=3, help="default 3")
    parser.add_argument(
        "--timing-micro-batches", type=int, default=2, help="micro-batches per round (default 2)"
    )
    parser.add_argument(
        "--finetune-variants", default="sparse40,dense40,dense15", help="runs fine-tuned"
    )
    parser.add_argument("--ft-seeds", default="1,2,3", help="fine-tuning seeds (default 1,2,3)")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "bench" / "large-batch")
    parser.add_argument("--reuse", action="store_true", help="keep stored runs with equal settings")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="extra config overrides")
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.global_batch % args.micro_batch:
        parser.error("--global-batch must be a multiple of --micro-batch")
    if not args.corpus.is_file():
        parser.error(f"corpus {args.corpus} not found")
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]

    import torch

    torch.set_num_threads(args.threads)
    cache = args.cache.resolve()
    data_dir = prepare(args.corpus, cache, 8000)
    common = common_overrides(args, data_dir)
    results_path = cache / "results.json"
    results: dict[str, Any] = {"runs": {}}
    if results_path.is_file():
        results = json.loads(results_path.read_text(encoding="utf-8"))

    def save(*path: str) -> None:
        """Store results[path] in results.json, merged under a lock with what other processes
        of this benchmark stored meanwhile (stages and seeds can run side by side)."""
        with open(cache / "results.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            disk = {"runs": {}}
            if results_path.is_file():
                disk = json.loads(results_path.read_text(encoding="utf-8"))
            target, source = disk, results
            for part in path[:-1]:
                target, source = target.setdefault(part, {}), source[part]
            target[path[-1]] = source[path[-1]]
            disk["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            disk["machine"] = (
                f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads"
            )
            partial = results_path.with_suffix(f".json.partial-{os.getpid()}")
            partial.write_text(json.dumps(disk, indent=1), encoding="utf-8")
            partial.replace(results_path)

    def run(variant: str, lr: float, seed: int, steps: int) -> None:
        key = run_key(variant, lr, seed, steps)
        old = results["runs"].get(key)
        wanted = run_overrides(variant, lr, seed, steps)
        if args.reuse and old and old["common"] == common and old["overrides"] == wanted:
            log(f"{key}: reusing the stored run")
            return
        results["runs"][key] = train_run(key, variant, lr, seed, steps, common, cache)
        save("runs", key)

    # The sweep runs at the default seed whatever --seeds says, so a second seed's runs find it.
    sweep = {x: run_key("sparse15", x, SWEEP_SEED, args.lr_steps) for x in lrs}
    lr = args.lr or choose_lr(results["runs"], sweep)
    if args.stage in ("train", "finetune") and lr is None:
        raise SystemExit("no LAMB rate: run --stage lr first, or give --lr")
    if args.stage == "lr":
        for rate in lrs:
            run("sparse15", rate, SWEEP_SEED, args.lr_steps)
        lr = choose_lr(results["runs"], sweep)
        log(f"the sweep's best LAMB rate: {lr:g}")
    elif args.stage == "train":
        for seed in seeds:
            for variant in variants:
                run(variant, lr, seed, args.steps)
    elif args.stage == "split":
        for seed in seeds:
            for variant in variants:
                key = run_key(variant, lr, seed, args.steps)
                results["runs"][key]["split"] = split_eval(results["runs"][key], common)
                log(f"{key}: {results['runs'][key]['split']}")
                save("runs", key, "split")
    elif args.stage == "time":
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        log(f"timing {', '.join(variants)}: {args.timing_rounds} rounds, load {load}")
        seconds = time_steps(variants, common, args.timing_rounds, args.timing_micro_batches)
        results["timing"] = {
            "rounds": args.timing_rounds,
            "micro_batches_per_round": args.timing_micro_batches,
            "load": load,
            "micro_batch": args.micro_batch,
            "global_batch": args.global_batch,
            "precision": args.precision,
            "seconds": seconds,
            "xlarge_flop_ratio": xlarge_flop_ratios(),
        }
        save("timing")
    elif args.stage == "finetune":
        from bench.finetune_downstream import finetune, finetune_argv

        ft_args = argparse.Namespace(cache=cache, ncbi_epochs=3.0, patience=2, precision="fp32")
        for variant in [v.strip() for v in args.finetune_variants.split(",")]:
            key = run_key(variant, lr, seeds[0], args.steps)
            if key not in results["runs"]:
                raise SystemExit(f"{key}: not trained yet (run --stage train first)")
            export = finetune_export(results["runs"][key], key, cache, args)
            done = results.setdefault("finetune", {}).setdefault(key, {})
            for ft_seed in args.ft_seeds.split(","):
                ft_argv = finetune_argv(export, "ncbi", int(ft_seed), "1e-3", ft_args)
                if args.reuse and ft_seed in done and done[ft_seed]["argv"] == ft_argv:
                    continue
                log(f"fine-tune {key} on NCBI-disease, seed {ft_seed}")
                done[ft_seed] = finetune(ft_argv)
                log(f"  dev {done[ft_seed]['dev']}")
                save("finetune", key, ft_seed)
    main_keys = [run_key(v, lr, s, args.steps) for s in seeds for v in variants] if lr else []
    samples = train_samples(common) if results["runs"] else None
    print(report(results, list(sweep.values()), main_keys, samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
