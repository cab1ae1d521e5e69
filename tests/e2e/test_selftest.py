"""`bert-train --selftest` on the CPU, as a user runs it on a new node.

Oracle: the command's own contract — one PASS line per check (precision, each kernel, the gloo
all-reduce in 2 processes, tp 1 vs tp 2 in the chosen precision and in fp16), a summary, exit
code 0; and a failing check turns the exit code to 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_selftest_passes_on_the_cpu():
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "--selftest"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [line.split(":")[0] for line in lines[:-1]]
    assert names[0] == "selftest PASS precision"
    for kernel in ("layer_norm", "bias_gelu", "linear_cross_entropy", "lamb_step"):
        assert f"selftest PASS kernel {kernel}" in names
    assert "selftest PASS all-reduce (gloo, 2 CPU processes)" in names
    assert "selftest PASS tp 1 vs tp 2 (fp16)" in names
    assert lines[-1] == f"selftest: {len(lines) - 1}/{len(lines) - 1} passed"


def test_a_failing_check_fails_the_run(monkeypatch, capsys):
    """One check made to fail (a kernel check reporting a difference): exit code 1 and the
    summary names it. The two-process checks are replaced to keep this test fast."""
    from pretrain import selftest

    def broken_kernels(device, precision):
        return [selftest.Check("kernel layer_norm", False, "max abs diff 1.0e+00")]

    monkeypatch.setattr(selftest, "check_kernels", broken_kernels)
    monkeypatch.setattr(selftest, "check_two_processes", lambda device, precision: [])
    assert selftest.run_selftest() == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "selftest: 1/2 passed; FAILED: kernel layer_norm"
