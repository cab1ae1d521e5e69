"""Which implementation an op runs: the Triton kernel or the plain PyTorch reference.

One rule for every op in this package: Triton when the tensors are on a CUDA device of compute
capability >= 8.0 (Triton's official floor), or on sm_70 (V100) with a Triton version listed in
`SM70_TRITON_VERSIONS`, Triton is importable, kernels are enabled, and the caller is not being
traced by `torch.compile` (Inductor then generates its own fused kernels from the reference, and
a hand-written launch would only break the graph). Everything else runs the reference: the CPU,
V100 under other Triton versions, T4 (7.5, never checked), debugging with `kernels.enabled=false`.

SM70_TRITON_VERSIONS holds the Triton releases (major.minor) for which `python -m
kernels.build_check --arch 70` built every kernel variant to a cubin: 3.8 (what torch 2.14, the
last torch with a CUDA 12.6 wheel for Volta, pins) and 3.9. Both ship ptxas 12.9, which still
assembles sm_70; a Triton whose ptxas is from CUDA 13 cannot. `bert-train --selftest` compares
each selected kernel with its reference on the node itself.

`set_enabled(False)` (or `with kernels.reference_only():`) forces the reference everywhere; the
trainer calls `kernels.set_enabled(config.kernels.enabled)` once at start-up.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
from collections.abc import Iterator

import torch
from torch import Tensor

_enabled = True

# Triton (major, minor) versions whose kernels were built for sm_70 by kernels.build_check.
SM70_TRITON_VERSIONS = frozenset({(3, 8), (3, 9)})


def set_enabled(flag: bool) -> None:
    """Allow (True, the default) or forbid (False) the Triton kernels, process-wide."""
    global _enabled
    _enabled = bool(flag)


def is_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Run every op on its PyTorch reference inside the block (restores the previous setting)."""
    previous = _enabled
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


@functools.cache
def triton_available() -> bool:
    """Whether `triton` can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_version() -> tuple[int, int] | None:
    """The installed Triton's (major, minor), read from its metadata without importing it."""
    try:
        major, minor, *_ = importlib.metadata.version("triton").split(".")
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def choose_triton(
    *,
    is_cuda: bool,
    capability: tuple[int, int] | None,
    triton_importable: bool,
    enabled: bool = True,
    compiling: bool = False,
    version: tuple[int, int] | None = None,
) -> bool:
    """The dispatch rule as a pure function of what `use_triton` observes, so tests can check
    the decision for devices this machine does not have. `version`: Triton's (major, minor)."""
    if not (enabled and is_cuda and triton_importable) or compiling or capability is None:
        return False
    if capability == (7, 0):
        return version in SM70_TRITON_VERSIONS
    return capability >= (8, 0)


def use_triton(t: Tensor) -> bool:
    """Whether the ops may launch a Triton kernel on `t` (see `choose_triton`)."""
    # The cheap refusals first: CPU tensors never touch torch.cuda, and under torch.compile
    # nothing below is traced.
    if not t.is_cuda or not _enabled or torch.compiler.is_compiling():
        return False
    return choose_triton(
        is_cuda=True,
        capability=torch.cuda.get_device_capability(t.device),
        triton_importable=triton_available(),
        version=triton_version(),
    )
