"""Data parallel training in real processes (gloo) against one process.

Oracle: the same config, seed and global batch trained by one process with gradient
accumulation. DDP averages the same per-micro-batch gradients, so losses and weights agree to
float rounding (relative 1e-5, fp32, dropout off).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.checkpoint import full_model_state
from tests.distributed.harness import run_distributed

REPO = Path(__file__).resolve().parents[2]


def _train(data: str, out: str, mode: str) -> list[float]:
    from pretrain.config import load_config
    from pretrain.trainer import train

    config = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={data}",
            f"train.out_dir={out}",
            f"mlm.mode={mode}",
            "model.hidden=64",
            "model.heads=2",
            "model.max_seq_len=64",
            "model.dropout=0.0",
            "data.seq_len=64",
            "train.micro_batch=4",
            "train.global_batch=16",
            "train.steps=5",
            "train.precision=fp32",
            "train.log_every=1",
            "train.eval_every=5",
            "train.eval_batches=2",
            "optim.warmup_steps=1",
            "checkpoint.every=5",
        ],
    )
    result = train(config)
    return [r["loss"] for r in result.history]


def test_dp2_matches_one_process(small_dataset, tmp_path):
    for mode in ("dense", "sparse"):
        single = _train(str(small_dataset), str(tmp_path / f"single-{mode}"), mode)
        ranks = run_distributed(_train, 2, str(small_dataset), str(tmp_path / f"dp2-{mode}"), mode)
        dp_losses = ranks[0]
        assert ranks[1] == dp_losses  # logged values are reduced over the dp group
        torch.testing.assert_close(torch.tensor(dp_losses), torch.tensor(single), rtol=1e-5, atol=0)
        a = full_model_state(tmp_path / f"single-{mode}" / "checkpoints" / "step_000005")
        b = full_model_state(tmp_path / f"dp2-{mode}" / "checkpoints" / "step_000005")
        diff = sum((a[k] - b[k]).float().norm() ** 2 for k in a) ** 0.5
        norm = sum(a[k].float().norm() ** 2 for k in a) ** 0.5
        assert diff / norm < 1e-5, (mode, float(diff / norm))
