"""LayerNorm over the last dimension, optionally with the residual add fused in front of it.

    s = x + residual            (when `residual` is given)
    y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias

BERT normalises after every residual add (post-LN: LN(x + f(x))) or before every sublayer with
the sum carried on (pre-LN: s = x + f(x); LN(s)); `return_sum=True` serves the second case by
also returning s. On the GPU one kernel reads x and residual once and writes y (and s); the
backward kernel gives the grads of x (= of residual), weight and bias in one pass over the rows.
The reference is `F.layer_norm` after a plain add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import use_triton

# Rows wider than this fall back to the reference: one row must fit in one Triton block.
MAX_TRITON_HIDDEN = 16384


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    return_sum: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm of `x (+ residual)` over the last dim; weight, bias [H] or None.

    Returns y, or (y, x + residual) with `return_sum` (which needs `residual`). The maths runs in
    fp32 on every path. Output dtype: that of `F.layer_norm` on the same inputs, i.e. fp32 under
    autocast (LayerNorm is on autocast's fp32 list) and the input's dtype otherwise.
    """
    if return_sum and residual is None:
        raise ValueError("layer_norm: return_sum=True needs a residual")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"layer_norm: residual shape {list(residual.shape)} must equal x's {list(x.shape)}"
        )
    if _triton_applies(x, weight, bias, residual):
        from kernels.layer_norm_triton import layer_norm_triton

        return layer_norm_triton(x, weight, bias, eps, residual=residual, return_sum=return_sum)
    return layer_norm_reference(x, weight, bias, eps, residual=residual, return_sum=return_sum)


def layer_norm_reference(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    return_sum: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The PyTorch implementation of `layer_norm` (same arguments)."""
    s = x if residual is None else x + residual
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return (y, s) if return_sum else y


def _triton_applies(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None
) -> bool:
    if not use_triton(x) or weight is None or bias is None:
        return False
    if x.shape[-1] > MAX_TRITON_HIDDEN or x.numel() == 0:
        return False
    floats = (torch.float32, torch.float16, torch.bfloat16)
    tensors = [x, weight, bias] + ([residual] if residual is not None else [])
    return all(t.dtype in floats and t.device == x.device for t in tensors)
