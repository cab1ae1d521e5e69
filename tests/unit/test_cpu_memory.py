"""pretrain.cpu_memory: a CPU training process keeps the memory a step frees.

Oracle: the kernel's own count of page faults (getrusage's ru_minflt) over one LAMB step on
~120 MB of parameters, in a fresh process each way: with glibc's defaults the step's
temporaries are returned to the kernel and faulted in again (tens of thousands of faults every
step); once keep_freed_memory() ran, a warmed-up step faults (almost) never.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.cpu_memory import keep_freed_memory

REPO = Path(__file__).resolve().parents[2]

STEP_FAULTS = """
import resource, sys, torch
from pretrain.cpu_memory import keep_freed_memory
from pretrain.optim import clip_grad_norm_, optimizer_for_groups
torch.set_num_threads(1)
if sys.argv[1] == "kept":
    assert keep_freed_memory()
params = [torch.nn.Parameter(torch.randn(2_500_000)) for _ in range(12)]
groups = [{"params": params, "weight_decay": 0.01}]
optimizer = optimizer_for_groups(groups, "lamb", 1e-3, (0.9, 0.999), 1e-6, None)
for step in range(5):
    for p in params:
        p.grad = torch.randn_like(p)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    clip_grad_norm_(params, 1.0)
    optimizer.step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def _last_step_faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", STEP_FAULTS, mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_lamb_step_stops_faulting_once_freed_memory_is_kept():
    default, kept = _last_step_faults("default"), _last_step_faults("kept")
    assert default > 10_000, default  # the defaults return the temporaries each step
    assert kept < default / 20, (kept, default)


def test_without_glibc_it_changes_nothing(monkeypatch):
    """A C library without mallopt (musl, macOS) is left alone: False, no error."""
    import ctypes

    class NoMallopt:
        def __init__(self, *args: object) -> None:
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)
    assert keep_freed_memory() is False
