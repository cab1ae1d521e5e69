"""Triton kernels for `kernels.bias_gelu` (imported only when the Triton path is taken).

Both kernels tile x [N, F] into [BLOCK_M, BLOCK_N] blocks and do their maths in fp32. Backward
writes dx = dy * gelu'(x + bias) and, per row block, the column sums of dx into a
[row blocks, F] fp32 partial of the bias grad, which torch sums (deterministic).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

LAUNCH_OPTIONS: dict[str, Any] = {"enable_fp_fusion": True}
BLOCK_M, BLOCK_N = 32, 128

_RSQRT2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_RSQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


@triton.jit
def _bias_gelu_fwd(
    X,
    BIAS,
    Y,
    n_rows,
    n_cols,
    stride_x,
    stride_y,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    b = tl.load(BIAS + cols, mask=cols < n_cols, other=0.0)
    z = x.to(tl.float32) + b.to(tl.float32)[None, :]
    y = 0.5 * z * (1.0 + tl.math.erf(z * _RSQRT2))
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd(
    X,
    BIAS,
    DY,
    DX,
    DB_PART,
    n_rows,
    n_cols,
    stride_x,
    stride_dy,
    stride_dx,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    b = tl.load(BIAS + cols, mask=cols < n_cols, other=0.0)
    z = x.to(tl.float32) + b.to(tl.float32)[None, :]
    cdf = 0.5 * (1.0 + tl.math.erf(z * _RSQRT2))
    pdf = tl.exp(-0.5 * z * z) * _RSQRT_2PI
    dx = dy.to(tl.float32) * (cdf + z * pdf)
    dx = tl.where(mask, dx, 0.0)
    tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DB_PART + pid_m.to(tl.int64) * n_cols + cols, tl.sum(dx, axis=0), mask=cols < n_cols)


def _rows(t: Tensor) -> Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    return triton.cdiv(n_rows, BLOCK_M), triton.cdiv(n_cols, BLOCK_N)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor) -> Tensor:
        x2 = _rows(x)
        n_rows, n_cols = x2.shape
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        _bias_gelu_fwd[_grid(n_rows, n_cols)](
            x2,
            bias,
            y,
            n_rows,
            n_cols,
            x2.stride(0),
            y.stride(0),
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            **LAUNCH_OPTIONS,
        )
        ctx.save_for_backward(x2, bias)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x2, bias = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _rows(dy)
        dx = torch.empty_like(x2)
        grid = _grid(n_rows, n_cols)
        db_part = torch.empty((grid[0], n_cols), dtype=torch.float32, device=x2.device)
        _bias_gelu_bwd[grid](
            x2,
            bias,
            dy2,
            dx,
            db_part,
            n_rows,
            n_cols,
            x2.stride(0),
            dy2.stride(0),
            dx.stride(0),
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            **LAUNCH_OPTIONS,
        )
        grad_b = db_part.sum(0).to(bias.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), grad_b


def bias_gelu_triton(x: Tensor, bias: Tensor) -> Tensor:
    """`kernels.bias_gelu` on the Triton kernels (also CPU tensors under TRITON_INTERPRET=1)."""
    return _BiasGelu.apply(x, bias)


def build_specs() -> list[tuple[Any, dict[str, str], dict[str, Any]]]:
    """(kernel, signature, constexprs) per dtype the launchers can produce, for the build check."""
    consts = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N}
    specs = []
    for io in ("fp32", "fp16", "bf16"):
        specs.append(
            (
                _bias_gelu_fwd,
                {
                    "X": f"*{io}",
                    "BIAS": "*fp32",
                    "Y": f"*{io}",
                    "n_rows": "i32",
                    "n_cols": "i32",
                    "stride_x": "i32",
                    "stride_y": "i32",
                    "BLOCK_M": "constexpr",
                    "BLOCK_N": "constexpr",
                },
                consts,
            )
        )
        specs.append(
            (
                _bias_gelu_bwd,
                {
                    "X": f"*{io}",
                    "BIAS": "*fp32",
                    "DY": f"*{io}",
                    "DX": f"*{io}",
                    "DB_PART": "*fp32",
                    "n_rows": "i32",
                    "n_cols": "i32",
                    "stride_x": "i32",
                    "stride_dy": "i32",
                    "stride_dx": "i32",
                    "BLOCK_M": "constexpr",
                    "BLOCK_N": "constexpr",
                },
                consts,
            )
        )
    return specs
