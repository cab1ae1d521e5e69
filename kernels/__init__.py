"""Fused operations for BERT pre-training, one public function per operation.

Each operation has a plain PyTorch reference (memory-lean, used on the CPU, where Triton is
absent, and on GPUs below compute capability 8.0 such as V100) and, in a later issue, a Triton
kernel for CUDA. The public function dispatches by the device of its inputs, so callers never
choose: `kernels.linear_cross_entropy(hidden, weight, target, ...)` runs the chunked reference
today on every device.
"""

from kernels.cross_entropy import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
