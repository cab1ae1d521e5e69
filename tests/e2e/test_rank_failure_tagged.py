"""A real two-process run in which rank 1 fails: its error line says which rank and host.

Two `python -m pretrain` processes with torchrun's variables train a tiny model on gloo. Rank 1
is given a `train.out_dir` under a regular file, as a node whose mount of the shared file
system is broken sees it: the run trains, and at the final checkpoint rank 1 cannot write its
piece (an OSError). Oracle: the processes' own stderr. Every line rank 1 prints (its warnings
and its one-line error) starts with `[rank 1 host H]`; rank 0 stops with one untagged error
line of its own rather than hanging.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOST = socket.gethostname().split(".")[0]

pytestmark = pytest.mark.slow  # two processes train and fail: about 35 s here


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rank_1_error_is_tagged_in_a_real_run(small_dataset: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where rank 1 expects a directory\n")
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "SLURM_"))}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH", "")) if p)
    procs = []
    for rank, out_dir in ((0, tmp_path / "run"), (1, blocker / "run")):
        env = dict(
            base,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        args = [
            sys.executable,
            "-m",
            "pretrain",
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            f"data.path={small_dataset}",
            f"train.out_dir={out_dir}",
            "model.hidden=64",
            "model.heads=2",
            "model.max_seq_len=64",
            "data.seq_len=64",
            "train.micro_batch=4",
            "train.global_batch=8",
            "train.steps=2",
            "train.precision=fp32",
            "train.eval_every=1000",
            "checkpoint.every=1000",
            "parallel.timeout_s=60",
            "checkpoint.timeout_s=60",
        ]
        procs.append(
            subprocess.Popen(
                args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
            )
        )
    (_, err0), (_, err1) = (proc.communicate(timeout=300) for proc in procs)
    assert procs[1].returncode == 1 and procs[0].returncode != 0, (err0, err1)

    tag = f"[rank 1 host {HOST}] "
    lines = err1.splitlines()
    assert lines and all(line.startswith(tag) for line in lines), err1
    assert lines[-1].startswith(f"{tag}bert-train: error: ")
    assert "blocker/run/checkpoints" in lines[-1]
    last0 = err0.splitlines()[-1]
    assert last0.startswith("bert-train: error: ") and "[rank" not in err0, err0
