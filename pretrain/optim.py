"""Optimizers (LAMB, AdamW), learning-rate schedules and global gradient-norm clipping.

LAMB is what lets BERT train at large global batches (You et al. 2019, "Large Batch Optimization
for Deep Learning", Algorithm 2): Adam's moments, then a per-tensor trust ratio ||p|| / ||u|| that
rescales each layer's step to its own size. The maths runs as multi-tensor `torch._foreach_*` ops
over a whole param group, so the optimizer costs a handful of kernel launches per step, not a few
per tensor; that maths lives in `kernels.lamb_step` (two Triton launches per group on GPUs of
compute capability >= 8.0, the same `torch._foreach_*` ops elsewhere). Tensor parallelism
enters only through two overridable reductions: `Lamb._tensor_norms` and the `norm_fn`
argument of `clip_grad_norm_`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

import kernels

OptimizerName = Literal["lamb", "adamw"]
DecayKind = Literal["poly", "linear", "cosine"]


class Lamb(torch.optim.Optimizer):
    """LAMB with bias-corrected Adam moments and a per-tensor trust ratio.

    Per tensor p with gradient g, at step t (counted from 1):
        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd p
        r = ||p|| / ||u||   (r = 1 if either norm is 0)
        p = p - lr r u
    Weight decay comes from each param group (see `build_param_groups`: biases and norms get 0).
    Params whose grad is None are skipped and keep their state (including their step count).
    State per param: `step` (0-dim float32 CPU tensor, like torch's Adam), `exp_avg`,
    `exp_avg_sq`; all of it is in `state_dict()`, so a resumed run is bitwise identical.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        tp_group: Any = None,
    ) -> None:
        """`tp_group`: the tensor-parallel group whose ranks hold shards of the same tensors;
        per-tensor norms are summed over it so the trust ratio sees whole tensors."""
        self.tp_group = tp_group
        if lr < 0:
            raise ValueError(f"Lamb: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Lamb: betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"Lamb: eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"Lamb: weight_decay must be >= 0, got {weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def tensors_with_tp_norms(self) -> int:
        """Parameter tensors whose two squared norms `step` all-reduces over the tp group
        (read by `pretrain.parallel.comm_stats` for the analytic traffic)."""
        return sum(len(group["params"]) for group in self.param_groups)

    def _tensor_norms(self, tensors: list[Tensor]) -> list[Tensor]:
        """Squared L2 norm (0-dim float32) of each tensor.

        The hook for tensor parallelism: `step` calls it once per group with the group's params
        followed by their updates, so an override can all-reduce (SUM) all of them in a single
        collective. Summing is right for replicated tensors too: both norms of the trust ratio
        are then multiplied by tp_size and the ratio does not change.
        """
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        squares = list(torch._foreach_mul(norms, norms))
        if self.tp_group is None or dist.get_world_size(self.tp_group) == 1:
            return squares
        stacked = torch.stack(squares)
        dist.all_reduce(stacked, group=self.tp_group)  # one collective for all tensors
        return list(stacked.unbind())

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One LAMB update of every param that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        steps: list[Tensor] = []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])

        torch._foreach_add_(steps, 1.0)
        # Steps live on the CPU (as in torch's Adam), so reading them is no device sync.
        step_values = [s.item() for s in steps]
        kernels.lamb_step(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            step_values,
            lr=group["lr"],
            betas=(beta1, beta2),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            tensor_norms=self._tensor_norms,
        )


def tensors_with_tp_norms(optimizer: Any) -> int:
    """Parameter tensors whose norms `optimizer` all-reduces over tp in each step: what its
    `tensors_with_tp_norms()` says (LAMB, ZeRO around LAMB), 0 for optimizers without it."""
    count = getattr(optimizer, "tensors_with_tp_norms", None)
    return count() if count is not None else 0


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two param groups: decayed matrices, and undecayed biases and norm weights.

    Decaying a bias or a LayerNorm gain only pulls it toward zero, which BERT's recipe avoids:
    any param with ndim < 2 or a name containing "norm" (any case, e.g. LayerNorm) gets 0.
    Frozen params (requires_grad False) are left out; empty groups are dropped.
    """
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name.lower():
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    name: OptimizerName,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    tp_group: Any = None,
) -> torch.optim.Optimizer:
    """LAMB or AdamW over `build_param_groups(model, weight_decay)`."""
    groups = build_param_groups(model, weight_decay)
    return optimizer_for_groups(groups, name, lr, betas, eps, tp_group)


def optimizer_for_groups(
    groups: list[dict[str, Any]],
    name: OptimizerName,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    tp_group: Any = None,
) -> torch.optim.Optimizer:
    """LAMB or AdamW over prepared param groups (ZeRO-1 builds one over its share)."""
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps, tp_group=tp_group)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
    raise ValueError(f"unknown optimizer {name!r}; use 'lamb' or 'adamw'")


def lr_at(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    decay: DecayKind,
    power: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> float:
    """Learning rate for the optimizer step with 0-based index `step`.

    Warm-up: lr = base_lr * (step + 1) / warmup_steps for step < warmup_steps, so the first step
    already moves (base_lr / warmup_steps) and step warmup_steps - 1 runs at base_lr; with
    warmup_steps = 0 the first step runs at base_lr. Then decay over
    p = (step - warmup_steps) / (total_steps - warmup_steps), clamped to [0, 1], from base_lr to
    min_lr = min_lr_ratio * base_lr:
        poly:   min_lr + (base_lr - min_lr) (1 - p)^power
        linear: poly with power 1
        cosine: min_lr + (base_lr - min_lr) (1 + cos(pi p)) / 2
    Steps at or beyond total_steps get min_lr.
    """
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"warmup_steps, total_steps must be >= 0: {warmup_steps}, {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    min_lr = min_lr_ratio * base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "poly":
        factor = (1.0 - progress) ** power
    elif decay == "linear":
        factor = 1.0 - progress
    elif decay == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown decay {decay!r}; use 'poly', 'linear' or 'cosine'")
    return min_lr + (base_lr - min_lr) * factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every param group (the schedule is applied from outside)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm_(
    params: Iterable[Tensor],
    max_norm: float,
    norm_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Scale all gradients so their global L2 norm is at most `max_norm`; return the norm before.

    `norm_fn` turns this rank's per-tensor squared norms (1-D float32, one entry per param with a
    gradient, in the order of `params`) into the global squared norm; the default is their sum.
    A parallel trainer passes a function that drops tp-replicated duplicates and all-reduces.
    `max_norm <= 0` only measures. A non-finite norm leaves the gradients alone: the fp16 loss
    scaler skips that step anyway. Scaling uses a tensor coefficient, so there is no device sync.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    per_tensor = per_tensor_norms(grads).square()
    total_sq = norm_fn(per_tensor) if norm_fn is not None else per_tensor.sum()
    total = total_sq.sqrt()
    if max_norm > 0:
        # Same coefficient as torch.nn.utils.clip_grad_norm_, forced to 1 when non-finite.
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        coef = torch.where(torch.isfinite(total), coef, torch.ones_like(coef))
        for dev, device_grads in _by_device(grads).items():
            torch._foreach_mul_(device_grads, coef.to(dev))
    return total


def per_tensor_norms(tensors: list[Tensor]) -> Tensor:
    """[len(tensors)] fp32 L2 norm of each tensor, in order, on the first tensor's device: the
    multi-tensor kernels, one group per device. Also the loss scaler's finiteness check (an inf
    or NaN makes its tensor's norm non-finite)."""
    norm_of: dict[int, Tensor] = {}
    for device_tensors in _by_device(tensors).values():
        norms = torch._foreach_norm(device_tensors, 2, dtype=torch.float32)
        for t, norm in zip(device_tensors, norms, strict=True):
            norm_of[id(t)] = norm.to(tensors[0].device)
    return torch.stack([norm_of[id(t)] for t in tensors])


def _by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    groups: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups
