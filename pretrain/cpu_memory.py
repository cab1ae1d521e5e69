"""On a CPU, keep the memory a training step frees for the next step.

glibc's malloc returns memory to the kernel as a step frees it: chunks above its mmap threshold
are unmapped, and the top of the heap is trimmed above its trim threshold. The next step then
touches fresh pages, and every page is a fault, which on a virtual machine is expensive. LAMB's
temporaries (several tensors of every parameter's size per step) make it most of a step's
faults: base (one process, one thread, micro-batch 8 at 128 tokens) faulted about 60,000 times a
step and took 5.4-7.1 s; with the memory kept, 0 faults and 4.7-5.1 s (docs/benchmarks.md).

PyTorch's CPU performance guide preloads jemalloc or tcmalloc for the same reason; glibc's own
`mallopt` does it with nothing to install or preload: the mmap threshold at its 64-bit maximum
(32 MiB), no trimming, and the heap grown 64 MiB at a time. Memory freed stays with the process
(its resident size stays at its peak), which a training process, allocating the same tensors
every step, wants. GPUs are not concerned: PyTorch's CUDA allocator keeps device memory already.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024**2  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
NEVER_TRIM = 2**31 - 1  # the largest value mallopt's int takes
TOP_PAD = 64 * 1024**2


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory; False where the C library has no mallopt (not
    glibc: musl, macOS), which changes nothing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, NEVER_TRIM))
    return all(mallopt(key, value) == 1 for key, value in (*settings, (M_TOP_PAD, TOP_PAD)))
