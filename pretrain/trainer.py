"""The training loop, top to bottom: data → model → loss → backward → clip → step → log/ckpt.

Run it with `bert-train --config configs/tiny.yaml data.path=... train.steps=200`.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import kernels
from launch.signals import EXIT_RESUBMIT, StopRequest
from pretrain.blend import parse_blend_spec
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
    MLMConfig,
    ModelShape,
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
from pretrain.distributed import (
    ParallelDims,
    all_reduce_sum,
    any_rank,
    setup_parallel,
    shutdown,
)
from pretrain.memory import MemoryPlan, layout_for, memory_record
from pretrain.metrics import MetricsLog, format_line
from pretrain.model import (
    Bert,
    apply_recompute,
    build_model,
    count_parameters,
    flops_per_token,
)
from pretrain.objectives import LossOutput, pretraining_loss
from pretrain.optim import build_param_groups, clip_grad_norm_, lr_at, optimizer_for_groups, set_lr
from pretrain.parallel.comm_stats import CommCounter, analytic_bytes, lamb_tensors
from pretrain.parallel.parallelize import (
    apply_data_parallel,
    apply_tensor_parallel,
    shard_layout,
    tp_grad_norm_fn,
)
from pretrain.parallel.zero import ZeroRedundancy
from pretrain.precision import DynamicLossScaler, autocast_context


@dataclass
class TrainResult:
    exit_code: int
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    baseline_acc: float | None = None
    checkpoint: Path | None = None
    is_main: bool = True


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
    model: Bert, batches: list[dict[str, torch.Tensor]], config: Config, dims: ParallelDims
) -> dict[str, float]:
    """Masked loss and accuracy on the fixed held-out masked positions (this rank's share of
    them; the sums are reduced over the dp group)."""
    model.eval()
    loss_sum = correct = count = 0.0
    for batch in batches:
        with autocast_context(config.train.precision, dims.device.type):
            out = pretraining_loss(model, _to_device(batch, dims.device), EVAL_MLM, dims.tp_group)
        loss_sum += float(out.masked_loss_sum)
        correct += float(out.masked_correct)
        count += float(out.masked_count)
    model.train()
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], dims)
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


class _LossStep(nn.Module):
    """The model and its objective as one module, so DDP sees every parameter use in forward."""

    def __init__(self, model: Bert, mlm: MLMConfig, tp_group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.model = model
        self.mlm = mlm
        self.tp_group = tp_group

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        return pretraining_loss(self.model, batch, self.mlm, self.tp_group)


def train(config: Config) -> TrainResult:
    """Pre-train as configured; returns the exit code (0, or 75 when stopped on request)."""
    kernels.set_enabled(config.kernels.enabled)  # false: PyTorch references everywhere (debug)
    env, dims, device = setup_parallel(config)
    memory = MemoryPlan()
    try:
        return _train(config, dims, env.describe(), device, memory)
    except torch.OutOfMemoryError:
        raise ConfigError(memory.oom_message()) from None
    finally:
        shutdown()


def _train(
    config: Config, dims: ParallelDims, launch_line: str, device: torch.device, memory: MemoryPlan
) -> TrainResult:
    say = log if dims.is_main else _quiet
    say(launch_line)
    stop = StopRequest(config.train.walltime_s)
    stop.install()
    accumulation = check_batch_layout(config, dims.dp_size)
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
    memory.estimate_for(shape, layout_for(config, dims.dp_size, device.type, accumulation))
    say(memory.describe(device))
    if not config.train.skip_memory_check:
        memory.check(device)
    # Built whole on the host and moved once split: a tp rank's GPU then never holds the full
    # model (3.9B in fp32 is 15.6 GB, about all of a 16 GB V100), and every device starts from
    # the same weights.
    model = build_model(shape, "cpu")
    apply_recompute(model, config.train.recompute)
    resume_path = _find_resume(config)
    if resume_path is None and config.train.init_from:
        _init_weights_from(config.train.init_from, model)  # whole weights, before splitting
        say(f"initialised weights from {config.train.init_from}")
    try:
        apply_tensor_parallel(model, dims)
    except ValueError as error:
        raise ConfigError(f"parallel.tp={dims.tp_size}: {error}") from None
    model.to(device)
    sharding = shard_layout(model, dims)
    groups = build_param_groups(model, config.optim.weight_decay)

    def build(share: list[dict[str, Any]]) -> torch.optim.Optimizer:
        o = config.optim
        return optimizer_for_groups(share, o.name, o.lr, o.betas, o.eps, dims.tp_group)

    optimizer = ZeroRedundancy(groups, build, dims) if config.parallel.zero else build(groups)
    scaler = DynamicLossScaler(enabled=config.train.precision == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm_fn = tp_grad_norm_fn(model, params, dims)

    step, consumed = 0, 0
    if resume_path is not None:
        check_shape(resume_path, read_train_state(resume_path).get("model_shape", {}), shape)
        state = load_checkpoint(resume_path, model, optimizer, dims, sharding)
        step, consumed = state["step"], state["consumed_samples"]
        scaler.load_state_dict(state["scaler"])
        saved = state.get("layout", {})
        say(
            f"resumed from {resume_path} at step {step} ({consumed} samples consumed; saved at "
            f"tp {saved.get('tp', 1)} x dp {saved.get('dp', 1)})"
        )

    loss_step: nn.Module = _LossStep(model, config.mlm, dims.tp_group)
    if config.train.compile:
        model.compile()  # compiles forward in place; the first steps pay the compile time
    if dims.dp_size > 1:
        # Gradients are averaged over the dp group in buckets, overlapping with backward.
        loss_step = apply_data_parallel(loss_step, dims)

    out_dir = Path(config.train.out_dir)
    if dims.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
        say("resolved config:\n" + (out_dir / "config.yaml").read_text(encoding="utf-8").rstrip())
    metrics = MetricsLog(out_dir, resume_step=step if resume_path else None, enabled=dims.is_main)
    say(
        f"model: {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, "
        f"vocab {shape.vocab_size}, {shape.norm}-LN, {count_parameters(model):,} parameters; "
        f"{len(data.train):,} training samples of up to {config.data.seq_len} tokens; "
        f"dp {dims.dp_size} x tp {dims.tp_size}, device {device}, {config.train.precision}, "
        f"mlm {config.mlm.mode}, {accumulation} micro-batch(es) per step"
    )

    sampler = StreamBatches(
        consumed, config.train.global_batch, config.train.micro_batch, dims.dp_rank, dims.dp_size
    )
    batches = iter(build_loader(data.train, sampler, config.data.workers))
    held_out = (
        eval_batches(data.valid, config.train.micro_batch, config.train.eval_batches)
        if data.valid is not None
        else []
    )
    result = TrainResult(exit_code=0, step=step, is_main=dims.is_main)
    if held_out:
        result.baseline_acc = baseline_accuracy(held_out, most_frequent_token(data.dataset))

    def train_state() -> dict[str, Any]:
        return {
            "consumed_samples": consumed,
            "scaler": scaler.state_dict(),
            "config": config.to_dict(),
            "model_shape": asdict(shape),
            "layout": {"tp": dims.tp_size, "dp": dims.dp_size, "world_size": dims.world_size},
            "tokenizer_hash": data.dataset.tokenizer_hash,
            "data_paths": [str(Path(p).resolve()) for p in parse_blend_spec(config.data.path)[0]],
            "tokenizer_dir": str(data.tokenizer_dir.resolve()),
        }

    def checkpoint() -> None:
        # dp replicas hold identical state: the tp ranks of the first replica write, in parallel.
        path = save_checkpoint(
            config.checkpoint_dir,
            step,
            model,
            optimizer,
            train_state(),
            config.checkpoint.keep,
            dims,
            sharding,
        )
        say(f"checkpoint written: {path}")
        result.checkpoint = path

    # The collectives of each training step (not logging or evaluation) are counted on request.
    comm = None
    if config.train.comm_stats:
        comm = CommCounter({"tp": dims.tp_group, "dp": dims.dp_group})
        comm.minimum = partial(
            analytic_bytes,
            shape,
            tp=dims.tp_size,
            dp=dims.dp_size,
            local_params=sum(p.numel() for p in params),
            optimizer_tensors=lamb_tensors(optimizer),
            zero=bool(config.parallel.zero),
            autocast_bytes=4 if config.train.precision == "fp32" else 2,
        )
    counting = comm if comm is not None else nullcontext()
    interval = _Interval(comm)
    loss_step.train()
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
        with counting:
            for micro in range(accumulation):
                batch = _to_device(next(batches), device)
                last = micro == accumulation - 1
                sync = nullcontext() if last or dims.dp_size == 1 else loss_step.no_sync()
                with sync:
                    with autocast_context(config.train.precision, device.type):
                        out = loss_step(batch)
                    scaler.scale_loss(out.loss / accumulation).backward()
                step_loss += float(out.loss.detach()) / accumulation  # CPU-GPU sync point
                interval.add(out, int(batch["attention_mask"].sum()), batch["input_ids"].numel())
            found_inf = scaler.unscale_and_check(params)
            grad_norm = clip_grad_norm_(params, config.optim.clip_grad, norm_fn=grad_norm_fn)
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
                step, consumed, lr, float(grad_norm), loss_scale, shape, config, dims
            )
            record.update(memory_record(device))
            metrics.write(record)
            result.history.append(record)
            say(format_line(record))
            interval = _Interval(comm)
        if held_out and (step % config.train.eval_every == 0 or step == config.train.steps):
            shard = held_out[dims.dp_rank :: dims.dp_size]
            record = {"split": "valid", "step": step, **evaluate(model, shard, config, dims)}
            metrics.write(record)
            result.evals.append(record)
            say(format_line(record))
            interval.start = time.perf_counter()  # evaluation time is not training time
        reason = stop.reason()
        if any_rank(reason is not None, dims) and step < config.train.steps:
            checkpoint()
            say(
                f"stopping at step {step}: {reason or 'another rank was asked to stop'}; "
                "resubmit with train.resume=auto to continue"
            )
            result.exit_code = EXIT_RESUBMIT
            break
        if step % config.checkpoint.every == 0 or step == config.train.steps:
            checkpoint()
    metrics.close()
    result.step = step
    return result


def _quiet(message: str) -> None:
    """Non-main ranks stay silent: one log per job, not one per GPU."""


class _Interval:
    """Accumulates one logging interval's statistics."""

    def __init__(self, comm: CommCounter | None = None) -> None:
        self.start = time.perf_counter()
        self.comm = comm
        self.comm_before = Counter(comm.bytes) if comm is not None else Counter()
        self.losses: list[float] = []
        self.masked_loss = 0.0
        self.correct = 0.0
        self.masked = 0.0
        self.tokens = 0
        self.scored = 0
        self.encoded = 0
        self.skipped = False

    def add(self, out: Any, tokens: int, encoded: int) -> None:
        self.masked_loss += float(out.masked_loss_sum)
        self.correct += float(out.masked_correct)
        self.masked += float(out.masked_count)
        self.tokens += tokens
        self.scored += out.scored_count
        self.encoded += encoded

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
        shape: ModelShape,
        config: Config,
        dims: ParallelDims,
    ) -> dict[str, Any]:
        """The interval's record, with every sum reduced over the dp group."""
        elapsed = time.perf_counter() - self.start
        loss, masked_loss, correct, masked, tokens, scored = all_reduce_sum(
            [
                sum(self.losses),
                self.masked_loss,
                self.correct,
                self.masked,
                self.tokens,
                self.scored,
            ],
            dims,
        )
        scored_fraction = scored / max(tokens, 1)
        flops = flops_per_token(shape, config.data.seq_len, scored_fraction) * tokens
        record = {
            "step": step,
            "consumed_samples": consumed,
            "loss": loss / len(self.losses) / dims.dp_size,
            "masked_loss": masked_loss / max(masked, 1.0),
            "mlm_acc": correct / max(masked, 1.0),
            "lr": lr,
            "grad_norm": grad_norm,
            "loss_scale": loss_scale,
            "tokens_per_s": tokens / elapsed,
            "tflops": flops / elapsed / dims.world_size / 1e12,  # per device
            "elapsed_s": elapsed,
        }
        if self.comm is not None:
            moved = self.comm.bytes - self.comm_before
            steps = len(self.losses)
            record["comm_bytes"] = {k: v // steps for k, v in sorted(moved.items())}
            minimum = self.comm.minimum(encoded=self.encoded, scored=self.scored)
            record["comm_bytes_min"] = {k: v // steps for k, v in sorted(minimum.items())}
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
    if result.is_main:
        print_summary(result)
    return result.exit_code
