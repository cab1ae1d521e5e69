"""Checkpoint rotation keeps the newest finite checkpoint.

Oracle: directories laid out as `save_checkpoint` writes them (COMPLETE marker and
train_state.json with the trainer's `finite` flag); what survives `_prune` is listed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

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
