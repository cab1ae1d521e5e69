"""Triton kernels for `kernels.layer_norm` (imported only when the Triton path is taken).

Forward: one program per row (the whole row in one block, fp32 maths), writing y, and s = x +
residual when there is a residual, plus the row's mean and 1/std [N] fp32 for backward.
Backward: a fixed number of programs, each walking a contiguous range of rows; per row
    x_hat = (s - mean) * rstd,  wdy = weight * dy
    ds = rstd * (wdy - x_hat * mean(x_hat * wdy) - mean(wdy))   (+ the grad of the returned s)
and each program accumulates its rows' dy * x_hat and dy into one [H] partial of dweight and
dbias; torch sums the few partials (deterministic, unlike atomics).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

# Explicit, so that Triton 3.9's "default will change" warning does not fire on every launch.
LAUNCH_OPTIONS: dict[str, Any] = {"enable_fp_fusion": True}


@triton.jit
def _layer_norm_fwd(
    X,
    R,
    W,
    B,
    Y,
    S,
    MEAN,
    RSTD,
    n_cols,
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = x.to(S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, s, mask=mask)
        x = s.to(tl.float32)  # normalise the stored sum, which backward reads back
    mean = tl.sum(x, axis=0) / n_cols
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    y = centred * rstd * w + b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd(
    X,
    W,
    DY,
    DS,
    DX,
    DW_PART,
    DB_PART,
    MEAN,
    RSTD,
    n_rows,
    n_cols,
    rows_per_program,
    stride_x,
    stride_dy,
    stride_ds,
    stride_dx,
    HAS_DSUM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for row in range(first, last):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(x_hat * wdy, axis=0) / n_cols
        c2 = tl.sum(wdy, axis=0) / n_cols
        dx = (wdy - (x_hat * c1 + c2)) * rstd
        if HAS_DSUM:
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        db += dy
    tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)
    tl.store(DB_PART + pid.to(tl.int64) * n_cols + cols, db, mask=mask)


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _backward_programs(device: torch.device, n_rows: int) -> int:
    """Enough programs to fill the GPU a few times over; few on the CPU (the interpreter), so a
    test's rows split unevenly over them."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * _multiprocessor_count(device.index or 0)))
    return max(1, min(n_rows, 4))


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def _rows(t: Tensor) -> Tensor:
    """[..., H] -> [N, H] with unit stride along H (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        residual: Tensor | None,
        eps: float,
    ) -> Tensor | tuple[Tensor, Tensor]:
        shape, n_cols = x.shape, x.shape[-1]
        x2 = _rows(x)
        r2 = _rows(residual) if residual is not None else None
        n_rows = x2.shape[0]
        # As F.layer_norm would give: fp32 under autocast, else the (promoted) input dtype.
        sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        autocast = torch.is_autocast_enabled(x.device.type)
        out_dtype = torch.float32 if autocast else sum_dtype
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        s = torch.empty((n_rows, n_cols), dtype=sum_dtype, device=x.device) if r2 is not None else y
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block = triton.next_power_of_2(n_cols)
        _layer_norm_fwd[(n_rows,)](
            x2,
            r2 if r2 is not None else x2,
            weight,
            bias,
            y,
            s,
            mean,
            rstd,
            n_cols,
            x2.stride(0),
            r2.stride(0) if r2 is not None else 0,
            y.stride(0),
            s.stride(0),
            eps,
            HAS_RESIDUAL=r2 is not None,
            BLOCK=block,
            num_warps=_num_warps(block),
            **LAUNCH_OPTIONS,
        )
        ctx.save_for_backward(s if r2 is not None else x2, weight, bias, mean, rstd)
        ctx.set_materialize_grads(False)  # an unused s must not cost a zero-filled [N, H]
        ctx.shape = shape
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        if r2 is None:
            return y.view(shape)
        return y.view(shape), s.view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor, ds: Tensor | None = None) -> tuple[Tensor | None, ...]:
        s, weight, bias, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = s.shape
        x_dtype, residual_dtype = ctx.dtypes
        dy2 = _rows(dy) if dy is not None else torch.zeros_like(s)
        ds2 = _rows(ds) if ds is not None else None
        dx = torch.empty((n_rows, n_cols), dtype=s.dtype, device=s.device)
        programs = _backward_programs(s.device, n_rows)
        rows_per_program = triton.cdiv(n_rows, programs)
        dw_part = torch.empty((programs, n_cols), dtype=torch.float32, device=s.device)
        db_part = torch.empty_like(dw_part)
        block = triton.next_power_of_2(n_cols)
        _layer_norm_bwd[(programs,)](
            s,
            weight,
            dy2,
            ds2 if ds2 is not None else dy2,
            dx,
            dw_part,
            db_part,
            mean,
            rstd,
            n_rows,
            n_cols,
            rows_per_program,
            s.stride(0),
            dy2.stride(0),
            ds2.stride(0) if ds2 is not None else 0,
            dx.stride(0),
            HAS_DSUM=ds2 is not None,
            BLOCK=block,
            num_warps=_num_warps(block),
            **LAUNCH_OPTIONS,
        )
        grad_w = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = db_part.sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None
        grad_x = dx.view(ctx.shape).to(x_dtype) if ctx.needs_input_grad[0] else None
        grad_r = None
        if residual_dtype is not None and ctx.needs_input_grad[3]:
            grad_r = dx.view(ctx.shape).to(residual_dtype)
        return grad_x, grad_w, grad_b, grad_r, None


def layer_norm_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    return_sum: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """`kernels.layer_norm` on the Triton kernels (any device Triton can launch on, including
    CPU tensors under TRITON_INTERPRET=1)."""
    out = _LayerNorm.apply(x, weight, bias, residual, eps)
    if residual is None:
        return out
    return out if return_sum else out[0]


def build_specs() -> list[tuple[Any, dict[str, str], dict[str, Any]]]:
    """(kernel, signature, constexprs) for the ahead-of-time build check, one per variant the
    launchers above can produce (dtype of x/y, residual or not)."""
    specs = []
    for io in ("fp32", "fp16", "bf16"):
        for has_residual in (False, True):
            specs.append(
                (
                    _layer_norm_fwd,
                    {
                        "X": f"*{io}",
                        "R": f"*{io}",
                        "W": "*fp32",
                        "B": "*fp32",
                        "Y": f"*{io}",
                        "S": f"*{io}",
                        "MEAN": "*fp32",
                        "RSTD": "*fp32",
                        "n_cols": "i32",
                        "stride_x": "i32",
                        "stride_r": "i32",
                        "stride_y": "i32",
                        "stride_s": "i32",
                        "eps": "fp32",
                        "HAS_RESIDUAL": "constexpr",
                        "BLOCK": "constexpr",
                    },
                    {"HAS_RESIDUAL": has_residual, "BLOCK": 1024},
                )
            )
            specs.append(
                (
                    _layer_norm_bwd,
                    {
                        "X": f"*{io}",
                        "W": "*fp32",
                        "DY": f"*{io}",
                        "DS": f"*{io}",
                        "DX": f"*{io}",
                        "DW_PART": "*fp32",
                        "DB_PART": "*fp32",
                        "MEAN": "*fp32",
                        "RSTD": "*fp32",
                        "n_rows": "i32",
                        "n_cols": "i32",
                        "rows_per_program": "i32",
                        "stride_x": "i32",
                        "stride_dy": "i32",
                        "stride_ds": "i32",
                        "stride_dx": "i32",
                        "HAS_DSUM": "constexpr",
                        "BLOCK": "constexpr",
                    },
                    {"HAS_DSUM": has_residual, "BLOCK": 1024},
                )
            )
    return specs
