"""Checkpoint saves that do not risk the run: background (async) saves, failed saves that are
reported while training goes on, and a save slower than the training collectives' timeout.

Oracles: a run with synchronous saves (an async run must give the same losses and the same
checkpoint files, tensor for tensor, and resume from them bit for bit); `latest`, which must
keep naming the last complete checkpoint when a save fails; and the collective timeout itself
(parallel.timeout_s shorter than the save: the run must survive under checkpoint.timeout_s).
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import full_model_state
from pretrain.config import load_config
from pretrain.trainer import train
from tests.distributed.harness import run_distributed

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.hidden=64",
    "model.heads=2",
    "model.layers=2",
    "model.max_seq_len=64",
    "data.seq_len=64",
    "data.valid_fraction=0.05",
    "train.micro_batch=4",
    "train.global_batch=8",
    "train.precision=fp32",
    "train.log_every=1",
    "train.eval_every=100",
    "optim.warmup_steps=2",
    "checkpoint.every=2",
    "checkpoint.keep=5",
]


def _config(data: Path, out: Path, *extra: str):
    return load_config(
        REPO / "configs" / "tiny.yaml", [*TINY, f"data.path={data}", f"train.out_dir={out}", *extra]
    )


def _losses(result) -> list[float]:
    return [r["loss"] for r in result.history]


def test_async_saves_equal_sync_saves_and_resume_bitwise(small_dataset, tmp_path):
    sync = train(_config(small_dataset, tmp_path / "sync", "train.steps=6"))
    background = train(
        _config(small_dataset, tmp_path / "async", "train.steps=6", "checkpoint.async_save=true")
    )
    assert _losses(background) == _losses(sync)
    for step in ("step_000002", "step_000004", "step_000006"):
        a = full_model_state(tmp_path / "sync" / "checkpoints" / step)
        b = full_model_state(tmp_path / "async" / "checkpoints" / step)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (step, name)
    assert (tmp_path / "async" / "checkpoints" / "latest").read_text().strip() == "step_000006"
    # Resume from the background-written step 4: the last two steps as in the straight run.
    resumed = train(
        _config(
            small_dataset,
            tmp_path / "async",
            "train.steps=6",
            f"train.resume={tmp_path / 'async' / 'checkpoints' / 'step_000004'}",
        )
    )
    assert _losses(resumed) == _losses(sync)[4:]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failed_periodic_save_is_reported_and_training_goes_on(
    small_dataset, tmp_path, monkeypatch, capsys, mode
):
    """The save of step 4 fails as on a full disk; steps 2 and 6 are written. With
    checkpoint.fail_on_error=true the same failure ends the run."""
    import pretrain.checkpoint as checkpoint

    real_save = checkpoint._save_tensors

    def disk_full_at_step_4(tensors, path):
        if ".step_000004.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint, "_save_tensors", disk_full_at_step_4)
    extra = ["train.steps=6", f"checkpoint.async_save={mode == 'async'}"]
    result = train(_config(small_dataset, tmp_path / "run", *extra))
    assert result.exit_code == 0 and result.step == 6
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002", "step_000006"]
    out = capsys.readouterr().out
    assert "warning: a checkpoint was not written" in out and "No space left" in out
    assert "`latest` still names" in out and "step_000002" in out

    with pytest.raises(OSError, match="No space left"):
        train(_config(small_dataset, tmp_path / "strict", *extra, "checkpoint.fail_on_error=true"))
    strict = tmp_path / "strict" / "checkpoints"
    assert (strict / "latest").read_text().strip() == "step_000002"
    assert sorted(p.name for p in strict.iterdir()) == ["latest", "step_000002"]


def _slow_save_run(data: str, out: str) -> int:
    """Rank 0's fsync takes 45 s, three times parallel.timeout_s=15 (which the training
    collectives need on this shared machine), as on a slow parallel file system; the other
    rank waits for it in the save's agreement."""
    import torch.distributed as dist

    import pretrain.checkpoint as checkpoint

    real_fsync = checkpoint._fsync

    def slow(paths):
        paths = list(paths)
        if dist.get_rank() == 0 and any(p.name == "train_state.json" for p in paths):
            time.sleep(45)
        real_fsync(paths)

    checkpoint._fsync = slow
    config = _config(
        Path(data),
        Path(out),
        "train.steps=2",
        "parallel.timeout_s=15",
        "checkpoint.timeout_s=300",
        "train.eval_every=100",
    )
    return train(config).exit_code


@pytest.mark.slow
def test_a_save_slower_than_the_collective_timeout_does_not_end_the_job(small_dataset, tmp_path):
    """Before checkpoint.timeout_s the agreement after rank 0's fsync ran under
    parallel.timeout_s and the job failed with a collective timeout."""
    codes = run_distributed(_slow_save_run, 2, str(small_dataset), str(tmp_path / "run"))
    assert codes == [0, 0]
    latest = tmp_path / "run" / "checkpoints" / "latest"
    assert latest.read_text().strip() == "step_000002"
