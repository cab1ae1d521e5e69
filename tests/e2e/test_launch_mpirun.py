"""The script `bert-launch mpirun` writes, run by a real Open MPI `mpirun -np 2`: bert-train with
dp=2 for a few steps on the demo config.

Oracle: the same config, seed and global batch trained by one process (gradient accumulation
over the two micro-batches the ranks take). DDP averages the same per-micro-batch gradients and
the logged loss is averaged over the dp ranks, so every logged loss of the dp=2 run must match
the one-process run to float rounding (relative 1e-5, fp32, dropout off): both ranks computed
and agreed on the same losses, which is only possible if rank, world size and master were found
from Open MPI's variables. The job's output is read as a user reads it: every line the ranks
print carries the rank tag of the script's `mpirun --tag-output`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import cli

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def overrides(data: Path, out: Path) -> list[str]:
    return [
        f"data.path={data}",
        f"train.out_dir={out}",
        "model.hidden=64",
        "model.heads=2",
        "model.max_seq_len=64",
        "model.dropout=0.0",
        "data.seq_len=64",
        "train.micro_batch=4",
        "train.global_batch=8",
        "train.steps=4",
        "train.precision=fp32",
        "train.log_every=1",
        "train.eval_every=4",
        "train.eval_batches=1",
        "optim.warmup_steps=1",
        "checkpoint.every=4",
        "parallel.timeout_s=60",
    ]


def test_mpirun_dp2_matches_one_process(small_dataset, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed: apt-get install -y openmpi-bin libopenmpi-dev")
    config = str(REPO / "configs" / "tiny.yaml")
    dp_out = tmp_path / "dp2"
    script = tmp_path / "mpirun.sh"
    command = [sys.executable, "-m", "pretrain", "--config", config]
    assert (
        cli.main(
            [
                "mpirun",
                "--ranks-per-node",
                "2",
                "--out",
                str(script),
                "--",
                *command,
                *overrides(small_dataset, dp_out),
            ]
        )
        == 0
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "OMPI_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "launcher openmpi: rank 0/2, local rank 0/2, master 127.0.0.1:" in result.stdout
    assert "dp 2 x tp 1" in result.stdout
    # The script's `mpirun --tag-output`: every line the ranks print names its rank (the
    # script's own `bert-launch:` line comes before mpirun starts them).
    lines = [line for line in result.stdout.splitlines() if not line.startswith("bert-launch: ")]
    assert lines and all(line.startswith(("[1,0]<stdout>:", "[1,1]<stdout>:")) for line in lines)
    assert any(line.startswith("[1,0]<stdout>:train step 4/4 |") for line in lines)

    from pretrain.config import load_config
    from pretrain.trainer import train

    single_out = tmp_path / "single"
    reference = train(load_config(config, overrides(small_dataset, single_out)))
    dp_lines = [json.loads(line) for line in (dp_out / "metrics.jsonl").read_text().splitlines()]
    dp_losses = [line["loss"] for line in dp_lines if line.get("split") != "valid"]
    single_losses = [record["loss"] for record in reference.history]
    assert len(dp_losses) == 4
    torch.testing.assert_close(
        torch.tensor(dp_losses), torch.tensor(single_losses), rtol=1e-5, atol=0
    )
