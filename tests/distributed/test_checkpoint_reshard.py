"""Sharded checkpoints load into other layouts: saved at dp=2 x tp=2 with ZeRO-1 (optimizer
state spread over dp ranks), resumed at tp=1 and at tp=2 x dp=1, and exported.

Oracle: the uninterrupted dp=2 x tp=2 run. A resumed run must continue with the same losses
(relative 1e-5: the reduction order differs between layouts), which needs the model and the
optimizer state to be resharded exactly; the export must hold the same whole tensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_distributed

REPO = Path(__file__).resolve().parents[2]


def _train(data: str, out: str, tp: int, steps: int, zero: int = 0) -> list[float]:
    from pretrain.config import load_config
    from pretrain.trainer import train

    config = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={data}",
            f"train.out_dir={out}",
            f"parallel.tp={tp}",
            f"parallel.zero={zero}",
            "model.hidden=64",
            "model.heads=4",
            "model.max_seq_len=64",
            "model.dropout=0.0",
            "data.seq_len=64",
            "train.micro_batch=4",
            "train.global_batch=8",
            f"train.steps={steps}",
            "train.precision=fp32",
            "train.log_every=1",
            "train.eval_every=100",
            "optim.warmup_steps=1",
            "checkpoint.every=2",
            "checkpoint.keep=5",
        ],
    )
    return [r["loss"] for r in train(config).history]


@pytest.mark.slow
def test_resume_at_other_layouts_continues_the_run(small_dataset, tmp_path):
    data = str(small_dataset)
    full = run_distributed(_train, 4, data, str(tmp_path / "a"), 2, 4, 1)[0]  # ZeRO-1 too
    saved = tmp_path / "a" / "checkpoints" / "step_000002"

    def fresh_copy(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(saved, out / "checkpoints" / "step_000002")
        return out

    at_tp1 = _train(data, str(fresh_copy("tp1")), 1, 4)
    at_tp2 = run_distributed(_train, 2, data, str(fresh_copy("tp2")), 2, 4)[0]
    for resumed in (at_tp1, at_tp2):
        torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[2:]), rtol=1e-5, atol=0)

    from pretrain.checkpoint import full_model_state
    from pretrain.export_hf import export_checkpoint

    export_checkpoint(saved, tmp_path / "hf")
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    whole = full_model_state(saved)
    assert whole["embeddings.word.weight"].shape[0] == 1000  # vocabulary padding dropped
    torch.testing.assert_close(
        exported["bert.embeddings.word_embeddings.weight"], whole["embeddings.word.weight"]
    )
