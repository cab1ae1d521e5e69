"""Fused operations for BERT pre-training, one public function per operation.

    linear_cross_entropy  the MLM head's decoder + cross-entropy, chunk by chunk (cross_entropy.py)
    layer_norm            LayerNorm, optionally with the residual add in front (layer_norm.py)
    bias_gelu             bias add + exact GELU, the middle of the MLP (bias_gelu.py)
    lamb_step             the LAMB update over a list of tensors (lamb.py)

Each has a plain PyTorch reference (memory-lean where it matters; the path on the CPU, where
Triton is absent, and on GPUs the dispatch rule does not cover) and a Triton kernel
(`*_triton.py`, imported only when used). The public function dispatches by the device of its
inputs (kernels/dispatch.py), so callers never choose; `set_enabled(False)` or
`with reference_only():` forces the references (config key `kernels.enabled`).
Triton kernels are tested on the CPU under TRITON_INTERPRET=1 and compiled for sm_70/80/90
without a GPU by `python -m kernels.build_check`.
"""

from kernels import dispatch
from kernels.bias_gelu import bias_gelu
from kernels.cross_entropy import linear_cross_entropy
from kernels.dispatch import is_enabled, reference_only, set_enabled
from kernels.lamb import lamb_step
from kernels.layer_norm import layer_norm

__all__ = [
    "bias_gelu",
    "dispatch",
    "is_enabled",
    "lamb_step",
    "layer_norm",
    "linear_cross_entropy",
    "reference_only",
    "set_enabled",
]
