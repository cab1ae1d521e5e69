"""`bert-train --selftest`: the first job to run on a new node (or on a laptop CPU).

    bert-train --selftest

One PASS/FAIL line per check, exit code 0 only if every check passes:
- precision: what `train.precision: auto` picks on this device, and that autocast in it gives
  a matrix product close to fp32;
- kernels: each op of `kernels` through its dispatch (the Triton kernel where kernels.dispatch
  selects one on this node, else the PyTorch reference) against its reference, forward and
  backward (the MLM head against full fp32 logits), in fp32 and in the chosen precision;
- all-reduce: 2 processes on the backend training would use (NCCL on 2 GPUs, else gloo on the
  CPU) sum a tensor;
- tp 1 vs tp 2: a few LAMB steps of a tiny BERT in the chosen precision (and in fp16, the
  loss-scaled path, when that is not the choice) give the same losses in 1 and in 2 processes.
"""

from __future__ import annotations

import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kernels
from kernels import dispatch
from kernels.bias_gelu import bias_gelu_reference
from kernels.lamb import lamb_step_reference
from kernels.layer_norm import layer_norm_reference
from pretrain.config import MLMConfig, ModelShape
from pretrain.distributed import ParallelDims, build_dims, max_over_world
from pretrain.masking import IGNORE
from pretrain.model import build_model
from pretrain.objectives import pretraining_loss
from pretrain.optim import build_param_groups, clip_grad_norm_, optimizer_for_groups
from pretrain.parallel.parallelize import apply_tensor_parallel, tp_grad_norm_fn
from pretrain.precision import (
    DynamicLossScaler,
    Precision,
    autocast_context,
    resolve_precision,
)

STEPS = 4
TIMEOUT_S = 120.0
# Relative tolerance on the losses of tp 1 vs tp 2: the split changes the order of sums, so
# results agree to a few roundings of the autocast dtype (bf16 keeps 8 mantissa bits, fp16 11).
LOSS_RTOL: dict[str, float] = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}
# The tiny model: odd vocabulary (padded per tp rank), 2 heads split over 2 ranks.
SHAPE = ModelShape(
    layers=2,
    hidden=32,
    heads=2,
    ffn_hidden=64,
    vocab_size=131,
    max_seq_len=16,
    norm="post",
    dropout=0.0,
    pair_head=False,
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"selftest {'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def check_precision(device: torch.device) -> tuple[Check, Precision]:
    """What auto picks here, and that a matmul under it is close to fp32."""
    precision, why = resolve_precision("auto", device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=gen).to(device)
    b = torch.randn(64, 64, generator=gen).to(device)
    with autocast_context(precision, device.type):
        low = a @ b
    error = float((low.float() - a @ b).norm() / (a @ b).norm())
    ok = error < {"fp32": 1e-6, "fp16": 1e-2, "bf16": 3e-2}[precision]
    detail = f"auto picks {precision} on {device} ({why}); matmul relative error {error:.1e}"
    return Check("precision", ok, detail), precision


# Largest relative (Frobenius) error of a kernel against its reference, by the dtype of the
# inputs: fp32 summation-order noise, or a few roundings of the half dtype (the Triton kernels
# compute in fp32 and round once, the references may round after every op; the MLM head rounds
# its logits to the half dtype, see kernels/cross_entropy.py, about 2 roundings measured).
KERNEL_RTOL: dict[str, float] = {"fp32": 1e-5, "bf16": 6 * 2.0**-8, "fp16": 6 * 2.0**-11}
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _compare(
    name: str, path: str, pairs: list[tuple[torch.Tensor, torch.Tensor]], oracle: str, dtype: str
) -> Check:
    """One check: every (got, want) pair within KERNEL_RTOL[dtype] relative error."""
    error = max(
        float(
            (got.detach().float() - want.detach().float()).norm()
            / want.detach().float().norm().clamp_min(1e-30)
        )
        for got, want in pairs
    )
    tolerance = KERNEL_RTOL[dtype]
    label = f"kernel {name}" if dtype == "fp32" else f"kernel {name} ({dtype})"
    detail = (
        f"{path} path vs {oracle}, largest relative error {error:.1e} (tolerance {tolerance:.0e})"
    )
    return Check(label, error <= tolerance, detail)


def _grads_of(
    fn: Callable[..., tuple[torch.Tensor, ...]], inputs: list[torch.Tensor], seed: int
) -> list[torch.Tensor]:
    """Outputs of fn(*inputs) and the grads of sum(output * fixed random weights) w.r.t. every
    input: forward and backward in one list, to compare a kernel with its reference."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    total = sum(
        (o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outputs
    )
    total.backward()
    return [o.detach() for o in outputs] + [t.grad for t in leaves]


def check_kernels(device: torch.device, precision: Precision = "fp32") -> list[Check]:
    """Each op through `kernels`' dispatch (the Triton kernel where kernels.dispatch selects one
    on this node, else the PyTorch reference) against its reference, forward and backward: in
    fp32, and in the run's precision when that is bf16 or fp16."""
    checks = _kernel_checks(device, "fp32")
    if precision != "fp32":
        checks += _kernel_checks(device, precision)
    return checks


def _kernel_checks(device: torch.device, dtype_name: str) -> list[Check]:
    gen = torch.Generator().manual_seed(0)
    dtype = HALF_DTYPES.get(dtype_name, torch.float32)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    x, residual, w, b = randn(48, 96).to(dtype), randn(48, 96).to(dtype), randn(96), randn(96)
    path = "triton" if dispatch.use_triton(x) else "reference"

    def fused_norm(kernel: Callable[..., Any]) -> Callable[..., tuple[torch.Tensor, ...]]:
        return lambda x, r, w, b: kernel(x, w, b, 1e-12, residual=r, return_sum=True)

    checks = [
        _compare(
            "layer_norm",
            path,
            list(
                zip(
                    _grads_of(fused_norm(kernels.layer_norm), [x, residual, w, b], 1),
                    _grads_of(fused_norm(layer_norm_reference), [x, residual, w, b], 1),
                    strict=True,
                )
            ),
            "layer_norm_reference (residual add, sum returned; outputs and grads)",
            dtype_name,
        ),
        _compare(
            "bias_gelu",
            path,
            list(
                zip(
                    _grads_of(lambda x, b: (kernels.bias_gelu(x, b),), [x, b], 2),
                    _grads_of(lambda x, b: (bias_gelu_reference(x, b),), [x, b], 2),
                    strict=True,
                )
            ),
            "bias_gelu_reference (output and grads)",
            dtype_name,
        ),
    ]
    weight, bias = randn(131, 96, scale=0.1), randn(131)
    target = torch.randint(0, 131, (48,), generator=gen).to(device)
    target[::7] = IGNORE
    hidden = x.float().clone().requires_grad_()
    with autocast_context(dtype_name, device.type):  # type: ignore[arg-type]
        loss = kernels.linear_cross_entropy(hidden, weight, target, bias=bias)
    loss.backward()
    full = x.float().clone().requires_grad_()
    want = F.cross_entropy(full @ weight.T + bias, target, ignore_index=IGNORE)
    want.backward()
    autocast = "" if dtype_name == "fp32" else f" under {dtype_name} autocast"
    checks.append(
        _compare(
            "linear_cross_entropy",
            path,
            [(loss, want), (hidden.grad, full.grad)],
            f"fp32 full logits + F.cross_entropy (loss and input grad){autocast}",
            dtype_name,
        )
    )
    if dtype_name != "fp32":
        return checks  # LAMB runs on the fp32 master weights only
    params = [randn(96, 96), randn(96)]
    grads = [randn(96, 96, scale=0.01), randn(96, scale=0.01)]
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    ours = [p.clone() for p in params]
    ref = [p.clone() for p in params]
    options: dict[str, Any] = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01}
    kernels.lamb_step(
        ours, grads, *[[s.clone() for s in st] for st in states], [1.0, 1.0], **options
    )
    lamb_step_reference(ref, grads, *states, [1.0, 1.0], **options)
    checks.append(
        _compare(
            "lamb_step", path, list(zip(ours, ref, strict=True)), "lamb_step_reference", "fp32"
        )
    )
    return checks


def _batch(device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed sparse-MLM batch: 4 sequences of 16 tokens, every 4th position scored."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, SHAPE.vocab_size, (4, 16), generator=gen)
    picked = torch.zeros(4, 16, dtype=torch.bool)
    picked[:, ::4] = True
    batch = {
        "input_ids": ids,
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": torch.ones_like(ids),
        "labels": torch.where(picked, ids, IGNORE),
        "picked": picked,
    }
    return {k: v.to(device) for k, v in batch.items()}


def tiny_training_losses(precision: Precision, dims: ParallelDims) -> list[float]:
    """STEPS LAMB steps of the tiny BERT on a fixed batch, as the trainer takes them (autocast,
    loss scaling in fp16, world-agreed skip, clipping over the tp group)."""
    torch.manual_seed(0)
    model = build_model(SHAPE, "cpu")  # whole on the host, split, then moved: as the trainer
    apply_tensor_parallel(model, dims)
    model.to(dims.device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = build_param_groups(model, 0.01)
    optimizer = optimizer_for_groups(groups, "lamb", 1e-2, tp_group=dims.tp_group)
    scaler = DynamicLossScaler(enabled=precision == "fp16", init_scale=2.0**10)
    norm_fn = tp_grad_norm_fn(model, params, dims)
    batch = _batch(dims.device)
    losses = []
    for _ in range(STEPS):
        with autocast_context(precision, dims.device.type):
            out = pretraining_loss(model, batch, MLMConfig(mode="sparse"), dims.tp_group)
        scaler.scale_loss(out.loss).backward()
        found = scaler.unscale_and_check(params, lambda flag: max_over_world(flag, dims))
        clip_grad_norm_(params, 1.0, norm_fn=norm_fn)
        if not found:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scaler.update(found)
        losses.append(float(out.loss.detach()))
    return losses


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, backend: str, precisions: list[str], queue: Any) -> None:
    """One of the 2 processes: the all-reduce, then the tiny model at tp 2."""
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(1)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=2,
            timeout=timedelta(seconds=TIMEOUT_S),
        )
        summed = torch.full((1000,), float(rank + 1), device=device)
        dist.all_reduce(summed)
        reduced_ok = bool((summed == 3.0).all())
        dims = build_dims(2, rank, 2, device, TIMEOUT_S)
        losses = {p: tiny_training_losses(p, dims) for p in precisions}  # type: ignore[arg-type]
        queue.put((rank, reduced_ok, losses, None))
    except Exception:  # noqa: BLE001 - reported as a FAIL line by the parent
        queue.put((rank, False, {}, traceback.format_exc().strip().splitlines()[-1]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_two_processes(device: torch.device, precision: Precision) -> list[Check]:
    """The all-reduce and tp 1 vs tp 2, in 2 spawned processes."""
    nccl = device.type == "cuda" and torch.cuda.device_count() >= 2
    backend = "nccl" if nccl else "gloo"
    where = "2 GPUs" if nccl else "2 CPU processes"
    precisions: list[str] = list(dict.fromkeys([precision, "fp16"]))
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    procs = [
        context.Process(target=_worker, args=(rank, port, backend, precisions, queue))
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, tuple] = {}
    try:
        for _ in procs:
            rank, *rest = queue.get(timeout=3 * TIMEOUT_S)
            results[rank] = tuple(rest)
    except Exception:  # noqa: BLE001 - a dead or hung worker is a failed check
        pass
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    errors = [r[2] for r in results.values() if r[2]]
    if len(results) < 2 or errors:
        reason = errors[0] if errors else "a process died or hung"
        return [Check(f"all-reduce ({backend}, {where})", False, reason)]
    checks = [
        Check(
            f"all-reduce ({backend}, {where})",
            all(r[0] for r in results.values()),
            "sum of 1 and 2 over 2 ranks is 3 everywhere",
        )
    ]
    reference_device = torch.device("cuda", 0) if nccl else torch.device("cpu")
    single = build_dims(1, 0, 1, reference_device)
    for p in precisions:
        want = torch.tensor(tiny_training_losses(p, single))  # type: ignore[arg-type]
        worst = max(
            float(((torch.tensor(r[1][p]) - want).abs() / want.abs()).max())
            for r in results.values()
        )
        checks.append(
            Check(
                f"tp 1 vs tp 2 ({p})",
                worst <= LOSS_RTOL[p],
                f"{STEPS} LAMB steps of a tiny BERT, largest relative loss difference "
                f"{worst:.1e} (tolerance {LOSS_RTOL[p]:.0e}); losses {want[0]:.3f} -> "
                f"{want[-1]:.3f}",
            )
        )
    return checks


def run_selftest() -> int:
    """Run every check, print one line each; 0 if all passed, else 1."""
    device = _device()
    checks: list[Check] = []
    precision_check, precision = check_precision(device)
    checks.append(precision_check)
    print(precision_check.line(), flush=True)
    for check in [*check_kernels(device, precision), *check_two_processes(device, precision)]:
        checks.append(check)
        print(check.line(), flush=True)
    failed = [c.name for c in checks if not c.ok]
    print(
        f"selftest: {len(checks) - len(failed)}/{len(checks)} passed"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_selftest())
