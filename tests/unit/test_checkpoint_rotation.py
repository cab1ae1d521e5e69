"""Checkpoint rotation keeps the newest finite checkpoint; rewriting a step never tears it.

Oracle: directories laid out as `save_checkpoint` writes them (COMPLETE marker and
train_state.json with the trainer's `finite` flag); what survives `_prune` is listed by hand.
A step written twice with the old copy's deletion cut short must still be whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import COMPLETE, _prune, step_dir_name


def _fake_checkpoint(root: Path, step: int, finite: bool | None) -> None:
    path = root / step_dir_name(step)
    path.mkdir(parents=True)
    state = {"step": step} if finite is None else {"step": step, "finite": finite}
    (path / "train_state.json").write_text(json.dumps(state))
    (path / COMPLETE).write_text("ok\n")


def _left(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_rotation_keeps_the_newest_finite_checkpoint(tmp_path):
    for step, finite in ((2, True), (4, True), (6, False), (8, False)):
        _fake_checkpoint(tmp_path, step, finite)
    _prune(tmp_path, keep=2)
    assert _left(tmp_path) == ["step_000004", "step_000006", "step_000008"]
    _fake_checkpoint(tmp_path, 10, True)
    _prune(tmp_path, keep=2)  # a finite one among the newest two: plain rotation
    assert _left(tmp_path) == ["step_000008", "step_000010"]


def test_checkpoints_without_the_flag_count_as_finite(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step, None)
    _prune(tmp_path, keep=1)
    assert _left(tmp_path) == ["step_000003"]


def test_rewriting_a_step_keeps_a_whole_copy_whatever_the_kill(tmp_path, monkeypatch):
    """The same step written twice (a resumed run's final save), with the deletion of the old
    copy cut after one file (as by kill -9). Before, the old copy was deleted in place first:
    the cut left `step_000001` marked COMPLETE with a weight file missing. Now the old copy is
    renamed aside first, so the step is the new, whole copy (oracle: its checksums) and only a
    `.trash-*` name is left for the next run to sweep."""
    import shutil

    import pretrain.checkpoint as checkpoint

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    checkpoint.save_checkpoint(tmp_path, 1, model, optimizer, {"finite": True}, keep=2)
    with torch.no_grad():
        model.weight.add_(1.0)

    def killed_midway(path, ignore_errors=False):
        next(Path(path).glob("*.safetensors")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 1, model, optimizer, {"finite": True}, keep=2)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", shutil.rmtree)
    step = tmp_path / step_dir_name(1)
    assert checkpoint.verify_checkpoint(step) is None
    assert torch.equal(checkpoint.full_model_state(step)["weight"], model.weight)
    assert [p.name.startswith(".trash-step_000001") for p in tmp_path.glob(".trash-*")] == [True]
