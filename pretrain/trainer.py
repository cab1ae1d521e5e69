"""The training loop, top to bottom: data → model → loss → backward → clip → step → log/ckpt.

Run it with `bert-train --config configs/tiny.yaml data.path=... train.steps=200`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from launch.signals import EXIT_RESUBMIT, StopRequest
from pretrain.checkpoint import (
    check_shape,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    read_train_state,
    resolve_checkpoint,
    save_checkpoint,
)
from pretrain.config import (
    Config,
    ConfigError,
    check_batch_layout,
    resolve_model_shape,
    save_config,
)
from pretrain.data import (
    EVAL_MLM,
    StreamBatches,
    build_loader,
    eval_batches,
    most_frequent_token,
    open_training_data,
)
from pretrain.metrics import MetricsLog, format_line
from pretrain.model import (
    Bert,
    apply_recompute,
    build_model,
    count_parameters,
    flops_per_token,
)
from pretrain.objectives import pretraining_loss
from pretrain.optim import build_optimizer, clip_grad_norm_, lr_at, set_lr
from pretrain.precision import DynamicLossScaler, autocast_context


@dataclass
class TrainResult:
    exit_code: int
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    baseline_acc: float | None = None
    checkpoint: Path | None = None


def pick_device(setting: str) -> torch.device:
    if setting != "auto":
        return torch.device(setting)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def log(message: str) -> None:
    print(message, flush=True)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _find_resume(config: Config) -> Path | None:
    setting = config.train.resume
    if setting == "none":
        return None
    if setting == "auto":
        return latest_checkpoint(config.checkpoint_dir)
    return resolve_checkpoint(setting)


def _init_weights_from(path_text: str, model: Bert) -> None:
    """Weights only, fresh schedule: our checkpoint, or a Hugging Face BERT directory."""
    path = Path(path_text)
    if (path / "config.json").is_file():
        from pretrain.export_hf import load_hf_weights

        load_hf_weights(path, model)
        return
    path = resolve_checkpoint(path)
    check_shape(path, read_train_state(path).get("model_shape", {}), model.shape)
    load_model_weights(path, model)


@torch.no_grad()
def evaluate(
    model: Bert, batches: list[dict[str, torch.Tensor]], config: Config, device: torch.device
) -> dict[str, float]:
    """Masked loss and accuracy on the fixed held-out masked positions."""
    model.eval()
    loss_sum = correct = count = 0.0
    for batch in batches:
        with autocast_context(config.train.precision, device.type):
            out = pretraining_loss(model, _to_device(batch, device), EVAL_MLM)
        loss_sum += float(out.masked_loss_sum)
        correct += float(out.masked_correct)
        count += float(out.masked_count)
    model.train()
    count = max(count, 1.0)
    return {"masked_loss": loss_sum / count, "mlm_acc": correct / count}


def baseline_accuracy(batches: list[dict[str, torch.Tensor]], token: int) -> float:
    """Accuracy of always predicting the corpus's most frequent token at the masked positions."""
    hits = total = 0
    for batch in batches:
        labels = batch["labels"][batch["picked"]]
        hits += int((labels == token).sum())
        total += labels.numel()
    return hits / max(total, 1)


def train(config: Config) -> TrainResult:
    """Pre-train as configured; returns the exit code (0, or 75 when stopped on request)."""
    if config.parallel.tp != 1 or config.parallel.zero != 0:
        raise ConfigError(
            "parallel.tp > 1 and parallel.zero = 1 are not available in this version yet: "
            "set parallel.tp=1 parallel.zero=0"
        )
    stop = StopRequest(config.train.walltime_s)
    stop.install()
    device = pick_device(config.train.device)
    dp_rank, dp_size = 0, 1
    accumulation = check_batch_layout(config, dp_size)
    torch.manual_seed(config.train.seed)

    data = open_training_data(
        config.data.path,
        config.data.tokenizer,
        config.data.seq_len,
        config.data.valid_fraction,
        config.mlm,
        config.train.seed,
    )
    shape = resolve_model_shape(config, data.dataset.vocab_size)
    if shape.vocab_size < data.dataset.vocab_size:
        raise ConfigError(
            f"model.vocab_size={shape.vocab_size} is smaller than the tokenizer's "
            f"{data.dataset.vocab_size}: unset model.vocab_size"
        )
    model = build_model(shape, device)
    apply_recompute(model, config.train.recompute)
    optimizer = build_optimizer(
        model,
        config.optim.name,
        lr=config.optim.lr,
        weight_decay=config.optim.weight_decay,
        betas=config.optim.betas,
        eps=config.optim.eps,
    )
    scaler = DynamicLossScaler(enabled=config.train.precision == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]
    if config.train.compile:
        model.compile()  # compiles forward in place; the first steps pay the compile time

    step, consumed = 0, 0
    resume_path = _find_resume(config)
    if resume_path is not None:
        check_shape(resume_path, read_train_state(resume_path).get("model_shape", {}), shape)
        state = load_checkpoint(resume_path, model, optimizer)
        step, consumed = state["step"], state["consumed_samples"]
        scaler.load_state_dict(state["scaler"])
        log(f"resumed from {resume_path} at step {step} ({consumed} samples consumed)")
    elif config.train.init_from:
        _init_weights_from(config.train.init_from, model)
        log(f"initialised weights from {config.train.init_from}")

    out_dir = Path(config.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.yaml")
    log("resolved config:\n" + (out_dir / "config.yaml").read_text(encoding="utf-8").rstrip())
    metrics = MetricsLog(out_dir, resume_step=step if resume_path else None)
    log(
        f"model: {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, "
        f"vocab {shape.vocab_size}, {shape.norm}-LN, {count_parameters(model):,} parameters; "
        f"{len(data.train):,} training samples of up to {config.data.seq_len} tokens; "
        f"device {device}, {config.train.precision}, mlm {config.mlm.mode}"
    )

    loader = build_loader(
        data.train,
        StreamBatches(
            consumed, config.train.global_batch, config.train.micro_batch, dp_rank, dp_size
        ),
        config.data.workers,
    )
    batches = iter(loader)
    held_out = (
        eval_batches(data.valid, config.train.micro_batch, config.train.eval_batches)
        if data.valid is not None
        else []
    )
    result = TrainResult(exit_code=0, step=step)
    if held_out:
        result.baseline_acc = baseline_accuracy(held_out, most_frequent_token(data.dataset))

    def train_state() -> dict[str, Any]:
        return {
            "consumed_samples": consumed,
            "scaler": scaler.state_dict(),
            "config": config.to_dict(),
            "model_shape": asdict(shape),
            "layout": {"tp": 1, "dp": dp_size, "world_size": 1},
            "tokenizer_hash": data.dataset.tokenizer_hash,
            "data_path": str(Path(config.data.path).resolve()),
            "tokenizer_dir": str(data.tokenizer_dir.resolve()),
        }

    def checkpoint() -> Path:
        path = save_checkpoint(
            config.checkpoint_dir, step, model, optimizer, train_state(), config.checkpoint.keep
        )
        log(f"checkpoint written: {path}")
        result.checkpoint = path
        return path

    interval = _Interval()
    model.train()
    while step < config.train.steps:
        lr = lr_at(
            step,
            base_lr=config.optim.lr,
            warmup_steps=config.optim.warmup_steps,
            total_steps=config.train.steps,
            decay=config.optim.decay,
            power=config.optim.power,
            min_lr_ratio=config.optim.min_lr_ratio,
        )
        set_lr(optimizer, lr)
        step_loss = 0.0
        for _ in range(accumulation):
            batch = _to_device(next(batches), device)
            with autocast_context(config.train.precision, device.type):
                out = pretraining_loss(model, batch, config.mlm)
            scaler.scale_loss(out.loss / accumulation).backward()
            step_loss += float(out.loss.detach()) / accumulation  # CPU-GPU sync point
            interval.add(out, int(batch["attention_mask"].sum()))
        found_inf = scaler.unscale_and_check(params)
        grad_norm = clip_grad_norm_(params, config.optim.clip_grad)
        if not found_inf:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_scale = scaler.scale
        scaler.update(found_inf)
        step += 1
        consumed += config.train.global_batch
        interval.end_step(step_loss, found_inf)

        if step % config.train.log_every == 0 or step == config.train.steps:
            record = interval.record(
                step, consumed, lr, float(grad_norm), loss_scale, shape, config
            )
            metrics.write(record)
            result.history.append(record)
            log(format_line(record))
            interval = _Interval()
        if held_out and (step % config.train.eval_every == 0 or step == config.train.steps):
            record = {"split": "valid", "step": step, **evaluate(model, held_out, config, device)}
            metrics.write(record)
            result.evals.append(record)
            log(format_line(record))
            interval.start = time.perf_counter()  # evaluation time is not training time
        reason = stop.reason()
        if reason is not None and step < config.train.steps:
            checkpoint()
            log(f"stopping at step {step}: {reason}; resubmit with train.resume=auto to continue")
            result.exit_code = EXIT_RESUBMIT
            break
        if step % config.checkpoint.every == 0 or step == config.train.steps:
            checkpoint()
    metrics.close()
    result.step = step
    return result


class _Interval:
    """Accumulates one logging interval's statistics."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.losses: list[float] = []
        self.masked_loss = 0.0
        self.correct = 0.0
        self.masked = 0.0
        self.tokens = 0
        self.scored = 0
        self.skipped = False

    def add(self, out: Any, tokens: int) -> None:
        self.masked_loss += float(out.masked_loss_sum)
        self.correct += float(out.masked_correct)
        self.masked += float(out.masked_count)
        self.tokens += tokens
        self.scored += out.scored_count

    def end_step(self, loss: float, skipped: bool) -> None:
        self.losses.append(loss)
        self.skipped = self.skipped or skipped

    def record(
        self,
        step: int,
        consumed: int,
        lr: float,
        grad_norm: float,
        loss_scale: float,
        shape,
        config,
    ) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.start
        scored_fraction = self.scored / max(self.tokens, 1)
        flops = flops_per_token(shape, config.data.seq_len, scored_fraction) * self.tokens
        record = {
            "step": step,
            "consumed_samples": consumed,
            "loss": sum(self.losses) / len(self.losses),
            "masked_loss": self.masked_loss / max(self.masked, 1.0),
            "mlm_acc": self.correct / max(self.masked, 1.0),
            "lr": lr,
            "grad_norm": grad_norm,
            "loss_scale": loss_scale,
            "tokens_per_s": self.tokens / elapsed,
            "tflops": flops / elapsed / 1e12,
            "elapsed_s": elapsed,
        }
        if self.skipped:
            record["skipped"] = True
        return record


def print_summary(result: TrainResult) -> None:
    """The short end-of-run summary the demo shows."""
    if not result.history:
        return
    first, last = result.history[0], result.history[-1]
    log(
        f"summary: loss {first['loss']:.3f} -> {last['loss']:.3f}, "
        f"masked loss {first['masked_loss']:.3f} -> {last['masked_loss']:.3f}"
    )
    if result.evals:
        acc = result.evals[-1]["mlm_acc"]
        log(
            f"summary: held-out masked-token accuracy {acc:.3f} "
            f"(most-frequent-token baseline {result.baseline_acc:.3f})"
        )
    if result.checkpoint is not None:
        log(f"summary: checkpoint {result.checkpoint}")


def main_train(config: Config) -> int:
    result = train(config)
    print_summary(result)
    return result.exit_code
