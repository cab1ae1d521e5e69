"""Triton path of `kernels.linear_cross_entropy` (imported only when it is taken).

The chunk loop and its three GEMMs per chunk (logits = h W^T, grad_h = G W, grad_W += G^T h, on
cuBLAS in the autocast dtype or fp32) are the same as the reference's (`cross_entropy.
run_chunked`, which calls `chunk_math_triton` here); what changes is the maths on each [c, V]
fp32 logits chunk, which the reference does in about ten full passes. Here:

    _ce_row_stats   one pass, one program per row, online over BLOCK_V columns at a time:
                    row max, sum exp(x - max), the target's logit, the logit sum (label
                    smoothing only) and the argmax
    (tp > 1: max, sum-exp, target logit and argmax are reduced over the tp group here,
     exactly where the reference's `_row_max`/`_row_sum`/... reduce)
    _ce_loss_grad   per-row CE and weighted loss, then, in place over the chunk,
                    d loss / d logits = scale * (softmax - (1 - s) onehot - s / V)

So the chunk is read twice and written once, and no other chunk-sized buffer exists.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.collectives import VocabShard

LAUNCH_OPTIONS: dict[str, Any] = {"enable_fp_fusion": True}
BLOCK_V = 1024


@triton.jit
def _ce_row_stats(
    LOGITS,
    stride,
    TARGET,
    ROW_MAX,
    SUM_EXP,
    TARGET_LOGIT,
    LOGIT_SUM,
    ARGMAX,
    n_cols,
    vocab_start,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    local_target = tl.load(TARGET + row) - vocab_start  # outside [0, n_cols): not on this rank
    row_max = tl.full((), float("-inf"), tl.float32)
    sum_exp = tl.zeros((), tl.float32)
    target_logit = tl.zeros((), tl.float32)
    logit_sum = tl.zeros((), tl.float32)
    best = tl.zeros((), tl.int32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=float("-inf"))
        block_max = tl.max(x, axis=0)
        # Strictly greater: on ties the earlier block keeps it, as torch.argmax's first index.
        best = tl.where(block_max > row_max, start + tl.argmax(x, axis=0), best)
        new_max = tl.maximum(row_max, block_max)
        # A row (or block) of only -inf (masked vocabulary padding) must not make NaNs.
        rescale = tl.where(new_max == float("-inf"), 1.0, tl.exp(row_max - new_max))
        e = tl.where(x == float("-inf"), 0.0, tl.exp(x - new_max))
        sum_exp = sum_exp * rescale + tl.sum(e, axis=0)
        row_max = new_max
        target_logit += tl.sum(tl.where(mask & (cols == local_target), x, 0.0), axis=0)
        if HAS_SMOOTHING:
            logit_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
    tl.store(ROW_MAX + row, row_max)
    tl.store(SUM_EXP + row, sum_exp)
    tl.store(TARGET_LOGIT + row, target_logit)
    tl.store(LOGIT_SUM + row, logit_sum)
    tl.store(ARGMAX + row, best)


@triton.jit
def _ce_loss_grad(
    LOGITS,
    stride,
    TARGET,
    SCALE,
    ROW_MAX,
    SUM_EXP,
    TARGET_LOGIT,
    LOGIT_SUM,
    ROW_CE,
    ROW_LOSS,
    n_cols,
    vocab_start,
    ignore_index,
    smoothing,
    HAS_SMOOTHING: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGET + row)
    scored = target != ignore_index
    local_target = tl.where(scored, target - vocab_start, -1)
    scale = tl.load(SCALE + row)
    row_max = tl.load(ROW_MAX + row)
    sum_exp = tl.load(SUM_EXP + row)
    log_sum_exp = tl.log(sum_exp)  # lse - max, as in the reference
    ce = tl.where(scored, log_sum_exp - (tl.load(TARGET_LOGIT + row) - row_max), 0.0)
    tl.store(ROW_CE + row, ce)
    loss = ce
    if HAS_SMOOTHING:
        mean_shifted = tl.load(LOGIT_SUM + row) / n_cols - row_max
        loss = (1.0 - smoothing) * ce + smoothing * (log_sum_exp - mean_shifted)
    tl.store(ROW_LOSS + row, scale * loss)
    if WANT_GRAD:
        base = LOGITS + row * stride
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            x = tl.load(base + cols, mask=mask, other=float("-inf"))
            grad = tl.exp(x - row_max) / sum_exp
            if HAS_SMOOTHING:
                grad -= smoothing / n_cols
            grad = tl.where(cols == local_target, grad - (1.0 - smoothing), grad)
            tl.store(base + cols, grad * scale, mask=mask)


def _reduce_over_tp(
    row_max: Tensor, sum_exp: Tensor, target_logit: Tensor, argmax: Tensor, shard: VocabShard
) -> Tensor:
    """Turn this rank's row statistics into the full vocabulary's, in place; returns the
    global argmax. Only called with a tp group of size > 1 (label smoothing is refused then)."""
    assert shard.tp is not None
    values = row_max.clone()  # for the argmax: the first rank holding the max wins
    shard.tp.all_reduce_max(row_max)
    sum_exp.mul_(torch.exp(values - row_max))  # rescale to the global max, then add up
    sums = torch.stack([sum_exp, target_logit])
    shard.tp.all_reduce_sum(sums)
    sum_exp.copy_(sums[0])
    target_logit.copy_(sums[1])
    return shard.global_argmax(values, argmax)


def chunk_math_triton(
    logits: Tensor,
    target: Tensor,
    row_scale: Tensor,
    ignore_index: int,
    smoothing: float,
    want_grad: bool,
    shard: VocabShard,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One chunk's maths on the two kernels, in place on `logits` (see cross_entropy.ChunkMath)."""
    n_rows, n_cols = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    device = logits.device
    stats = torch.empty((4, n_rows), dtype=torch.float32, device=device)
    row_max, sum_exp, target_logit, logit_sum = stats.unbind()
    local_argmax = torch.empty(n_rows, dtype=torch.int32, device=device)
    target = target.contiguous()
    has_smoothing = smoothing > 0
    _ce_row_stats[(n_rows,)](
        logits,
        logits.stride(0),
        target,
        row_max,
        sum_exp,
        target_logit,
        logit_sum,
        local_argmax,
        n_cols,
        shard.start,
        HAS_SMOOTHING=has_smoothing,
        BLOCK_V=BLOCK_V,
        num_warps=4,
        **LAUNCH_OPTIONS,
    )
    argmax = local_argmax.to(torch.int64) + shard.start
    if shard.tp is not None:
        argmax = _reduce_over_tp(row_max, sum_exp, target_logit, argmax, shard)
    row_ce = torch.empty(n_rows, dtype=torch.float32, device=device)
    row_loss = torch.empty_like(row_ce)
    _ce_loss_grad[(n_rows,)](
        logits,
        logits.stride(0),
        target,
        row_scale.contiguous(),
        row_max,
        sum_exp,
        target_logit,
        logit_sum,
        row_ce,
        row_loss,
        n_cols,
        shard.start,
        ignore_index,
        smoothing,
        HAS_SMOOTHING=has_smoothing,
        WANT_GRAD=want_grad,
        BLOCK_V=BLOCK_V,
        num_warps=4,
        **LAUNCH_OPTIONS,
    )
    return row_ce, row_loss.sum(), argmax, logits if want_grad else None


def build_specs() -> list[tuple[Any, dict[str, str], dict[str, Any]]]:
    """(kernel, signature, constexprs) for the ahead-of-time build check."""
    specs = []
    for smoothing in (False, True):
        specs.append(
            (
                _ce_row_stats,
                {
                    "LOGITS": "*fp32",
                    "stride": "i32",
                    "TARGET": "*i64",
                    "ROW_MAX": "*fp32",
                    "SUM_EXP": "*fp32",
                    "TARGET_LOGIT": "*fp32",
                    "LOGIT_SUM": "*fp32",
                    "ARGMAX": "*i32",
                    "n_cols": "i32",
                    "vocab_start": "i32",
                    "HAS_SMOOTHING": "constexpr",
                    "BLOCK_V": "constexpr",
                },
                {"HAS_SMOOTHING": smoothing, "BLOCK_V": BLOCK_V},
            )
        )
        for want_grad in (False, True):
            specs.append(
                (
                    _ce_loss_grad,
                    {
                        "LOGITS": "*fp32",
                        "stride": "i32",
                        "TARGET": "*i64",
                        "SCALE": "*fp32",
                        "ROW_MAX": "*fp32",
                        "SUM_EXP": "*fp32",
                        "TARGET_LOGIT": "*fp32",
                        "LOGIT_SUM": "*fp32",
                        "ROW_CE": "*fp32",
                        "ROW_LOSS": "*fp32",
                        "n_cols": "i32",
                        "vocab_start": "i32",
                        "ignore_index": "i32",
                        "smoothing": "fp32",
                        "HAS_SMOOTHING": "constexpr",
                        "WANT_GRAD": "constexpr",
                        "BLOCK_V": "constexpr",
                    },
                    {"HAS_SMOOTHING": smoothing, "WANT_GRAD": want_grad, "BLOCK_V": BLOCK_V},
                )
            )
    return specs
