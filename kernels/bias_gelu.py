"""Bias add + exact (erf) GELU, the middle of BERT's MLP: gelu(x + bias).

    gelu(z)  = z * Phi(z) = z/2 * (1 + erf(z / sqrt(2)))
    gelu'(z) = Phi(z) + z * phi(z),   phi(z) = exp(-z^2 / 2) / sqrt(2 pi)

Unfused, the MLP writes fc_in's output with its bias, reads it for the GELU and writes that
again, and autograd keeps both [B, S, F] tensors for backward. Fused (Megatron's bias_gelu), x
and bias are read once, only x is kept, and backward recomputes gelu' from it; the bias grad is
summed by the same backward kernel. `x` is fc_in's output *without* its bias
(`F.linear(h, fc_in.weight)`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import use_triton


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """gelu(x + bias) with the exact GELU; x [..., F], bias [F]. Output in x's dtype (bias is
    cast to it first, as nn.Linear does under autocast); the Triton path computes in fp32."""
    if bias.shape != (x.shape[-1],):
        raise ValueError(f"bias_gelu: bias must be [{x.shape[-1]}], got {list(bias.shape)}")
    if _triton_applies(x, bias):
        from kernels.bias_gelu_triton import bias_gelu_triton

        return bias_gelu_triton(x, bias)
    return bias_gelu_reference(x, bias)


def bias_gelu_reference(x: Tensor, bias: Tensor) -> Tensor:
    """The PyTorch implementation of `bias_gelu`."""
    return F.gelu(x + bias.to(x.dtype))


def _triton_applies(x: Tensor, bias: Tensor) -> bool:
    if not use_triton(x) or x.numel() == 0 or bias.device != x.device:
        return False
    floats = (torch.float32, torch.float16, torch.bfloat16)
    return x.dtype in floats and bias.dtype in floats
