"""ETA arithmetic and the log line.

Oracle: hand-counted schedules (which steps evaluate and checkpoint) and durations fed to the
clock, so every expected ETA below is worked out by hand in its comment.
"""

from __future__ import annotations

import pytest

from pretrain.metrics import format_line
from pretrain.progress import RunClock, events_due, format_duration, summary_line


@pytest.mark.parametrize(
    "step, total, every, due",
    [
        (0, 10, 3, 4),  # 3, 6, 9 and the final 10
        (3, 10, 3, 3),  # 6, 9, 10
        (9, 10, 3, 1),  # 10
        (10, 10, 3, 0),
        (0, 9, 3, 3),  # 3, 6, 9 (9 is both)
        (8, 9, 3, 1),
        (0, 10, 100, 1),  # only the final one
    ],
)
def test_events_due(step: int, total: int, every: int, due: int) -> None:
    assert events_due(step, total, every) == due


def test_eta_counts_steps_evaluations_and_checkpoints() -> None:
    clock = RunClock(total_steps=100, eval_every=20, checkpoint_every=50, peak_flops=None)
    assert clock.eta_s(0) == 0.0  # nothing measured yet
    clock.add_train(seconds=10.0, steps=10, tokens=1000, flops=1e9)
    # 90 steps x 1 s; nothing evaluated or checkpointed yet, so those count 0.
    assert clock.eta_s(10) == pytest.approx(90.0)
    clock.add_train(seconds=5.0, steps=10, tokens=1000, flops=1e9)
    clock.add_eval(4.0)
    clock.add_eval(6.0)
    clock.add_checkpoint(30.0)
    # At step 20 (logged before its own evaluation): 80 steps x 0.5 s (the last interval),
    # evaluations at 20, 40, 60, 80, 100 x 5 s mean, checkpoints at 50 and 100 x 30 s.
    assert clock.eta_s(20) == pytest.approx(80 * 0.5 + 5 * 5.0 + 2 * 30.0)
    # At the last step only its own evaluation and checkpoint remain.
    assert clock.eta_s(100) == pytest.approx(5.0 + 30.0)
    no_eval = RunClock(total_steps=100, eval_every=None, checkpoint_every=50, peak_flops=None)
    no_eval.add_train(seconds=1.0, steps=1, tokens=1, flops=1.0)
    no_eval.add_eval(100.0)  # ignored: the run has no held-out set
    assert no_eval.eta_s(99) == pytest.approx(1.0)


def test_mfu_and_summary() -> None:
    clock = RunClock(
        total_steps=4, eval_every=None, checkpoint_every=4, peak_flops=1e12, world_size=2
    )
    clock.add_train(seconds=2.0, steps=2, tokens=600, flops=1e12)
    clock.add_train(seconds=2.0, steps=2, tokens=200, flops=3e12)
    assert clock.mfu(1e12, 2.0) == pytest.approx(0.25)  # 0.5e12 FLOP/s per device of 2
    summary = clock.summary(4)
    assert summary["tokens"] == 800
    assert summary["tokens_per_s"] == pytest.approx(200.0)
    assert summary["mfu"] == pytest.approx(4e12 / 4.0 / 2 / 1e12)
    assert summary["train_s"] == 4.0 and summary["steps"] == 4
    assert "800 tokens seen" in summary_line(summary)
    assert "MFU 50.0%" in summary_line(summary)


def test_log_line_shows_progress_fields() -> None:
    record = {
        "step": 40,
        "steps_total": 1000,
        "loss": 7.1,
        "loss_scale": 65536.0,
        "ms_per_step": 85.2,
        "tokens_per_s": 9000.0,
        "mfu": 0.123,
        "eta_s": 3725.0,
    }
    line = format_line(record)
    assert line.startswith("train step 40/1000 | loss 7.1000")
    for part in ("scale 65536", "ms/step 85", "tok/s 9000", "MFU 12.3%", "ETA 1h02m"):
        assert part in line
    assert format_duration(185) == "3m05s" and format_duration(12.4) == "12s"
