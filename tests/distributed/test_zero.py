"""ZeRO-1 in real processes (gloo): exact resume with gradient accumulation, and fp16's agreed
skip when the overflow sits in a gradient that only reaches its owner through the reduce.

Oracles: the uninterrupted run (a resumed run must repeat its losses and end with its weights
bit for bit), and the loss scaler's rule (a skipped step halves the scale; every rank skips the
same steps).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_distributed

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "model.hidden=32",
    "model.heads=2",
    "model.layers=1",
    "model.max_seq_len=32",
    "model.dropout=0.0",
    "data.seq_len=32",
    "train.log_every=1",
    "train.eval_every=100",
    "optim.warmup_steps=1",
    "parallel.zero=1",
    "parallel.timeout_s=60",
]


def _resume_run(data: str, out: str, steps: int) -> list[float]:
    from pretrain.config import load_config
    from pretrain.trainer import train

    overrides = [
        *SMALL,
        f"data.path={data}",
        f"train.out_dir={out}",
        f"train.steps={steps}",
        "train.micro_batch=2",
        "train.global_batch=8",
        "train.precision=fp32",
        "checkpoint.every=2",
        "checkpoint.keep=5",
    ]
    return [
        r["loss"] for r in train(load_config(REPO / "configs" / "tiny.yaml", overrides)).history
    ]


@pytest.mark.slow
def test_resume_is_exact(small_dataset, tmp_path):
    """dp=2, two micro-batches per rank and step (no_sync on the first): 4 steps in one go, and
    2 steps resumed from the step-2 checkpoint (each rank's own optimizer file), agree exactly.
    The checkpoint's checksums (oracle: the files in it) cover each rank's optimizer file."""
    from pretrain.checkpoint import full_model_state, verify_checkpoint

    data = str(small_dataset)
    full = run_distributed(_resume_run, 2, data, str(tmp_path / "full"), 4)
    saved = tmp_path / "full" / "checkpoints" / "step_000002"
    assert sorted(p.name for p in saved.glob("optimizer_*")) == [
        "optimizer_tp00_dp00.safetensors",
        "optimizer_tp00_dp01.safetensors",
    ]
    # checksums.json covers every dp rank's own optimizer file (the files the ranks wrote)
    written = {p.name for p in saved.iterdir()} - {"COMPLETE", "checksums.json"}
    assert set(json.loads((saved / "checksums.json").read_text())) == written
    shutil.copytree(saved, tmp_path / "resumed" / "checkpoints" / "step_000002")
    resumed = run_distributed(_resume_run, 2, data, str(tmp_path / "resumed"), 4)
    for rank in range(2):
        assert resumed[rank] == full[rank][2:]
    final = full_model_state(tmp_path / "full" / "checkpoints" / "step_000004")
    again = full_model_state(tmp_path / "resumed" / "checkpoints" / "step_000004")
    for name, tensor in final.items():
        assert torch.equal(tensor, again[name]), name

    # a flipped byte in the file only dp rank 1 wrote is found
    victim = tmp_path / "full" / "checkpoints" / "step_000004" / "optimizer_tp00_dp01.safetensors"
    flipped = bytearray(victim.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    victim.write_bytes(bytes(flipped))
    assert verify_checkpoint(victim.parent) == victim.name


INJECT_STEP = 3
STEPS = 5


def _fp16_run(data: str, out: str) -> list[tuple]:
    """(loss, loss_scale, skipped) per step; at INJECT_STEP rank 1 puts an inf into a gradient
    it does not own, just before that bucket is reduced to rank 0."""
    import os

    from pretrain import trainer
    from pretrain.config import load_config
    from pretrain.parallel.zero import ZeroRedundancy

    rank = int(os.environ["RANK"])

    class Injecting(ZeroRedundancy):
        steps = 0

        def finish_gradient_reduction(self) -> None:
            super().finish_gradient_reduction()
            Injecting.steps += 1

        def _reduce(self, bucket) -> None:
            if Injecting.steps + 1 == INJECT_STEP and rank == 1 and bucket.owner == 0:
                bucket.params[0].grad.view(-1)[0] = float("inf")
            super()._reduce(bucket)

    trainer.ZeroRedundancy = Injecting  # this worker process only
    overrides = [
        *SMALL,
        f"data.path={data}",
        f"train.out_dir={out}",
        f"train.steps={STEPS}",
        "train.micro_batch=2",
        "train.global_batch=4",
        "train.precision=fp16",
        "train.loss_scale_init=1024",
        "checkpoint.every=100",
    ]
    result = trainer.train(load_config(REPO / "configs" / "tiny.yaml", overrides))
    assert result.exit_code == 0
    return [(r["loss"], r["loss_scale"], bool(r.get("skipped"))) for r in result.history]


@pytest.mark.slow
def test_fp16_overflow_reaching_the_owner_is_skipped_by_every_rank(small_dataset, tmp_path):
    """dp=2, fp16 gradients on the wire (the default under fp16): the inf travels in the reduce
    to its owner, whose check finds it; the world's MAX flag makes both ranks skip that step."""
    ranks = run_distributed(_fp16_run, 2, str(small_dataset), str(tmp_path))
    expected_skips = [step == INJECT_STEP for step in range(1, STEPS + 1)]
    expected_scales = [1024.0] * INJECT_STEP + [512.0] * (STEPS - INJECT_STEP)
    for history in ranks:
        assert [skipped for _, _, skipped in history] == expected_skips
        assert [scale for _, scale, _ in history] == expected_scales
        assert all(torch.isfinite(torch.tensor([loss for loss, _, _ in history])))
    assert ranks[0] == ranks[1]
