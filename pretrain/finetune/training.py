"""The fine-tuning run: read data, load the export with transformers, train, evaluate, save.

A plain PyTorch loop (no `transformers.Trainer`, so no `accelerate` dependency) that can be read
top to bottom: AdamW with linear warm-up and linear decay (pretrain.optim.lr_at), gradient
clipping at 1.0, autocast for bf16/fp16 (fp16 with loss scaling), evaluation on dev every epoch
or every `eval_every` steps, early stopping after `patience` evaluations without a better dev
score, and the best weights restored before the final dev/test scores are taken and the model is
saved.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import non_finite_tensor
from pretrain.config import ConfigError
from pretrain.finetune import data as data_mod
from pretrain.finetune import metrics, tasks
from pretrain.optim import build_param_groups, lr_at, optimizer_for_groups, set_lr
from pretrain.precision import autocast_context, resolve_precision

METRICS_FILE = "metrics.json"
DEFAULT_MAX_LENGTH = 128
PRIMARY_METRIC = {"classify": "accuracy", "pair": "accuracy", "ner": "f1"}


class FinetuneError(ConfigError):
    """A user mistake (options, model directory, output directory); one-line message."""


@dataclass
class FinetuneOptions:
    """Everything a run needs; the CLI fills it from its arguments (see cli.py for help)."""

    model: Path
    task: str
    train: Path
    dev: Path
    test: Path | None = None
    text_column: str | None = None
    text_b_column: str | None = None
    label_column: str | None = None
    epochs: float = 3.0
    lr: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    batch_size: int = 32
    max_length: int | None = None
    """Sub-words per example; None = 128, or the model's position count if smaller."""
    seed: int = 42
    patience: int = 2
    eval_every: int = 0
    max_train_examples: int | None = None
    out: Path | None = None
    force: bool = False
    precision: str = "fp32"
    device: str = "auto"
    progress: bool | None = None
    """tqdm progress bar: None = only when stderr is a terminal."""


def say(message: str) -> None:
    print(f"bert-finetune: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Checks that run before anything expensive


def check_options(opt: FinetuneOptions) -> None:
    """Raise FinetuneError on a bad option or model directory; fills in max_length if None."""
    if opt.task not in tasks.TASKS:
        raise FinetuneError(f"--task {opt.task!r}: choose one of {', '.join(tasks.TASKS)}")
    if not opt.epochs > 0:
        raise FinetuneError(f"--epochs {opt.epochs} must be positive")
    if not opt.lr > 0:
        raise FinetuneError(f"--lr {opt.lr} must be positive")
    if not 0 <= opt.warmup_ratio < 1:
        raise FinetuneError(f"--warmup-ratio {opt.warmup_ratio} must be in [0, 1)")
    if opt.batch_size < 1:
        raise FinetuneError(f"--batch-size {opt.batch_size} must be at least 1")
    if opt.max_length is not None and opt.max_length < 8:
        raise FinetuneError(f"--max-length {opt.max_length} must be at least 8")
    if opt.patience < 0 or opt.eval_every < 0:
        raise FinetuneError("--patience and --eval-every must be >= 0")
    if opt.max_train_examples is not None and opt.max_train_examples < 1:
        raise FinetuneError("--max-train-examples must be at least 1")
    if opt.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise FinetuneError(f"--precision {opt.precision!r}: choose auto, fp32, bf16 or fp16")
    if not opt.model.is_dir():
        raise FinetuneError(f"--model {opt.model}: no such directory")
    if not (opt.model / "config.json").is_file():
        raise FinetuneError(
            f"--model {opt.model} has no config.json: pass a directory written by bert-export "
            "(or any Hugging Face BERT directory)"
        )
    try:
        config = json.loads((opt.model / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FinetuneError(f"cannot read {opt.model / 'config.json'}: {error}") from None
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int):
        positions = DEFAULT_MAX_LENGTH
    if opt.max_length is None:
        opt.max_length = min(DEFAULT_MAX_LENGTH, positions)
    elif opt.max_length > positions:
        raise FinetuneError(
            f"--max-length {opt.max_length} exceeds the model's {positions} positions"
        )


def output_dir(opt: FinetuneOptions) -> Path:
    """--out, or MODEL-TASK beside the model (runs/demo/hf-ner); never clobbers other files."""
    out = opt.out if opt.out is not None else opt.model.parent / f"{opt.model.name}-{opt.task}"
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} exists and is not a directory")
    if out.resolve() == opt.model.resolve():
        raise FinetuneError(f"--out {out} is the model directory: choose another")
    if out.is_dir() and any(out.iterdir()):
        if not (out / METRICS_FILE).is_file():
            raise FinetuneError(
                f"--out {out} is not empty and not an earlier bert-finetune output "
                f"(no {METRICS_FILE}): refusing to replace it"
            )
        if not opt.force:
            raise FinetuneError(f"--out {out} holds an earlier run: pass --force to replace it")
    return out


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FinetuneError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"--device {name}: CUDA is not available here")
    return device


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Split:
    name: str
    path: Path
    examples: list
    encoded: tasks.Encoded
    labelled: bool


def read_examples(opt: FinetuneOptions, path: Path, require_labels: bool) -> list:
    if opt.task == "ner":
        return data_mod.read_token_examples(
            path, token_column=opt.text_column, tag_column=opt.label_column
        )
    return data_mod.read_text_examples(
        path,
        text_column=opt.text_column,
        text_b_column=opt.text_b_column,
        label_column=opt.label_column,
        pair=opt.task == "pair",
        require_labels=require_labels,
    )


def encode(opt: FinetuneOptions, examples: list, tokenizer, label2id) -> tasks.Encoded:
    if opt.task == "ner":
        return tasks.encode_tokens(examples, tokenizer, label2id, opt.max_length)
    return tasks.encode_text(examples, tokenizer, label2id, opt.max_length)


def batches(features: list[dict], order: list[int], size: int, pad_id: int):
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        yield chunk, tasks.collate([features[i] for i in chunk], pad_id)


# ---------------------------------------------------------------------------------------------
# Model


def load_model(opt: FinetuneOptions, labels: list[str]):
    """transformers' own Auto classes on the export; the task head is freshly initialised."""
    import transformers
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    # The load report lists the pre-training heads that fine-tuning drops: we summarise it.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    auto = AutoModelForSequenceClassification
    if opt.task == "ner":
        auto = AutoModelForTokenClassification
    try:
        tokenizer = AutoTokenizer.from_pretrained(opt.model)
        model, info = auto.from_pretrained(
            opt.model,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, ImportError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise FinetuneError(f"cannot load {opt.model} with transformers: {first}") from None
    # Only the task head may be new: a missing encoder weight would silently fine-tune a
    # partly random model.
    encoder = model.base_model_prefix + "."
    bad = sorted(k for k in info["missing_keys"] if k.startswith(encoder))
    bad += sorted(str(k) for k in info.get("mismatched_keys") or ())
    if bad:
        raise FinetuneError(
            f"{opt.model}: {len(bad)} encoder weights are missing or of the wrong shape "
            f"(e.g. {bad[0]}): is it a complete BERT export?"
        )
    if tokenizer.pad_token_id is None:
        raise FinetuneError(f"{opt.model}: the tokenizer has no [PAD] token")
    broken = non_finite_tensor(model.base_model.named_parameters())
    if broken is not None:
        raise FinetuneError(
            f"{opt.model}: weight {broken} holds NaN or inf (the pre-training diverged): "
            "fine-tune an export of an earlier checkpoint"
        )
    fresh = ", ".join(sorted(info["missing_keys"])) or "none"
    say(
        f"loaded {type(model).__name__} from {opt.model} with {type(tokenizer).__name__}; "
        f"new task head: {fresh}; unused pre-training weights: {len(info['unexpected_keys'])}"
    )
    return tokenizer, model


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predict(model, split: Split, opt: FinetuneOptions, pad_id: int, device) -> list:
    """Argmax label ids per example (NER: per sub-word position, unpadded)."""
    model.eval()
    features = split.encoded.features
    # Longest first: batches of similar length waste less padding.
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    out: list[Any] = [None] * len(features)
    for chunk, batch in batches(features, order, opt.batch_size * 2, pad_id):
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with autocast_context(opt.precision, device.type):
            logits = model(**batch).logits
        ids = logits.argmax(-1).cpu().tolist()  # a device→host sync, once per batch
        for index, row in zip(chunk, ids, strict=True):
            out[index] = row
    model.train()
    return out


def score(opt, split: Split, predictions: list, labels: list[str], train: Split) -> dict:
    """Dev/test scores; classification also gets the majority-class baseline of `train`."""
    id2label = dict(enumerate(labels))
    if opt.task == "ner":
        pred_tags = tasks.word_predictions(split.encoded, split.examples, predictions, id2label)
        result = metrics.entity_scores([ex.tags for ex in split.examples], pred_tags)
    else:
        gold = [f["labels"] for f in split.encoded.features]
        train_ids = [f["labels"] for f in train.encoded.features]
        result = metrics.classification_scores(gold, predictions, len(labels), train_ids)
    if split.encoded.truncated:
        result["truncated"] = split.encoded.truncated
    return result


# ---------------------------------------------------------------------------------------------
# The run


def run(opt: FinetuneOptions) -> dict[str, Any]:
    """Fine-tune, evaluate and save; returns the report (also written to OUT/metrics.json)."""
    started = time.perf_counter()
    check_options(opt)
    out = output_dir(opt)
    device = pick_device(opt.device)
    try:  # auto resolved as in bert-train; bf16 below compute capability 8.0 (V100) refused
        opt.precision, _ = resolve_precision(opt.precision, device)
    except ValueError as error:
        raise FinetuneError(f"--precision {opt.precision}: {error}") from None

    # Data first: a wrong column should fail in a second, not after loading the model.
    train_examples = data_mod.sample(read_examples(opt, opt.train, True), opt.max_train_examples)
    labels = tasks.build_labels(opt.task, train_examples)
    label2id = {label: i for i, label in enumerate(labels)}
    read = [("train", opt.train, train_examples, True)]
    dev_examples = read_examples(opt, opt.dev, require_labels=True)
    read.append(
        ("dev", opt.dev, dev_examples, tasks.check_labels(opt.dev, opt.task, dev_examples, labels))
    )
    if opt.test is not None:
        test_examples = read_examples(opt, opt.test, require_labels=False)
        labelled = tasks.check_labels(opt.test, opt.task, test_examples, labels)
        read.append(("test", opt.test, test_examples, labelled))

    # Seed before the model is built: the fresh head's initialisation depends on it.
    random.seed(opt.seed)
    torch.manual_seed(opt.seed)
    tokenizer, model = load_model(opt, labels)
    model.to(device)
    splits = {}
    for name, path, examples, labelled in read:
        splits[name] = Split(
            name, path, examples, encode(opt, examples, tokenizer, label2id), labelled
        )
        if splits[name].encoded.truncated:
            say(
                f"{name}: {splits[name].encoded.truncated} of {len(examples)} examples longer "
                f"than --max-length {opt.max_length} were truncated"
            )

    best, history, steps, steps_per_epoch = train_loop(
        opt, model, tokenizer.pad_token_id, splits, labels, device
    )
    model.load_state_dict(best["state"])
    report: dict[str, Any] = {
        "task": opt.task,
        "model": str(opt.model),
        "primary_metric": PRIMARY_METRIC[opt.task],
        "labels": labels,
        "train_examples": len(train_examples),
        "best_step": best["step"],
        "steps": steps,
        "epochs_run": round(steps / steps_per_epoch, 3),
        "dev": best["dev"],
    }
    test_predictions = None
    if "test" in splits:
        test = splits["test"]
        test_predictions = predict(model, test, opt, tokenizer.pad_token_id, device)
        if test.labelled:
            report["test"] = score(opt, test, test_predictions, labels, splits["train"])
        else:
            report["test"] = {"examples": len(test.examples), "labelled": False}
    report.update(
        seconds=round(time.perf_counter() - started, 1),
        device=device.type,
        precision=opt.precision,
        out=str(out),
    )
    metrics_file = {**report, "options": _jsonable(asdict(opt)), "history": history}
    save(model, tokenizer, out, metrics_file, splits.get("test"), test_predictions, labels, opt)
    return report


def train_loop(opt, model, pad_id: int, splits: dict[str, Split], labels, device):
    """AdamW + linear warm-up/decay; evaluates on dev and keeps the best weights (on the CPU).

    Returns (best, history, steps taken, steps per epoch); best["state"] is the state dict
    of the best dev evaluation.
    """
    from tqdm.auto import tqdm

    train, dev = splits["train"], splits["dev"]
    steps_per_epoch = math.ceil(len(train.examples) / opt.batch_size)
    total_steps = max(1, math.ceil(opt.epochs * steps_per_epoch))
    warmup = int(opt.warmup_ratio * total_steps)
    eval_every = opt.eval_every or steps_per_epoch
    # Pre-training's own parts: biases and norm gains undecayed, AdamW, and its LR schedule.
    groups = build_param_groups(model, opt.weight_decay)
    optimizer = optimizer_for_groups(groups, "adamw", opt.lr, betas=(0.9, 0.999), eps=1e-8)
    schedule = {"base_lr": opt.lr, "warmup_steps": warmup, "total_steps": total_steps}
    scaler = torch.amp.GradScaler(device.type, enabled=opt.precision == "fp16")
    primary = PRIMARY_METRIC[opt.task]
    sizes = " / ".join(f"{len(s.examples)} {name}" for name, s in splits.items())
    say(
        f"{opt.task}: {sizes} examples, {len(labels)} labels; {total_steps} steps "
        f"({opt.epochs:g} epochs of {steps_per_epoch}), batch {opt.batch_size}, lr {opt.lr:g}, "
        f"warm-up {warmup} steps, {device.type} {opt.precision}; early stopping on dev {primary}"
        + (f" (patience {opt.patience} evaluations)" if opt.patience else " (off)")
    )

    generator = torch.Generator().manual_seed(opt.seed)
    best: dict[str, Any] = {"score": -math.inf, "step": 0, "state": None, "dev": None}
    history: list[dict[str, Any]] = []
    evals_without_gain = 0
    step = 0
    running, count = 0.0, 0
    disable = None if opt.progress is None else not opt.progress  # None: only on a terminal
    bar = tqdm(total=total_steps, disable=disable, desc="fine-tune", unit="step", file=sys.stderr)
    model.train()
    while step < total_steps:
        order = torch.randperm(len(train.examples), generator=generator).tolist()
        for _, batch in batches(train.encoded.features, order, opt.batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            set_lr(optimizer, lr_at(step, **schedule, decay="linear"))
            with autocast_context(opt.precision, device.type):
                loss = model(**batch).loss
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running += loss.item()  # a device→host sync per step; small next to a CPU step
            count += 1
            bar.update(1)
            if step % eval_every and step < total_steps:
                continue
            dev_scores = score(opt, dev, predict(model, dev, opt, pad_id, device), labels, train)
            record = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 3),
                "train_loss": running / count,
                "dev": dev_scores,
            }
            history.append(record)
            running, count = 0.0, 0
            improved = dev_scores[primary] > best["score"]
            say(
                f"step {step}/{total_steps} (epoch {record['epoch']:g}): train loss "
                f"{record['train_loss']:.4f}, dev {primary} {dev_scores[primary]:.4f}"
                + (" (best)" if improved else "")
            )
            if improved:
                state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                best = {
                    "score": dev_scores[primary],
                    "step": step,
                    "dev": dev_scores,
                    "state": state,
                }
                evals_without_gain = 0
            else:
                evals_without_gain += 1
                if opt.patience and evals_without_gain >= opt.patience:
                    say(f"early stop: no better dev {primary} in {opt.patience} evaluations")
                    total_steps = step  # ends both loops
            if step >= total_steps:
                break
    bar.close()
    return best, history, step, steps_per_epoch


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}


def save(model, tokenizer, out: Path, metrics_file, test, test_predictions, labels, opt) -> None:
    """safetensors weights + config + tokenizer + metrics.json (+ test predictions), written
    to a temporary directory and renamed, so `out` never holds half a model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    try:
        model.save_pretrained(temp)  # safetensors by default
        tokenizer.save_pretrained(temp)
        text = json.dumps(metrics_file, indent=1, ensure_ascii=False) + "\n"
        (temp / METRICS_FILE).write_text(text, encoding="utf-8")
        if test is not None:
            write_predictions(temp / "test_predictions.jsonl", opt, test, test_predictions, labels)
        if out.exists():
            shutil.rmtree(out)  # output_dir() made sure it is an earlier run and --force
        os.replace(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def write_predictions(path: Path, opt, split: Split, predictions: list, labels: list[str]):
    """One JSON line per example: its text (or tokens) and the predicted label (or tags)."""
    id2label = dict(enumerate(labels))
    with open(path, "w", encoding="utf-8") as handle:
        if opt.task == "ner":
            tags = tasks.word_predictions(split.encoded, split.examples, predictions, id2label)
            for ex, row in zip(split.examples, tags, strict=True):
                line = {"tokens": list(ex.tokens), "predicted": row}
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        else:
            for ex, label_id in zip(split.examples, predictions, strict=True):
                line = {"text": ex.text, "predicted": id2label[label_id]}
                if ex.text_b is not None:
                    line["text_b"] = ex.text_b
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
