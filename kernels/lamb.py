"""The LAMB update over many tensors at once (the maths of `pretrain.optim.Lamb`).

Per tensor p with gradient g, Adam moments m, v, and bias corrections bc1 = 1 - b1^t,
bc2 = 1 - b2^t for that tensor's step t:
    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
    u = (m / bc1) / (sqrt(v / bc2) + eps) + wd p
    r = sqrt(||p||^2 / ||u||^2)   (1 if either is 0)
    p = p - lr r u
The per-tensor squared norms come from `tensor_norms(params + updates)`, which is where tensor
parallelism sums them over the tp group (`pretrain.optim.Lamb._tensor_norms`).

The reference is `torch._foreach_*` maths (about a dozen multi-tensor passes); the Triton path
(CUDA, fp32, contiguous tensors) does the moments and u in one launch over all tensors, calls
`tensor_norms`, and applies the trust-ratio update in a second launch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kernels.dispatch import use_triton

TensorNorms = Callable[[list[Tensor]], list[Tensor]]


def tensor_square_norms(tensors: list[Tensor]) -> list[Tensor]:
    """Squared L2 norm (0-dim float32) of each tensor: the default `tensor_norms`."""
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return list(torch._foreach_mul(norms, norms))


def lamb_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: Sequence[float],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    tensor_norms: TensorNorms = tensor_square_norms,
) -> None:
    """One LAMB update, in place on params, exp_avgs and exp_avg_sqs (lists of equal length).

    `steps[i]` is tensor i's step count t, already incremented for this step (counted from 1).
    `tensor_norms` gets params followed by their updates and returns their squared norms.
    """
    if not (len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps)):
        raise ValueError("lamb_step: params, grads, exp_avgs, exp_avg_sqs, steps differ in length")
    if not params:
        return
    args = (params, grads, exp_avgs, exp_avg_sqs, steps)
    kwargs = {
        "lr": lr,
        "betas": betas,
        "eps": eps,
        "weight_decay": weight_decay,
        "tensor_norms": tensor_norms,
    }
    if _triton_applies(params, grads, exp_avgs, exp_avg_sqs):
        from kernels.lamb_triton import lamb_step_triton

        lamb_step_triton(*args, **kwargs)
    else:
        lamb_step_reference(*args, **kwargs)


@torch.no_grad()
def lamb_step_reference(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: Sequence[float],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    tensor_norms: TensorNorms = tensor_square_norms,
) -> None:
    """The multi-tensor PyTorch implementation of `lamb_step` (same arguments)."""
    beta1, beta2 = betas
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

    bias_correction1 = [1.0 - beta1**t for t in steps]
    bias_correction2 = [1.0 - beta2**t for t in steps]

    # u = m_hat / (sqrt(v_hat) + eps) + wd * p
    denom = torch._foreach_div(exp_avg_sqs, bias_correction2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    updates = list(torch._foreach_div(exp_avgs, bias_correction1))
    torch._foreach_div_(updates, denom)
    del denom
    if weight_decay != 0:
        torch._foreach_add_(updates, params, alpha=weight_decay)

    n = len(params)
    squares = tensor_norms(params + updates)
    p_sq = torch.stack(squares[:n])
    u_sq = torch.stack(squares[n:])
    trust = torch.where((p_sq > 0) & (u_sq > 0), (p_sq / u_sq).sqrt(), torch.ones_like(p_sq))
    # p -= lr * r * u, with the per-tensor factor applied as one multi-tensor multiply.
    torch._foreach_mul_(updates, list((trust * -lr).unbind()))
    torch._foreach_add_(params, updates)


def _triton_applies(*lists: list[Tensor]) -> bool:
    first = lists[0][0]
    if not use_triton(first):
        return False
    return all(
        t.device == first.device and t.dtype == torch.float32 and t.is_contiguous()
        for tensors in lists
        for t in tensors
    )
