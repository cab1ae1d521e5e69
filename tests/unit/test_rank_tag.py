"""Messages from ranks other than 0 carry `[rank R host H]`; rank 0 prints as before.

Oracle: real `bert-train` processes given the variables Open MPI sets for rank 1 (and rank 0)
and a config mistake, read from their stderr; a process that warns and dies of an uncaught
exception; and the text of the job scripts bert-launch generates (the launchers' own tagging
options, `srun --label` and Open MPI's `mpirun --tag-output`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch.scripts import JobSpec, render_script

REPO = Path(__file__).resolve().parents[2]
HOST = socket.gethostname().split(".")[0]


def _openmpi_env(rank: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "SLURM_"))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(
        OMPI_COMM_WORLD_RANK=str(rank),
        OMPI_COMM_WORLD_SIZE="2",
        OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
        OMPI_COMM_WORLD_LOCAL_SIZE="2",
    )
    return env


@pytest.mark.parametrize("rank, tag", [(1, f"[rank 1 host {HOST}] "), (0, "")])
def test_one_line_error_is_tagged_on_other_ranks(rank: int, tag: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", str(tmp_path / "missing.yaml")],
        env=_openmpi_env(rank),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines == [
        f"{tag}bert-train: error: config file {tmp_path / 'missing.yaml'} does not exist"
    ]


def test_warnings_and_tracebacks_are_tagged_line_by_line() -> None:
    code = (
        "import warnings\n"
        "from pretrain.rank_tag import install, rank_tag\n"
        "install(rank_tag())\n"
        "warnings.warn('slow link')\n"
        "def fail():\n"
        "    raise RuntimeError('CUDA error: an illegal memory access')\n"
        "fail()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=_openmpi_env(1),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    tag = f"[rank 1 host {HOST}] "
    assert len(lines) >= 5 and all(line.startswith(tag) for line in lines), result.stderr
    assert any("UserWarning: slow link" in line for line in lines)
    assert f"{tag}Traceback (most recent call last):" in lines
    assert lines[-1] == f"{tag}RuntimeError: CUDA error: an illegal memory access"


@pytest.mark.parametrize(
    "scheduler, launch_line",
    [
        ("slurm", "export SLURM_LABELIO=1\n"),  # srun --label, without touching the srun line
        ("pbs", "-bind-to none --tag-output "),
        ("sge", "-bind-to none --tag-output "),
        ("mpirun", "-bind-to none --tag-output "),
    ],
)
def test_job_scripts_ask_the_launcher_to_tag_output(
    scheduler: str, launch_line: str, tmp_path: Path
) -> None:
    job = JobSpec(scheduler=scheduler, command=("bert-train", "--config", "c.yaml"), nodes=1)
    text = render_script(job, tmp_path / "job.sh")
    assert launch_line in text
