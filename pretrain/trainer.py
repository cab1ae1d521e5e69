"""The training loop, top to bottom: data → model → loss → backward → clip → step → log/ckpt.

Run it with `bert-train --config configs/tiny.yaml data.path=... train.steps=200`.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kernels
from launch.signals import EXIT_RESUBMIT, StopRequest
from pretrain.checkpoint import (
    BackgroundWriter,
    CheckpointError,
    check_intact,
    check_shape,
    checkpoint_group,
    load_checkpoint,
    load_model_weights,
    newest_finite_checkpoint,
    newest_intact_checkpoint,
    read_train_state,
    resolve_checkpoint,
    take_snapshot,
    write_snapshot,
)
from pretrain.config import (
    Config,
    ConfigError,
    ModelShape,
    check_batch_layout,
    resolve_model_shape,
    save_config,
)
from pretrain.cpu_memory import keep_freed_memory
from pretrain.data import (
    EVAL_MLM,
    StreamBatches,
    TrainingData,
    build_loader,
    check_token_ids,
    eval_batches,
    most_frequent_token,
    open_training_data,
)
from pretrain.devices import configure_tf32, describe_peak, peak_flops
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
    REDUCE_DTYPES,
    parallelize_bert,
    resolve_grad_reduce_dtype,
    shard_layout,
    tp_grad_norm_fn,
    tp_sharded_names,
)
from pretrain.parallel.zero import ZeroRedundancy
from pretrain.plan import StartupPrediction, startup_prediction
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
# Log intervals after start-up that are printed next to bert-plan's prediction (the first one
# includes warm-up, so two).
COMPARED = 2


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


def train(config: Config) -> TrainResult:
    """Pre-train as configured; returns the exit code (0; 75 when stopped on request; 3,
    EXIT_DIVERGED, when stopped because the run diverged)."""
    kernels.set_enabled(config.kernels.enabled)  # false: PyTorch references everywhere (debug)
    env, dims, device = setup_parallel(config)
    configure_tf32(device, config.train.allow_tf32)  # before any matrix product
    if device.type == "cpu":
        keep_freed_memory()  # each step reuses the last one's memory: no page faults
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
        p = config.parallel
        try:
            reduce_dtype = resolve_grad_reduce_dtype(p.grad_reduce_dtype, precision)
        except ValueError as error:
            raise ConfigError(
                f"parallel.grad_reduce_dtype={p.grad_reduce_dtype}: {error}"
            ) from None
        config = dataclasses.replace(
            config, parallel=dataclasses.replace(p, grad_reduce_dtype=reduce_dtype)
        )
        with claim_run_dir(config, dims, log if dims.is_main else _quiet):
            return _train(config, dims, env.describe(), device, why, memory)
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from torch 2.5; 2.4 has this
        raise ConfigError(memory.oom_message()) from None
    finally:
        shutdown()


def _agreed_bad_step(
    flag: torch.Tensor, loss_is_bad: torch.Tensor, dims: ParallelDims
) -> torch.Tensor:
    """Every rank's verdict on a step: bad if any rank (tp or dp) saw a non-finite loss or
    gradient. An inf in one tp rank's weight-gradient shard is seen by that rank alone."""
    return max_over_world(flag + loss_is_bad.to(flag), dims)


def _params_finite(model: nn.Module, dims: ParallelDims) -> bool:
    """Whether every parameter of every rank's shard is finite."""
    local_bad = any(not bool(torch.isfinite(p).all()) for p in model.parameters())
    return not any_rank(local_bad, dims)


@dataclass
class _Run:
    """Everything the training loop works with, built once by `_build`."""

    config: Config
    dims: ParallelDims
    shape: ModelShape
    data: TrainingData
    data_paths: list[str]
    model: Bert  # this rank's shard, on its device
    loss_step: nn.Module  # model + objective, under DDP when dp > 1 without ZeRO-1
    optimizer: torch.optim.Optimizer
    scaler: DynamicLossScaler
    params: list[nn.Parameter]
    grad_norm_fn: Callable[[torch.Tensor], torch.Tensor] | None
    sharding: dict[str, dict[str, int]]
    accumulation: int  # micro-batches per optimizer step
    step: int
    consumed: int
    say: Callable[[str], None]
    metrics: MetricsLog | None = None
    clock: RunClock | None = None
    batches: Any = None  # iterator over this rank's training micro-batches
    held_out: list[dict[str, torch.Tensor]] = field(default_factory=list)
    comm: CommCounter | None = None
    result: TrainResult | None = None
    save_group: Any = None  # the checkpoint group (checkpoint.timeout_s); None for one process
    writer: BackgroundWriter = field(default_factory=BackgroundWriter)
    prediction: StartupPrediction | None = None  # bert-plan's, for the first intervals


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
    try:
        run = _build(config, dims, precision_reason, memory, say)
        _start_logging(run, precision_reason, started)
        return _loop(run, stop)
    finally:
        stop.uninstall()


def _build(
    config: Config,
    dims: ParallelDims,
    precision_reason: str,
    memory: MemoryPlan,
    say: Callable[[str], None],
) -> _Run:
    """Data, model (parallelized), optimizer and loss scaler, resumed from a checkpoint if any."""
    accumulation = check_batch_layout(config, dims.dp_size)
    torch.manual_seed(config.train.seed)
    data = _open_data(config, dims, say)
    shape = resolve_model_shape(config, data.dataset.vocab_size)
    if shape.vocab_size < data.dataset.vocab_size:
        raise ConfigError(
            f"model.vocab_size={shape.vocab_size} is smaller than the tokenizer's "
            f"{data.dataset.vocab_size}: unset model.vocab_size"
        )
    layout = layout_for(config, dims.dp_size, dims.device.type, accumulation)
    memory.estimate_for(shape, layout)
    say(memory.describe(dims.device))
    if not config.train.skip_memory_check:
        memory.check(dims.device)
    # Built whole on the host and moved once split: a tp rank's GPU then never holds the full
    # model (3.9B in fp32 is 15.6 GB, about all of a 16 GB V100), and every device starts from
    # the same weights.
    model = build_model(shape, "cpu")
    resume_path = _find_resume(config, dims, say)
    data_paths = [str(Path(source.path).resolve()) for source in data.sources]
    if resume_path is None and config.train.init_from:
        _init_weights_from(config.train.init_from, model, dims)  # whole weights, before splitting
        say(f"initialised weights from {config.train.init_from}")
    loss_step = parallelize_bert(model, dims, config)
    groups = build_param_groups(model, config.optim.weight_decay)

    def build(share: list[dict[str, Any]]) -> torch.optim.Optimizer:
        o = config.optim
        return optimizer_for_groups(share, o.name, o.lr, o.betas, o.eps, dims.tp_group)

    t = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    if config.parallel.zero:
        reduce_dtype = REDUCE_DTYPES[config.parallel.grad_reduce_dtype]
        optimizer = ZeroRedundancy(params, groups, build, dims, reduce_dtype)
        sharded = {id(p) for n, p in model.named_parameters() if n in tp_sharded_names(model)}
        grad_norm_fn = optimizer.grad_norm_fn(sharded)
    else:
        optimizer, grad_norm_fn = build(groups), tp_grad_norm_fn(model, params, dims)
    run = _Run(
        config=config,
        dims=dims,
        shape=shape,
        data=data,
        data_paths=data_paths,
        model=model,
        loss_step=loss_step,
        optimizer=optimizer,
        scaler=DynamicLossScaler(
            enabled=t.precision == "fp16",
            init_scale=t.loss_scale_init,
            growth_interval=t.loss_scale_window,
            min_scale=t.loss_scale_min,
        ),
        params=params,
        grad_norm_fn=grad_norm_fn,
        sharding=shard_layout(model),
        accumulation=accumulation,
        step=0,
        consumed=0,
        say=say,
    )
    run.save_group = checkpoint_group(dims, config.checkpoint.timeout_s)
    if resume_path is not None:
        _resume(run, resume_path, precision_reason)
    run.result = TrainResult(exit_code=0, step=run.step, is_main=dims.is_main)
    return run


def _open_data(config: Config, dims: ParallelDims, say: Callable[[str], None]) -> TrainingData:
    """The training data, its sample index cached in OUT_DIR/sample_index: the main rank builds
    (or checks) the cache first, then the other ranks memory-map what it wrote."""
    d, cache = config.data, Path(config.train.out_dir) / "sample_index"
    open_data = partial(
        open_training_data,
        d.sources,
        d.tokenizer,
        d.seq_len,
        d.valid_fraction,
        config.mlm,
        config.train.seed,
        cache_dir=cache,
        say=say,
    )
    data, error = None, None
    if dims.is_main:
        try:
            data = open_data()
        except Exception as caught:  # re-raised below, once the other ranks know
            error = caught
    if any_rank(error is not None, dims):
        if error is not None:
            raise error
        raise ConfigError("data.path: the main rank could not open the data (see its error)")
    return data if data is not None else open_data()


def _resume(run: _Run, path: Path, precision_reason: str) -> None:
    """Continue from checkpoint `path`: weights, optimizer, scaler, step and data position."""
    config, t = run.config, run.config.train
    stored = read_train_state(path)
    check_shape(path, stored.get("model_shape", {}), run.shape)
    check_resume(stored, path, config, run.data.dataset.tokenizer_hash, run.data_paths, run.say)
    state, bytes_read = load_checkpoint(path, run.model, run.optimizer, run.dims, run.sharding)
    run.step, run.consumed = state["step"], state["consumed_samples"]
    saved_precision = state.get("config", {}).get("train", {}).get("precision")
    if saved_precision in (None, t.precision):
        run.scaler.load_state_dict(state["scaler"])
    else:
        run.say(
            f"precision: the checkpoint was trained in {saved_precision}, this run uses "
            f"{t.precision} ({precision_reason}); the loss scaler starts afresh"
        )
    saved = state.get("layout", {})
    run.say(
        f"resumed from {path} at step {run.step} ({run.consumed} samples consumed; saved at "
        f"tp {saved.get('tp', 1)} x dp {saved.get('dp', 1)}; rank 0 read "
        f"{bytes_read / 1e6:.1f} MB of tensors)"
    )


def _start_logging(run: _Run, precision_reason: str, started: float) -> None:
    """config.yaml, metrics.jsonl, the start-up lines, the data streams and the run clock."""
    config, dims, shape, say = run.config, run.dims, run.shape, run.say
    t, device = config.train, dims.device
    out_dir = Path(t.out_dir)
    if dims.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
        say("resolved config:\n" + (out_dir / "config.yaml").read_text(encoding="utf-8").rstrip())
    run.metrics = MetricsLog(
        out_dir,
        resume_step=run.step if run.step else None,
        enabled=dims.is_main,
        wandb_project=t.wandb_project,
        run_config=config.to_dict(),
    )
    say(
        f"model: {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, "
        f"vocab {shape.vocab_size}, {shape.norm}-LN, {count_parameters(run.model):,} parameters; "
        f"{len(run.data.train):,} training samples of up to {config.data.seq_len} tokens; "
        f"dp {dims.dp_size} x tp {dims.tp_size}, device {device}, {t.precision}, "
        f"mlm {config.mlm.mode}, {run.accumulation} micro-batch(es) per step"
    )
    parallel = config.parallel
    dtypes = dtype_summary(
        t.precision, device.type, dims.dp_size, bool(parallel.zero), parallel.grad_reduce_dtype
    )
    say(f"{dtypes} ({precision_reason})")
    scaler = run.scaler
    if scaler.enabled:
        say(
            f"loss scale: initial {scaler.scale:g}, doubles after {scaler.growth_interval} "
            f"clean steps, floor {scaler.min_scale:g}"
        )
    sampler = StreamBatches(run.consumed, t.global_batch, t.micro_batch, dims.dp_rank, dims.dp_size)
    run.batches = iter(build_loader(run.data.train, sampler, config.data.workers))
    if run.data.valid is not None:
        run.held_out = eval_batches(run.data.valid, t.micro_batch, t.eval_batches)
    elif config.data.valid_fraction > 0:
        say(
            f"warning: data.valid_fraction={config.data.valid_fraction:g} holds out no sample "
            "(too few documents to split a valid set off): this run has no evaluation"
        )
    for batch in run.held_out:
        check_token_ids(batch, run.data.dataset.vocab_size, config.data.path)
    peak = peak_flops(device, t.precision)
    say(describe_peak(device, t.precision, peak))
    layout = layout_for(config, dims.dp_size, device.type, run.accumulation)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    run.prediction = startup_prediction(config, shape, layout, name)
    say(run.prediction.line)
    run.clock = RunClock(
        total_steps=t.steps,
        eval_every=t.eval_every if run.held_out else None,
        checkpoint_every=config.checkpoint.every,
        peak_flops=peak,
        world_size=dims.world_size,
        started=started,
    )
    if run.held_out:
        frequent = most_frequent_token(run.data.dataset)
        run.result.baseline_acc = baseline_accuracy(run.held_out, frequent)
    if t.comm_stats:  # the collectives of each training step, not of logging or evaluation
        run.comm = CommCounter({"tp": dims.tp_group, "dp": dims.dp_group})
        run.comm.minimum = partial(
            analytic_bytes,
            shape,
            tp=dims.tp_size,
            dp=dims.dp_size,
            local_params=sum(p.numel() for p in run.params),
            optimizer_tensors=tensors_with_tp_norms(run.optimizer),
            zero=bool(config.parallel.zero),
            reduce_bytes=REDUCE_DTYPES[config.parallel.grad_reduce_dtype].itemsize,
            autocast_bytes=4 if t.precision == "fp32" else 2,
        )


def _loop(run: _Run, stop: StopRequest) -> TrainResult:
    """The schedule, logging, evaluation, checkpoints, the divergence stop and stop signals."""
    config, dims, result = run.config, run.dims, run.result
    t = config.train
    interval = _Interval(run.comm, dims.device)
    bad_steps = 0  # steps in a row with a non-finite loss or gradient (none of them applied)
    run.loss_step.train()
    while run.step < t.steps:
        o = config.optim
        schedule = {"warmup_steps": o.warmup_steps, "decay": o.decay, "power": o.power}
        lr = lr_at(
            run.step, base_lr=o.lr, total_steps=t.steps, **schedule, min_lr_ratio=o.min_lr_ratio
        )
        set_lr(run.optimizer, lr)
        with run.comm if run.comm is not None else nullcontext():
            found_inf, grad_norm = _train_step(run, interval)
        overflow_at_floor = found_inf and run.scaler.at_floor
        loss_scale = run.scaler.scale
        run.scaler.update(found_inf)
        bad_steps = bad_steps + 1 if found_inf else 0
        run.step += 1
        run.consumed += t.global_batch
        last = run.step == t.steps

        if run.step % t.log_every == 0 or last:
            record = interval.record(run, lr, float(grad_norm), loss_scale)
            record.update(memory_record(dims.device))
            _write(run, record, result.history)
            interval = _Interval(run.comm, dims.device)
        if run.held_out and (run.step % t.eval_every == 0 or last):
            _evaluate_held_out(run)
            interval.start = time.perf_counter()  # evaluation time is not training time
        exit_code = _stop_early(run, stop, _divergence(bad_steps, overflow_at_floor, config), last)
        if exit_code is not None:
            result.exit_code = exit_code
            break
        if run.step % config.checkpoint.every == 0 or last:
            _save(run, final=last)
            interval.start = time.perf_counter()  # nor is checkpoint time
    run.metrics.close()
    result.step = run.step
    result.summary = run.clock.summary(run.step)
    if dims.is_main:
        write_summary(Path(t.out_dir), result.summary)
    return result


def _evaluate_held_out(run: _Run) -> None:
    """Score this dp rank's share of the held-out batches; the time is kept apart from training."""
    began = time.perf_counter()
    shard = run.held_out[run.dims.dp_rank :: run.dims.dp_size]
    scores = evaluate(run.model, shard, run.config, run.dims)
    run.clock.add_eval(time.perf_counter() - began)
    _write(run, {"split": "valid", "step": run.step, **scores}, run.result.evals)


def _stop_early(run: _Run, stop: StopRequest, diverged: str | None, last: bool) -> int | None:
    """Save and return the exit code when the run diverged or any rank was asked to stop."""
    if diverged is not None:
        _save(run)
        if _params_finite(run.model, run.dims):
            held = "holds the last finite state"
        else:  # `latest` names non-finite weights: say where the finite ones are
            finite = newest_finite_checkpoint(run.config.checkpoint_dir)
            held = "has non-finite weights (an applied step overflowed them); " + (
                f"resume from the newest finite one with train.resume={finite}"
                if finite is not None
                else "no finite checkpoint is left"
            )
        run.say(
            f"stopping at step {run.step} (exit code {EXIT_DIVERGED}): {diverged}; no such "
            f"step was applied, {run.result.checkpoint} {held}"
        )
        return EXIT_DIVERGED
    reason = stop.reason()
    if any_rank(reason is not None, run.dims) and not last:
        _save(run)
        run.say(
            f"stopping at step {run.step}: {reason or 'another rank was asked to stop'}; "
            "resubmit with train.resume=auto to continue"
        )
        return EXIT_RESUBMIT
    return None


def _train_step(run: _Run, interval: _Interval) -> tuple[bool, torch.Tensor]:
    """One optimizer step: the micro-batches' forward and backward (gradients averaged over dp
    on the last one), unscale and check, clip, update unless some rank saw a non-finite value.
    Returns (skipped, gradient norm)."""
    dims, accumulation, scaler = run.dims, run.accumulation, run.scaler
    step_loss = torch.zeros((), dtype=torch.float64, device=dims.device)
    for micro in range(accumulation):
        batch = next(run.batches)
        check_token_ids(batch, run.data.dataset.vocab_size, run.config.data.path)
        tokens = int(batch["attention_mask"].sum())  # on the host: no device sync
        batch = _to_device(batch, dims.device)
        last = micro == accumulation - 1
        sync = nullcontext() if last or dims.dp_size == 1 else _no_sync(run)
        with sync:
            with autocast_context(run.config.train.precision, dims.device.type):
                out = run.loss_step(batch)
            scaler.scale_loss(out.loss / accumulation).backward()
        step_loss += out.loss.detach().double() / accumulation
        interval.add(out, tokens, batch["input_ids"].numel())
    if isinstance(run.optimizer, ZeroRedundancy):
        run.optimizer.finish_gradient_reduction()
    # One flag for the whole world (the step's one sync point): every rank skips the same steps.
    found_inf = scaler.unscale_and_check(
        run.params,
        reduce_found_inf=partial(
            _agreed_bad_step, loss_is_bad=~torch.isfinite(step_loss), dims=dims
        ),
    )
    grad_norm = clip_grad_norm_(run.params, run.config.optim.clip_grad, norm_fn=run.grad_norm_fn)
    if not found_inf:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    interval.end_step(step_loss, found_inf)
    return found_inf, grad_norm


def _no_sync(run: _Run) -> AbstractContextManager[Any]:
    """Gradient accumulation: this micro-batch's gradients stay local (DDP or ZeRO-1)."""
    if isinstance(run.optimizer, ZeroRedundancy):
        return run.optimizer.no_sync()
    return run.loss_step.no_sync()


def _write(run: _Run, record: dict[str, Any], kept: list[dict[str, Any]]) -> None:
    run.metrics.write(record)
    kept.append(record)
    run.say(format_line(record))
    if run.prediction is not None and kept is run.result.history and len(kept) <= COMPARED:
        comparison = run.prediction.compare(record)
        if comparison is not None:
            run.say(comparison)


def _save(run: _Run, final: bool = True) -> None:
    """Checkpoint the current state. Several ranks write at once (pretrain.checkpoint); with
    checkpoint.async_save a periodic save is written by a background thread from a host copy
    while training goes on. A periodic save that fails is reported and training goes on
    (unless checkpoint.fail_on_error); the final one (end, stop request, divergence) is waited
    for and its failure ends the run."""
    began, dims = time.perf_counter(), run.dims
    state = {
        "consumed_samples": run.consumed,
        "scaler": run.scaler.state_dict(),
        "config": run.config.to_dict(),
        "model_shape": asdict(run.shape),
        "layout": {"tp": dims.tp_size, "dp": dims.dp_size, "world_size": dims.world_size},
        "tokenizer_hash": run.data.dataset.tokenizer_hash,
        "data_paths": run.data_paths,
        "tokenizer_dir": str(run.data.tokenizer_dir.resolve()),
        "finite": _params_finite(run.model, run.dims),  # rotation keeps the newest finite one
    }
    checkpoint = run.config.checkpoint
    background = checkpoint.async_save and not final
    snapshot = take_snapshot(
        run.step, run.model, run.optimizer, state, dims, run.sharding, copy=background
    )
    _report_save(run, run.writer.wait(), final=False)  # the previous background save
    write = partial(
        write_snapshot, run.config.checkpoint_dir, snapshot, checkpoint.keep, dims, run.save_group
    )
    if background:
        run.writer.start(write)
    else:
        try:
            outcome = (write(), None)
        except (OSError, CheckpointError, torch.distributed.DistError) as error:
            outcome = (None, error)
        _report_save(run, outcome, final)
    run.clock.add_checkpoint(time.perf_counter() - began)  # the time training was held up


def _report_save(
    run: _Run, outcome: tuple[Path | None, Exception | None] | None, final: bool
) -> None:
    """Say where a checkpoint went, or why it did not (raising when that must end the run)."""
    if outcome is None:
        return
    path, error = outcome
    if error is None:
        run.say(f"checkpoint written: {path}")
        run.result.checkpoint = path
        return
    tolerated = (OSError, CheckpointError, torch.distributed.DistError)
    if final or run.config.checkpoint.fail_on_error or not isinstance(error, tolerated):
        raise error
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    run.say(
        f"warning: a checkpoint was not written ({reason}); `latest` still names "
        f"{run.result.checkpoint or 'no checkpoint'}; training goes on "
        "(checkpoint.fail_on_error=true ends the run instead)"
    )


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
    """Accumulates one logging interval's statistics. The sums stay on the device; `record`
    brings them to the host once per interval."""

    def __init__(self, comm: CommCounter | None, device: torch.device) -> None:
        self.start = time.perf_counter()
        self.comm = comm
        self.comm_before = Counter(comm.bytes) if comm is not None else Counter()
        self.calls_before = Counter(comm.calls) if comm is not None else Counter()
        # loss sum, masked loss sum, correct, masked count (float64, on the device)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.steps = 0
        self.tokens = 0
        self.scored = 0
        self.encoded = 0
        self.skipped = False

    def add(self, out: LossOutput, tokens: int, encoded: int) -> None:
        self.sums[1:] += torch.stack(
            [out.masked_loss_sum.double(), out.masked_correct.double(), out.masked_count.double()]
        )
        self.tokens += tokens
        self.scored += out.scored_count
        self.encoded += encoded

    def end_step(self, loss: torch.Tensor, skipped: bool) -> None:
        self.sums[0] += loss
        self.steps += 1
        self.skipped = self.skipped or skipped

    def record(self, run: _Run, lr: float, grad_norm: float, loss_scale: float) -> dict[str, Any]:
        """The interval's record, with every sum reduced over the dp group; its time, tokens
        and FLOPs go to the run clock, which gives the MFU and the ETA."""
        config, dims, step = run.config, run.dims, run.step
        elapsed = time.perf_counter() - self.start
        device_sums = self.sums.tolist()  # the interval's one device-to-host copy
        loss, masked_loss, correct, masked, tokens, scored, encoded = all_reduce_sum(
            [*device_sums, self.tokens, self.scored, self.encoded], dims
        )
        seq_len = config.data.seq_len
        flops = flops_per_step(run.shape, seq_len, round(encoded) // seq_len, scored)
        steps = self.steps
        run.clock.add_train(elapsed, steps, round(tokens), flops)
        record = {
            "step": step,
            "steps_total": config.train.steps,
            "consumed_samples": run.consumed,
            "loss": loss / steps / dims.dp_size,
            "masked_loss": masked_loss / max(masked, 1.0),
            "mlm_acc": correct / max(masked, 1.0),
            "lr": lr,
            "grad_norm": grad_norm,
            "loss_scale": loss_scale,
            "tokens_per_s": tokens / elapsed,
            "tflops": flops / elapsed / dims.world_size / 1e12,  # per device
            "mfu": run.clock.mfu(flops, elapsed),
            "ms_per_step": elapsed * 1000 / steps,
            "elapsed_s": elapsed,
            "eta_s": run.clock.eta_s(step),
        }
        if self.comm is not None:
            moved = self.comm.bytes - self.comm_before
            record["comm_bytes"] = {k: v // steps for k, v in sorted(moved.items())}
            minimum = self.comm.minimum(encoded=self.encoded, scored=self.scored)
            record["comm_bytes_min"] = {k: v // steps for k, v in sorted(minimum.items())}
            calls = self.comm.calls - self.calls_before
            record["comm_calls"] = {k: v // steps for k, v in sorted(calls.items())}
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
