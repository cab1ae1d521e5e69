"""The training loop, top to bottom: data → model → loss → backward → clip → step → log/ckpt.

Run it with `bert-train --config configs/tiny.yaml data.path=... train.steps=200`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable
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
    check_intact,
    check_shape,
    load_checkpoint,
    load_model_weights,
    newest_intact_checkpoint,
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
    check_token_ids,
    eval_batches,
    most_frequent_token,
    open_training_data,
)
from pretrain.devices import describe_peak, peak_flops
from pretrain.distributed import (
    ParallelDims,
    all_reduce_sum,
    any_rank,
    max_over_world,
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
    flops_per_step,
)
from pretrain.objectives import LossOutput, pretraining_loss
from pretrain.optim import (
    build_param_groups,
    clip_grad_norm_,
    lr_at,
    optimizer_for_groups,
    set_lr,
    tensors_with_tp_norms,
)
from pretrain.parallel.comm_stats import CommCounter, analytic_bytes
from pretrain.parallel.parallelize import (
    apply_data_parallel,
    apply_tensor_parallel,
    shard_layout,
    tp_grad_norm_fn,
)
from pretrain.parallel.zero import ZeroRedundancy
from pretrain.precision import (
    DynamicLossScaler,
    autocast_context,
    dtype_summary,
    resolve_precision,
)
from pretrain.progress import RunClock, summary_line, write_summary
from pretrain.run_dir import check_owner, check_resume, claim_run_dir

# Exit code of a run stopped because it diverged (non-finite losses or gradients): it wrote a
# checkpoint of its last finite state. Distinct from EXIT_RESUBMIT, so job scripts do not retry.
EXIT_DIVERGED = 3


@dataclass
class TrainResult:
    exit_code: int
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    baseline_acc: float | None = None
    checkpoint: Path | None = None
    is_main: bool = True
    summary: dict[str, Any] = field(default_factory=dict)


def log(message: str) -> None:
    print(message, flush=True)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _find_resume(config: Config, dims: ParallelDims, say: Callable[[str], None]) -> Path | None:
    """The checkpoint to continue from (verified), after checking the directory's owner."""
    setting = config.train.resume
    path = None
    if setting == "auto":
        path = newest_intact_checkpoint(config.checkpoint_dir, dims, say)
    elif setting not in ("none", "start_over"):
        path = resolve_checkpoint(setting)
        check_intact(path, dims)
    check_owner(config.checkpoint_dir, path, dims, say)
    return path


def _init_weights_from(path_text: str, model: Bert, dims: ParallelDims | None = None) -> None:
    """Weights only, fresh schedule: our checkpoint, or a Hugging Face BERT directory."""
    path = Path(path_text)
    if (path / "config.json").is_file():
        from pretrain.export_hf import load_hf_weights

        load_hf_weights(path, model)
        return
    path = resolve_checkpoint(path)
    check_intact(path, dims)
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
    """Pre-train as configured; returns the exit code (0; 75 when stopped on request; 3,
    EXIT_DIVERGED, when stopped because the run diverged)."""
    kernels.set_enabled(config.kernels.enabled)  # false: PyTorch references everywhere (debug)
    env, dims, device = setup_parallel(config)
    memory = MemoryPlan()
    try:
        try:
            precision, why = resolve_precision(config.train.precision, device)
        except ValueError as error:
            raise ConfigError(f"train.precision={config.train.precision}: {error}") from None
        # From here on the resolved precision is the configuration: config.yaml, checkpoints
        # and every later decision see fp32|bf16|fp16, never auto.
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, precision=precision)
        )
        with claim_run_dir(config, dims, log if dims.is_main else _quiet):
            return _train(config, dims, env.describe(), device, why, memory)
    except torch.OutOfMemoryError:
        raise ConfigError(memory.oom_message()) from None
    finally:
        shutdown()


def _agreed_bad_step(flag: torch.Tensor, loss_is_finite: bool, dims: ParallelDims) -> torch.Tensor:
    """Every rank's verdict on a step: bad if any rank (tp or dp) saw a non-finite loss or
    gradient. An inf in one tp rank's weight-gradient shard is seen by that rank alone."""
    if not loss_is_finite:
        flag = flag + 1.0
    return max_over_world(flag, dims)


def _params_finite(model: nn.Module, dims: ParallelDims) -> bool:
    """Whether every parameter of every rank's shard is finite."""
    local_bad = any(not bool(torch.isfinite(p).all()) for p in model.parameters())
    return not any_rank(local_bad, dims)


def _train(
    config: Config,
    dims: ParallelDims,
    launch_line: str,
    device: torch.device,
    precision_reason: str,
    memory: MemoryPlan,
) -> TrainResult:
    started = time.perf_counter()
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
    resume_path = _find_resume(config, dims, say)
    data_paths = [str(Path(p).resolve()) for p in parse_blend_spec(config.data.path)[0]]
    if resume_path is None and config.train.init_from:
        _init_weights_from(config.train.init_from, model, dims)  # whole weights, before splitting
        say(f"initialised weights from {config.train.init_from}")
    try:
        apply_tensor_parallel(model, dims)
    except ValueError as error:
        raise ConfigError(f"parallel.tp={dims.tp_size}: {error}") from None
    model.to(device)
    sharding = shard_layout(model)
    groups = build_param_groups(model, config.optim.weight_decay)

    def build(share: list[dict[str, Any]]) -> torch.optim.Optimizer:
        o = config.optim
        return optimizer_for_groups(share, o.name, o.lr, o.betas, o.eps, dims.tp_group)

    optimizer = ZeroRedundancy(groups, build, dims) if config.parallel.zero else build(groups)
    t = config.train
    scaler = DynamicLossScaler(
        enabled=t.precision == "fp16",
        init_scale=t.loss_scale_init,
        growth_interval=t.loss_scale_window,
        min_scale=t.loss_scale_min,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm_fn = tp_grad_norm_fn(model, params, dims)

    step, consumed = 0, 0
    if resume_path is not None:
        stored = read_train_state(resume_path)
        check_shape(resume_path, stored.get("model_shape", {}), shape)
        check_resume(stored, resume_path, config, data.dataset.tokenizer_hash, data_paths, say)
        state = load_checkpoint(resume_path, model, optimizer, dims, sharding)
        step, consumed = state["step"], state["consumed_samples"]
        saved_precision = state.get("config", {}).get("train", {}).get("precision")
        if saved_precision in (None, t.precision):
            scaler.load_state_dict(state["scaler"])
        else:
            say(
                f"precision: the checkpoint was trained in {saved_precision}, this run uses "
                f"{t.precision} ({precision_reason}); the loss scaler starts afresh"
            )
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
    metrics = MetricsLog(
        out_dir,
        resume_step=step if resume_path else None,
        enabled=dims.is_main,
        wandb_project=config.train.wandb_project,
        run_config=config.to_dict(),
    )
    say(
        f"model: {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, "
        f"vocab {shape.vocab_size}, {shape.norm}-LN, {count_parameters(model):,} parameters; "
        f"{len(data.train):,} training samples of up to {config.data.seq_len} tokens; "
        f"dp {dims.dp_size} x tp {dims.tp_size}, device {device}, {config.train.precision}, "
        f"mlm {config.mlm.mode}, {accumulation} micro-batch(es) per step"
    )
    reduction = f"all-reduced over dp {dims.dp_size}" if dims.dp_size > 1 else "no dp all-reduce"
    say(f"{dtype_summary(t.precision, device.type, reduction)} ({precision_reason})")
    if scaler.enabled:
        say(
            f"loss scale: initial {scaler.scale:g}, doubles after {scaler.growth_interval} "
            f"clean steps, floor {scaler.min_scale:g}"
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
    for batch in held_out:
        check_token_ids(batch, data.dataset.vocab_size, config.data.path)
    result = TrainResult(exit_code=0, step=step, is_main=dims.is_main)
    peak = peak_flops(device, config.train.precision)
    say(describe_peak(device, config.train.precision, peak))
    clock = RunClock(
        total_steps=config.train.steps,
        eval_every=config.train.eval_every if held_out else None,
        checkpoint_every=config.checkpoint.every,
        peak_flops=peak,
        world_size=dims.world_size,
        started=started,
    )
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
            "data_paths": data_paths,
            "tokenizer_dir": str(data.tokenizer_dir.resolve()),
            "finite": _params_finite(model, dims),  # rotation never removes the newest finite one
        }

    def checkpoint() -> None:
        # dp replicas hold identical state: the tp ranks of the first replica write, in parallel.
        began = time.perf_counter()
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
        clock.add_checkpoint(time.perf_counter() - began)
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
            optimizer_tensors=tensors_with_tp_norms(optimizer),
            zero=bool(config.parallel.zero),
            autocast_bytes=4 if config.train.precision == "fp32" else 2,
        )
    counting = comm if comm is not None else nullcontext()
    interval = _Interval(comm)
    bad_steps = 0  # steps in a row with a non-finite loss or gradient (none of them applied)
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
                batch = next(batches)
                check_token_ids(batch, data.dataset.vocab_size, config.data.path)
                batch = _to_device(batch, device)
                last = micro == accumulation - 1
                sync = nullcontext() if last or dims.dp_size == 1 else loss_step.no_sync()
                with sync:
                    with autocast_context(config.train.precision, device.type):
                        out = loss_step(batch)
                    scaler.scale_loss(out.loss / accumulation).backward()
                step_loss += float(out.loss.detach()) / accumulation  # CPU-GPU sync point
                interval.add(out, int(batch["attention_mask"].sum()), batch["input_ids"].numel())
            # One flag for the whole world (a sync point): every rank skips the same steps.
            found_inf = scaler.unscale_and_check(
                params,
                reduce_found_inf=partial(
                    _agreed_bad_step, loss_is_finite=math.isfinite(step_loss), dims=dims
                ),
            )
            grad_norm = clip_grad_norm_(params, config.optim.clip_grad, norm_fn=grad_norm_fn)
            if not found_inf:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_scale = scaler.scale
        overflow_at_floor = found_inf and scaler.at_floor
        scaler.update(found_inf)
        bad_steps = bad_steps + 1 if found_inf else 0
        step += 1
        consumed += config.train.global_batch
        interval.end_step(step_loss, found_inf)

        if step % config.train.log_every == 0 or step == config.train.steps:
            record = interval.record(
                step, consumed, lr, float(grad_norm), loss_scale, shape, config, dims, clock
            )
            record.update(memory_record(device))
            metrics.write(record)
            result.history.append(record)
            say(format_line(record))
            interval = _Interval(comm)
        if held_out and (step % config.train.eval_every == 0 or step == config.train.steps):
            began = time.perf_counter()
            shard = held_out[dims.dp_rank :: dims.dp_size]
            record = {"split": "valid", "step": step, **evaluate(model, shard, config, dims)}
            clock.add_eval(time.perf_counter() - began)
            metrics.write(record)
            result.evals.append(record)
            say(format_line(record))
            interval.start = time.perf_counter()  # evaluation time is not training time
        diverged = _divergence(bad_steps, overflow_at_floor, config)
        if diverged is not None:
            checkpoint()
            held = (
                "holds the last finite state"
                if _params_finite(model, dims)
                else "has non-finite weights (an applied step overflowed them); rotation kept "
                "the newest finite checkpoint"
            )
            say(
                f"stopping at step {step} (exit code {EXIT_DIVERGED}): {diverged}; no such step "
                f"was applied, {result.checkpoint} {held}"
            )
            result.exit_code = EXIT_DIVERGED
            break
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
            interval.start = time.perf_counter()  # nor is checkpoint time
    metrics.close()
    result.step = step
    result.summary = clock.summary(step)
    if dims.is_main:
        write_summary(out_dir, result.summary)
    return result


def _divergence(bad_steps: int, overflow_at_floor: bool, config: Config) -> str | None:
    """Why the run must stop as diverged, or None. Every rank reaches the same verdict: both
    inputs come from the world-agreed skip flag."""
    t = config.train
    if overflow_at_floor:
        return (
            f"fp16 overflow with the loss scale at its floor train.loss_scale_min="
            f"{t.loss_scale_min:g} (lower optim.lr, or use bf16 on a GPU that has it)"
        )
    if bad_steps >= t.max_bad_steps:
        return (
            f"{bad_steps} steps in a row had a non-finite loss or gradient "
            f"(train.max_bad_steps={t.max_bad_steps}; lower optim.lr)"
        )
    return None


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
        clock: RunClock,
    ) -> dict[str, Any]:
        """The interval's record, with every sum reduced over the dp group; its time, tokens
        and FLOPs go to `clock`, which gives the MFU and the ETA."""
        elapsed = time.perf_counter() - self.start
        loss, masked_loss, correct, masked, tokens, scored, encoded = all_reduce_sum(
            [
                sum(self.losses),
                self.masked_loss,
                self.correct,
                self.masked,
                self.tokens,
                self.scored,
                self.encoded,
            ],
            dims,
        )
        seq_len = config.data.seq_len
        flops = flops_per_step(shape, seq_len, round(encoded) // seq_len, scored)
        steps = len(self.losses)
        clock.add_train(elapsed, steps, round(tokens), flops)
        record = {
            "step": step,
            "steps_total": config.train.steps,
            "consumed_samples": consumed,
            "loss": loss / len(self.losses) / dims.dp_size,
            "masked_loss": masked_loss / max(masked, 1.0),
            "mlm_acc": correct / max(masked, 1.0),
            "lr": lr,
            "grad_norm": grad_norm,
            "loss_scale": loss_scale,
            "tokens_per_s": tokens / elapsed,
            "tflops": flops / elapsed / dims.world_size / 1e12,  # per device
            "mfu": clock.mfu(flops, elapsed),
            "ms_per_step": elapsed * 1000 / steps,
            "elapsed_s": elapsed,
            "eta_s": clock.eta_s(step),
        }
        if self.comm is not None:
            moved = self.comm.bytes - self.comm_before
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
    if result.summary.get("steps"):
        log(f"summary: {summary_line(result.summary)}")
    if result.checkpoint is not None:
        log(f"summary: checkpoint {result.checkpoint}")


def main_train(config: Config) -> int:
    result = train(config)
    if result.is_main:
        print_summary(result)
    return result.exit_code
