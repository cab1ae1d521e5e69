"""Downstream value of pre-training (issue 7): random init vs sparse MLM vs dense MLM, fine-tuned.

Run from the repository root. CPU cost with the defaults, 1 thread per process: the sparse
pre-training takes about 8 minutes, the dense one about 20, each fine-tuning run 1-3 minutes:

    .venv/bin/python -m bench.finetune_downstream
    .venv/bin/python -m bench.finetune_downstream --stage pretrain     # only the three exports
    .venv/bin/python -m bench.finetune_downstream --reuse              # keep stored results
    .venv/bin/python -m bench.finetune_downstream --lang ja --cache runs/bench/finetune-ja
    .venv/bin/python -m bench.finetune_downstream --stage export --export-step 8000 --cache C
                                                  # export step 8000 of the runs in C/runs/

Stages that write different entries may run side by side on one cache (e.g. `--variants sparse`
and `--variants dense`); each writes only its own entries into CACHE/results.json.

Three exports of the same model shape (configs/tiny.yaml: 2 layers, hidden 128, 2 heads) and
tokenizer:

    random  no pre-training: our initialisation, exported through the same bert-train →
            bert-export path (1 step at lr 1e-12)
    sparse  --pretrain-steps of sparse MLM (original BERT: 15% picked, loss on those only)
    dense   the same steps of dense MLM at 15% masking (the pre-issue-21 default mlm.* keys)

Both pre-training runs use the same seed, data order and recipe: sequences of
--pretrain-seq-len (32) tokens, --pretrain-batch (128) sequences per step, AdamW at lr 1e-3
with 10% warm-up and linear decay. Short sequences are what makes a model this small learn
from context within a CPU budget: at 128 tokens per sequence it sat for thousands of steps
near word-frequency prediction (docs/benchmarks.md).

English (--lang en, default): an 8000-piece uncased WordPiece tokenizer and shards of the
shared English corpus (../shared/data/gutenberg-en/clean_all.txt.gz, prepared as in
bench.learning_efficiency); each export is fine-tuned with `bert-finetune` (called in-process,
exactly the CLI's code) with three seeds on

    SST-2   a --sst2-train-examples random slice of train.tsv.gz (same slice for every run),
            scored on the full dev set (872 sentences): accuracy
    NCBI    the full NCBI-disease train split (5,424 sentences), scored on devel: entity F1
            (strict IOB2 span matching)

Japanese (--lang ja): livedoor news (9 categories) split 80/20 per category with a fixed
seed; an 8000-piece SentencePiece tokenizer and the pre-training shards are made from the
bodies of the train articles only (no dev text is seen before it is scored); fine-tuned on
title + body, scored on the dev articles: accuracy.

The table reports mean ± sample standard deviation over the seeds, with the min-max range.
With several fine-tuning learning rates (--lrs 1e-3,3e-4), each variant is scored at the rate
with the best mean dev score over the seeds (the usual BERT protocol: a pre-trained model
usually wants a smaller rate than a randomly initialised one); every rate's row is printed too.
A long pre-training (a bert-train run with the same settings and `checkpoint.every`, stopped
and resumed as often as needed) is read out at any stored step with `--stage export
--export-step N`: it exports CACHE/runs/NAME/checkpoints/step_N of each pre-trained variant and
takes the held-out eval at that step from the run's metrics.jsonl.
Results go to CACHE/results.json (default runs/bench/finetune); printed as Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
CORPUS = SHARED / "gutenberg-en" / "clean_all.txt.gz"
LIVEDOOR = SHARED / "livedoor-news" / "articles.jsonl.gz"
TASKS = {"en": "sst2,ncbi", "ja": "livedoor"}
CONFIG = REPO / "configs" / "tiny.yaml"

PRETRAIN_VARIANTS: dict[str, list[str]] = {
    # lr 1e-12 for one step: the export holds the initial weights (LAMB's trust ratio keeps the
    # update ~1e-12 relative), written by the same code path as the trained ones.
    "random": ["train.steps=1", "optim.lr=1e-12", "optim.warmup_steps=0"],
    "sparse": ["mlm.mode=sparse", "mlm.mask_rate=0.15"],
    # The dense defaults every config shipped with before issue 21 (visible weight 0.1 etc.).
    "dense": ["mlm.mode=dense", "mlm.mask_rate=0.15"],
}


def log(message: str) -> None:
    print(f"[finetune-bench] {message}", flush=True)


def livedoor_split(cache: Path) -> Path:
    """livedoor news as CACHE/livedoor/{train,dev,corpus}.jsonl, made once.

    Per category, articles sorted by id and shuffled with a fixed seed: 80% train, 20% dev.
    The fine-tuning text is the title and the body; the pre-training corpus is the bodies of the
    train articles only, so no dev text is seen before it is scored.
    """
    out = cache / "livedoor"
    if (out / "corpus.jsonl").is_file():
        return out
    by_category: dict[str, list[dict[str, Any]]] = {}
    with gzip.open(LIVEDOOR, "rt", encoding="utf-8") as f:
        for line in f:
            article = json.loads(line)
            by_category.setdefault(article["category"], []).append(article)
    rng = random.Random(0)
    train: list[dict[str, Any]] = []
    dev: list[dict[str, Any]] = []
    for category in sorted(by_category):
        articles = sorted(by_category[category], key=lambda a: a["id"])
        rng.shuffle(articles)
        cut = len(articles) // 5
        dev += articles[:cut]
        train += articles[cut:]
    rng.shuffle(train)
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, rows: list[dict[str, str]]) -> None:
        lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (out / name).write_text("".join(lines), encoding="utf-8")

    def labelled(articles: list[dict[str, Any]]) -> list[dict[str, str]]:
        return [{"text": f"{a['title']}。{a['body']}", "category": a["category"]} for a in articles]

    write("train.jsonl", labelled(train))
    write("dev.jsonl", labelled(dev))
    write("corpus.jsonl", [{"text": a["body"]} for a in train])  # written last: marks completion
    return out


def prepare_ja(cache: Path, vocab_size: int) -> Path:
    """SentencePiece tokenizer + shards of the livedoor train bodies, made once and reused."""
    from bench.learning_efficiency import prepare

    corpus = livedoor_split(cache) / "corpus.jsonl"
    return prepare(corpus, cache, vocab_size, ("--lang", "ja"), "sentencepiece")


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The pre-training settings a stored export was made with (compared by --reuse)."""
    return {
        "seq_len": args.pretrain_seq_len,
        "batch": args.pretrain_batch,
        "optimizer": args.pretrain_optimizer,
        "lr": args.pretrain_lr,
        "seed": args.pretrain_seed,
    }


def pretrain(name: str, data_dir: Path, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or for `random`, initialise) one variant and export it to CACHE/exports/NAME."""
    from pretrain import export_hf
    from pretrain.config import load_config
    from pretrain.trainer import train

    run_dir = cache / "runs" / name
    steps, seed = args.pretrain_steps, args.pretrain_seed
    seq_len, batch = args.pretrain_seq_len, args.pretrain_batch
    optimizer, lr = args.pretrain_optimizer, args.pretrain_lr
    common = [
        f"data.path={data_dir}",
        "data.valid_fraction=0.08",
        f"data.seq_len={seq_len}",
        f"train.steps={steps}",
        f"train.micro_batch={batch}",
        f"train.global_batch={batch}",
        "train.precision=bf16",
        f"train.seed={seed}",
        "train.resume=start_over",
        f"train.eval_every={max(1, steps // 4)}",
        "train.eval_batches=4",
        "train.log_every=50",
        f"train.out_dir={run_dir}",
        f"checkpoint.every={steps}",
        "checkpoint.keep=1",
        f"optim.name={optimizer}",
        f"optim.lr={lr}",
        f"optim.warmup_steps={max(1, steps // 10)}",
        "optim.decay=poly",
        "optim.power=1.0",
    ]
    config = load_config(CONFIG, [*common, *PRETRAIN_VARIANTS[name]])
    log(f"pre-train {name}: {' '.join(PRETRAIN_VARIANTS[name])}")
    start = time.perf_counter()
    result = train(config)
    if result.exit_code != 0 or result.checkpoint is None:
        raise SystemExit(f"{name}: pre-training failed (exit code {result.exit_code})")
    export = cache / "exports" / name
    export_hf.export_checkpoint(result.checkpoint, export, force=True)
    final = result.evals[-1] if result.evals else {}
    return {
        "overrides": PRETRAIN_VARIANTS[name],
        "recipe": recipe(args),
        "steps": result.step,
        "masked_loss": final.get("masked_loss"),
        "mlm_acc": final.get("mlm_acc"),
        "seconds": time.perf_counter() - start,
        "export": str(export),
    }


def export_step(name: str, cache: Path, step: int) -> dict[str, Any]:
    """Export step `step` of the stored run CACHE/runs/NAME, with its held-out eval."""
    from pretrain import export_hf
    from pretrain.metrics import read_records

    run_dir = cache / "runs" / name
    checkpoint = run_dir / "checkpoints" / f"step_{step:06d}"
    if not checkpoint.is_dir():
        raise SystemExit(f"{name}: no checkpoint {checkpoint}")
    evals = [
        row
        for row in read_records(run_dir / "metrics.jsonl")
        if row.get("split") == "valid" and row["step"] == step
    ]
    if not evals:
        raise SystemExit(f"{name}: {run_dir}/metrics.jsonl has no held-out eval at step {step}")
    export = cache / "exports" / name
    log(f"export {checkpoint} -> {export}")
    export_hf.export_checkpoint(checkpoint, export, force=True)
    return {
        "overrides": ["(stored run)"],
        "steps": step,
        "masked_loss": evals[-1]["masked_loss"],
        "mlm_acc": evals[-1]["mlm_acc"],
        "export": str(export),
    }


DEFAULT_LR = "1e-3"


def run_key(name: str, task: str, seed: int, lr: str) -> str:
    """results.json key of one fine-tuning run (the default rate keeps the original key)."""
    return f"{name}/{task}/{seed}" + ("" if lr == DEFAULT_LR else f"/lr{lr}")


def finetune_argv(
    export: Path, task: str, seed: int, lr: str, args: argparse.Namespace
) -> list[str]:
    """The bert-finetune command line of one run (stored with it; --reuse compares it)."""
    cache: Path = args.cache
    suffix = "" if lr == DEFAULT_LR else f"-lr{lr}"
    out = cache / "finetuned" / f"{export.name}-{task}-seed{seed}{suffix}"
    if task == "sst2":
        argv = [
            "--task",
            "classify",
            "--train",
            str(SHARED / "sst2" / "train.tsv.gz"),
            "--dev",
            str(SHARED / "sst2" / "dev.tsv"),
            "--text-column",
            "sentence",
            "--max-train-examples",
            str(args.sst2_train_examples),
            "--epochs",
            str(args.sst2_epochs),
            "--eval-every",
            "125",
            "--max-length",
            "64",
            "--batch-size",
            "32",
        ]
    elif task == "livedoor":
        split = livedoor_split(cache)
        argv = [
            "--task",
            "classify",
            "--train",
            str(split / "train.jsonl"),
            "--dev",
            str(split / "dev.jsonl"),
            "--label-column",
            "category",
            "--epochs",
            str(args.livedoor_epochs),
            "--max-length",
            "128",
            "--batch-size",
            "32",
        ]
    else:
        conll = SHARED / "ncbi-disease" / "conll"
        argv = [
            "--task",
            "ner",
            "--train",
            str(conll / "train.tsv"),
            "--dev",
            str(conll / "devel.tsv"),
            "--epochs",
            str(args.ncbi_epochs),
            "--max-length",
            "128",
            "--batch-size",
            "16",
        ]
    argv += [
        "--model",
        str(export),
        "--lr",
        lr,
        "--seed",
        str(seed),
        "--warmup-ratio",
        "0.1",
        "--patience",
        str(args.patience),
        "--precision",
        args.precision,
        "--out",
        str(out),
        "--force",
        "--no-progress",
    ]
    return argv


def finetune(argv: list[str]) -> dict[str, Any]:
    """One bert-finetune run; returns its dev metrics and wall time."""
    from pretrain.finetune import cli

    out = Path(argv[argv.index("--out") + 1])
    start, cpu_start = time.perf_counter(), time.process_time()
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    out.parent.mkdir(parents=True, exist_ok=True)  # bert-finetune may fail before making it
    (out.parent / f"{out.name}.log").write_text(stderr.getvalue(), encoding="utf-8")
    if code != 0:
        raise SystemExit(f"bert-finetune {' '.join(argv)} failed with exit code {code}")
    report = json.loads(stdout.getvalue().strip().splitlines()[-1])
    return {
        "dev": report["dev"],
        "best_step": report["best_step"],
        "steps": report["steps"],
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "argv": argv,
    }


def summary(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {spread:.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.finetune_downstream",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--stage", choices=["all", "pretrain", "export", "finetune"], default="all")
    parser.add_argument(
        "--export-step", type=int, help="with --stage export: the checkpoint step to export"
    )
    parser.add_argument("--pretrain-steps", type=int, default=2000, help="default 2000")
    parser.add_argument(
        "--pretrain-seq-len", type=int, default=32, help="pre-training sequence length (default 32)"
    )
    parser.add_argument(
        "--pretrain-batch", type=int, default=128, help="pre-training sequences per step (128)"
    )
    parser.add_argument(
        "--pretrain-optimizer",
        choices=["adamw", "lamb"],
        default="adamw",
        help="default adamw: LAMB at lr 1e-2 and batch 32 let the weights grow 10-25x over a "
        "long run, which fine-tuned worse than random init (docs/benchmarks.md)",
    )
    parser.add_argument("--pretrain-lr", type=float, default=1e-3, help="default 1e-3")
    parser.add_argument("--pretrain-seed", type=int, default=1234)
    parser.add_argument("--seeds", default="1,2,3", help="fine-tuning seeds (default 1,2,3)")
    parser.add_argument("--variants", default="random,sparse,dense")
    parser.add_argument(
        "--lang",
        choices=["en", "ja"],
        default="en",
        help="en: pre-train on the Gutenberg books, tasks sst2,ncbi (default); ja: pre-train on "
        "the livedoor train bodies (SentencePiece), task livedoor",
    )
    parser.add_argument("--tasks", help="default: sst2,ncbi for en, livedoor for ja")
    parser.add_argument("--lrs", default=DEFAULT_LR, help="fine-tuning peak rates (default 1e-3)")
    parser.add_argument("--sst2-train-examples", type=int, default=20000, help="default 20000")
    parser.add_argument("--sst2-epochs", type=float, default=1.0)
    parser.add_argument("--ncbi-epochs", type=float, default=3.0)
    parser.add_argument("--livedoor-epochs", type=float, default=3.0)
    parser.add_argument(
        "--patience",
        type=int,
        default=2,
        help="early stopping: dev evaluations without a better score (default 2; 0 = never)",
    )
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "bench" / "finetune")
    parser.add_argument("--reuse", action="store_true", help="reuse stored exports and runs")
    args = parser.parse_args(argv)
    corpus = CORPUS if args.lang == "en" else LIVEDOOR
    if not corpus.is_file():
        parser.error(f"shared data not found: {corpus}")
    args.cache = args.cache.resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    tasks = [t for t in (args.tasks or TASKS[args.lang]).split(",") if t]
    if unknown := set(tasks) - {"sst2", "ncbi", "livedoor"}:
        parser.error(f"unknown task(s): {', '.join(sorted(unknown))}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    lrs = [lr for lr in args.lrs.split(",") if lr]

    import torch

    from bench.learning_efficiency import prepare

    # One thread: on 2 shared cores a second OpenMP thread mostly waits at barriers (measured
    # here under load: a fine-tuning step took 4 s with 2 threads and 0.1 s with 1).
    torch.set_num_threads(args.threads)
    results_path = args.cache / "results.json"
    results: dict[str, Any] = {"pretrain": {}, "finetune": {}}
    if results_path.is_file():
        results = json.loads(results_path.read_text(encoding="utf-8"))

    mine: dict[str, set[str]] = {"pretrain": set(), "finetune": set()}

    def save() -> None:
        """Write our entries over the file's current ones (another stage may run beside us)."""
        if results_path.is_file():
            current = json.loads(results_path.read_text(encoding="utf-8"))
            for section, keys in mine.items():
                current.setdefault(section, {}).update({k: results[section][k] for k in keys})
                results[section] = current[section]
        results["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        results["machine"] = (
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        results_path.write_text(json.dumps(results, indent=1), encoding="utf-8")

    if args.stage in ("all", "pretrain"):
        if args.lang == "en":
            data_dir = prepare(CORPUS, args.cache, args.vocab_size)
        else:
            data_dir = prepare_ja(args.cache, args.vocab_size)
        for name in variants:
            stored = results["pretrain"].get(name)
            steps = 1 if name == "random" else args.pretrain_steps
            same = name == "random" or stored and stored.get("recipe") == recipe(args)
            if args.reuse and stored and stored["steps"] == steps and same:
                log(f"pre-train {name}: reusing {stored['export']}")
                continue
            results["pretrain"][name] = pretrain(name, data_dir, args.cache, args)
            mine["pretrain"].add(name)
            save()
    if args.stage == "export":
        if args.export_step is None:
            parser.error("--stage export needs --export-step")
        for name in variants:
            if name != "random":
                results["pretrain"][name] = export_step(name, args.cache, args.export_step)
                mine["pretrain"].add(name)
                save()
    if args.stage in ("all", "finetune"):
        for task in tasks:
            for name in variants:
                export = Path(results["pretrain"][name]["export"])
                steps = results["pretrain"][name]["steps"]
                for lr in lrs:
                    for seed in seeds:
                        key = run_key(name, task, seed, lr)
                        stored = results["finetune"].get(key)
                        argv = finetune_argv(export, task, seed, lr, args)
                        # Redone: runs of an export of another step, or with other settings.
                        same = stored and stored["argv"] == argv
                        if args.reuse and same and stored.get("pretrain_steps", steps) == steps:
                            continue
                        log(f"fine-tune {key}")
                        results["finetune"][key] = finetune(argv)
                        results["finetune"][key]["pretrain_steps"] = steps
                        mine["finetune"].add(key)
                        log(f"  {results['finetune'][key]['dev']}")
                        save()

    metric = {"sst2": "accuracy", "ncbi": "f1", "livedoor": "accuracy"}  # ncbi: strict entity F1

    def scores(name: str, task: str, lr: str) -> list[float]:
        runs = (results["finetune"].get(run_key(name, task, s, lr)) for s in seeds)
        return [run["dev"][metric[task]] for run in runs if run is not None]

    header = " | ".join(f"{t} dev {metric[t]}" for t in tasks)
    lines = [f"| pre-training | MLM steps | held-out masked acc | {header} |"]
    lines.append("|---|---:|---:|" + "---:|" * len(tasks))
    per_lr = [f"| pre-training | fine-tuning lr | {header} |", "|---|---:|" + "---:|" * len(tasks)]
    for name in variants:
        pre = results["pretrain"].get(name, {})
        steps = 0 if name == "random" else pre.get("steps", "?")
        acc = pre.get("mlm_acc")
        cells = []
        for task in tasks:
            done = [(statistics.fmean(v), lr, v) for lr in lrs if (v := scores(name, task, lr))]
            if not done:
                cells.append("-")
                continue
            _, best_lr, values = max(done)
            cells.append(summary(values) + (f" at lr {best_lr}" if len(lrs) > 1 else ""))
        acc_text = f"{acc:.3f}" if isinstance(acc, float) else "-"
        lines.append(f"| {name} | {steps} | {acc_text} | " + " | ".join(cells) + " |")
        for lr in lrs:
            row = [summary(v) if (v := scores(name, task, lr)) else "-" for task in tasks]
            per_lr.append(f"| {name} | {lr} | " + " | ".join(row) + " |")
    print()
    print("\n".join(lines))
    if len(lrs) > 1:
        print()
        print("\n".join(per_lr))
    print(f"results: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
