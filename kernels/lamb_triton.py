"""Triton kernels for `kernels.lamb_step` (imported only when the Triton path is taken).

Multi-tensor launches without copying the tensors together: a table of raw addresses (int64,
one row per operand: p, g, m, v, u) and a table of chunks (tensor index, first element) let one
launch walk every tensor of the group, `CHUNK` elements per program.

    phase 1 (one launch):  m, v updated in place; u written to one flat fp32 buffer
    tensor_norms(params + updates)   (torch multi-tensor norms; tp all-reduce in the hook)
    phase 2 (one launch):  p += (-lr * r) * u, with r from the two squared norms of its tensor

Division and square root are the correctly rounded ones (`div_rn`, `sqrt_rn`) and FMA
contraction is off, so each value is rounded as in the op-by-op `torch._foreach_*` reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

LAUNCH_OPTIONS: dict[str, Any] = {"enable_fp_fusion": False}
BLOCK = 1024
CHUNK = 8 * BLOCK  # elements per program


@triton.jit
def _lamb_moments(
    PTRS,
    N_TENSORS,
    NUMELS,
    BIAS_CORR,
    CHUNK_TENSOR,
    CHUNK_START,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    HAS_WEIGHT_DECAY: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(CHUNK_TENSOR + pid)
    start = tl.load(CHUNK_START + pid)
    numel = tl.load(NUMELS + t)
    p_ptr = tl.load(PTRS + t).to(tl.pointer_type(tl.float32), bitcast=True)
    g_ptr = tl.load(PTRS + N_TENSORS + t).to(tl.pointer_type(tl.float32), bitcast=True)
    m_ptr = tl.load(PTRS + 2 * N_TENSORS + t).to(tl.pointer_type(tl.float32), bitcast=True)
    v_ptr = tl.load(PTRS + 3 * N_TENSORS + t).to(tl.pointer_type(tl.float32), bitcast=True)
    u_ptr = tl.load(PTRS + 4 * N_TENSORS + t).to(tl.pointer_type(tl.float32), bitcast=True)
    bc1 = tl.load(BIAS_CORR + 2 * t)
    bc2 = tl.load(BIAS_CORR + 2 * t + 1)
    for offset in range(0, CHUNK, BLOCK):
        idx = start + offset + tl.arange(0, BLOCK)
        mask = idx < numel
        g = tl.load(g_ptr + idx, mask=mask, other=0.0)
        m = tl.load(m_ptr + idx, mask=mask, other=0.0)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0)
        m = m * beta1 + one_minus_beta1 * g
        v = v * beta2 + one_minus_beta2 * g * g
        tl.store(m_ptr + idx, m, mask=mask)
        tl.store(v_ptr + idx, v, mask=mask)
        denom = tl.sqrt_rn(tl.div_rn(v, bc2)) + eps
        u = tl.div_rn(tl.div_rn(m, bc1), denom)
        if HAS_WEIGHT_DECAY:
            p = tl.load(p_ptr + idx, mask=mask, other=0.0)
            u = u + weight_decay * p
        tl.store(u_ptr + idx, u, mask=mask)


@triton.jit
def _lamb_apply(
    PTRS,
    N_TENSORS,
    NUMELS,
    SQUARES,
    CHUNK_TENSOR,
    CHUNK_START,
    neg_lr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(CHUNK_TENSOR + pid)
    start = tl.load(CHUNK_START + pid)
    numel = tl.load(NUMELS + t)
    p_ptr = tl.load(PTRS + t).to(tl.pointer_type(tl.float32), bitcast=True)
    u_ptr = tl.load(PTRS + 4 * N_TENSORS + t).to(tl.pointer_type(tl.float32), bitcast=True)
    p_sq = tl.load(SQUARES + t)
    u_sq = tl.load(SQUARES + N_TENSORS + t)
    trust = tl.where((p_sq > 0) & (u_sq > 0), tl.sqrt_rn(tl.div_rn(p_sq, u_sq)), 1.0)
    coef = trust * neg_lr
    for offset in range(0, CHUNK, BLOCK):
        idx = start + offset + tl.arange(0, BLOCK)
        mask = idx < numel
        p = tl.load(p_ptr + idx, mask=mask, other=0.0)
        u = tl.load(u_ptr + idx, mask=mask, other=0.0)
        tl.store(p_ptr + idx, p + u * coef, mask=mask)


@functools.lru_cache(maxsize=16)
def _chunk_table(
    numels: tuple[int, ...], chunk: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """(numels [n] int64, chunk -> tensor index [C] int32, chunk -> first element [C] int64) on
    `device`; the same every step for the same param group, hence cached."""
    sizes = torch.tensor(numels, dtype=torch.int64)
    counts = (sizes + chunk - 1) // chunk
    chunk_tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    chunk_start = (torch.arange(int(counts.sum())) - first_chunk[chunk_tensor]) * chunk
    return (
        sizes.to(device),
        chunk_tensor.to(torch.int32).to(device),
        chunk_start.to(device),
    )


@torch.no_grad()
def lamb_step_triton(
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
    tensor_norms: Callable[[list[Tensor]], list[Tensor]],
    chunk: int = CHUNK,
) -> None:
    """`kernels.lamb_step` on the Triton kernels: fp32, contiguous tensors on one device (CUDA,
    or the CPU under TRITON_INTERPRET=1). `chunk` (a multiple of 1024) is the elements per
    program."""
    if chunk % BLOCK:
        raise ValueError(f"chunk must be a multiple of {BLOCK}, got {chunk}")
    beta1, beta2 = betas
    device = params[0].device
    n = len(params)
    numels = tuple(p.numel() for p in params)
    sizes, chunk_tensor, chunk_start = _chunk_table(numels, chunk, device)
    flat_updates = torch.empty(sum(numels), dtype=torch.float32, device=device)
    updates = list(flat_updates.split(numels))
    updates = [u.view_as(p) for u, p in zip(updates, params, strict=True)]
    # Addresses, not tensors: the tensors stay where they are, the kernel finds them by table.
    ptrs = torch.tensor(
        [t.data_ptr() for group in (params, grads, exp_avgs, exp_avg_sqs, updates) for t in group],
        dtype=torch.int64,
    ).to(device)
    corrections = [c for t in steps for c in (1.0 - beta1**t, 1.0 - beta2**t)]
    bias_corr = torch.tensor(corrections, dtype=torch.float32).to(device)
    grid = (chunk_tensor.numel(),)
    _lamb_moments[grid](
        ptrs,
        n,
        sizes,
        bias_corr,
        chunk_tensor,
        chunk_start,
        beta1,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        eps,
        weight_decay,
        HAS_WEIGHT_DECAY=weight_decay != 0,
        CHUNK=chunk,
        BLOCK=BLOCK,
        num_warps=4,
        **LAUNCH_OPTIONS,
    )
    squares = torch.stack(tensor_norms(params + updates)).to(torch.float32)
    _lamb_apply[grid](
        ptrs,
        n,
        sizes,
        squares,
        chunk_tensor,
        chunk_start,
        -lr,
        CHUNK=chunk,
        BLOCK=BLOCK,
        num_warps=4,
        **LAUNCH_OPTIONS,
    )


def build_specs() -> list[tuple[Any, dict[str, str], dict[str, Any]]]:
    """(kernel, signature, constexprs) for the ahead-of-time build check."""
    return [
        (
            _lamb_moments,
            {
                "PTRS": "*i64",
                "N_TENSORS": "i32",
                "NUMELS": "*i64",
                "BIAS_CORR": "*fp32",
                "CHUNK_TENSOR": "*i32",
                "CHUNK_START": "*i64",
                "beta1": "fp32",
                "one_minus_beta1": "fp32",
                "beta2": "fp32",
                "one_minus_beta2": "fp32",
                "eps": "fp32",
                "weight_decay": "fp32",
                "HAS_WEIGHT_DECAY": "constexpr",
                "CHUNK": "constexpr",
                "BLOCK": "constexpr",
            },
            {"HAS_WEIGHT_DECAY": has_wd, "CHUNK": CHUNK, "BLOCK": BLOCK},
        )
        for has_wd in (False, True)
    ] + [
        (
            _lamb_apply,
            {
                "PTRS": "*i64",
                "N_TENSORS": "i32",
                "NUMELS": "*i64",
                "SQUARES": "*fp32",
                "CHUNK_TENSOR": "*i32",
                "CHUNK_START": "*i64",
                "neg_lr": "fp32",
                "CHUNK": "constexpr",
                "BLOCK": "constexpr",
            },
            {"CHUNK": CHUNK, "BLOCK": BLOCK},
        )
    ]
