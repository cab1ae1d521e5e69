"""fp16 with loss scaling at tp = 2 and dp 2 x tp 2: an overflow in ONE rank's gradient shard.

The inf is injected at a clean boundary: a test-side subclass of the loss scaler writes it into
one parameter's gradient on one rank just before the scaler checks the gradients, at a chosen
step. Oracle: a one-process fp16 run with the same injection. Every rank must skip exactly that
step and keep the same loss scale as the reference; the losses then agree within fp16 rounding
(the tp split changes the order of fp16 sums, so relative 2e-2 over 6 steps, not fp32's 1e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_distributed

REPO = Path(__file__).resolve().parents[2]
INJECT_STEP = 3
STEPS = 6


def _train_fp16(data: str, out: str, tp: int, inject_rank: int) -> list[tuple]:
    """(loss, loss_scale, skipped) of every step as this rank logged it."""
    import os

    from pretrain import trainer
    from pretrain.config import load_config
    from pretrain.precision import DynamicLossScaler

    rank = int(os.environ.get("RANK", "0"))

    class InjectingScaler(DynamicLossScaler):
        calls = 0

        def unscale_and_check(self, params, reduce_found_inf=None):
            params = list(params)
            InjectingScaler.calls += 1
            if InjectingScaler.calls == INJECT_STEP and rank == inject_rank:
                params[2].grad.view(-1)[0] = float("inf")  # a weight split across tp ranks
            return super().unscale_and_check(params, reduce_found_inf)

    trainer.DynamicLossScaler = InjectingScaler  # this worker process only
    config = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={data}",
            f"train.out_dir={out}",
            f"parallel.tp={tp}",
            "parallel.timeout_s=30",
            "model.hidden=32",
            "model.heads=2",
            "model.layers=1",
            "model.max_seq_len=32",
            "model.dropout=0.0",
            "data.seq_len=32",
            "train.micro_batch=2",
            "train.global_batch=4",
            f"train.steps={STEPS}",
            "train.precision=fp16",
            "train.loss_scale_init=1024",
            "train.log_every=1",
            "train.eval_every=100",
            "optim.warmup_steps=1",
            "checkpoint.every=100",
        ],
    )
    result = trainer.train(config)
    assert result.exit_code == 0
    return [(r["loss"], r["loss_scale"], bool(r.get("skipped"))) for r in result.history]


@pytest.mark.slow
def test_one_rank_overflow_is_skipped_by_every_rank(small_dataset, tmp_path):
    data = str(small_dataset)
    reference = _train_fp16(data, str(tmp_path / "single"), 1, 0)
    skipped = [s for _, _, s in reference]
    assert skipped == [step == INJECT_STEP for step in range(1, STEPS + 1)]
    scales = [scale for _, scale, _ in reference]
    assert scales == [1024.0] * INJECT_STEP + [512.0] * (STEPS - INJECT_STEP)
    for world, inject_rank in ((2, 1), (4, 3)):  # tp=2; dp 2 x tp 2 (the last tp rank)
        ranks = run_distributed(
            _train_fp16, world, data, str(tmp_path / f"w{world}"), 2, inject_rank
        )
        for rank, history in enumerate(ranks):
            assert [s for _, _, s in history] == skipped, (world, rank)
            assert [scale for _, scale, _ in history] == scales, (world, rank)
            torch.testing.assert_close(
                torch.tensor([loss for loss, _, _ in history]),
                torch.tensor([loss for loss, _, _ in reference]),
                rtol=2e-2,
                atol=0,
            )
