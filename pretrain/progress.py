"""Where a run's wall time goes, and how long it still needs: the ETA and the final summary.

The trainer times three kinds of work as they happen: training steps (per log interval),
evaluations and checkpoints. The ETA is

    remaining steps x the last interval's time per step
    + evaluations still due x the mean evaluation time so far
    + checkpoints still due x the mean checkpoint time so far

so a run whose checkpoints take minutes does not promise to end before it writes them. Until
the first evaluation (checkpoint) has been timed, its share of the ETA is zero.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def events_due(step: int, total: int, every: int) -> int:
    """How many of the steps after `step` up to `total` are multiples of `every`, counting
    `total` itself once either way (the trainer always evaluates and checkpoints at the end)."""
    if step >= total:
        return 0
    due = total // every - step // every
    return due if total % every == 0 else due + 1


@dataclass
class RunClock:
    """Measured durations of one job segment (seconds) and the ETA built from them."""

    total_steps: int
    eval_every: int | None
    """None when there is no held-out set (no evaluations)."""
    checkpoint_every: int
    peak_flops: float | None
    """One device's peak FLOP/s for the run's dtype (pretrain.devices); None = no MFU."""
    world_size: int = 1
    started: float = field(default_factory=time.perf_counter)
    train_s: float = 0.0
    train_steps: int = 0
    tokens: int = 0
    flops: float = 0.0
    eval_times: list[float] = field(default_factory=list)
    checkpoint_times: list[float] = field(default_factory=list)
    last_step_s: float | None = None

    def add_train(self, seconds: float, steps: int, tokens: int, flops: float) -> None:
        """One log interval: its training time, steps, tokens and model FLOPs (all devices)."""
        self.train_s += seconds
        self.train_steps += steps
        self.tokens += tokens
        self.flops += flops
        self.last_step_s = seconds / steps

    def mfu(self, flops: float, seconds: float) -> float | None:
        """Model FLOP utilisation: achieved FLOP/s per device over the device's peak."""
        if self.peak_flops is None or seconds <= 0:
            return None
        return flops / seconds / self.world_size / self.peak_flops

    def add_eval(self, seconds: float) -> None:
        self.eval_times.append(seconds)

    def add_checkpoint(self, seconds: float) -> None:
        self.checkpoint_times.append(seconds)

    def eta_s(self, step: int) -> float:
        """Seconds until the run ends, from `step` (after its log line, before its own
        evaluation and checkpoint, which are still due)."""
        eta = (self.total_steps - step) * (self.last_step_s or 0.0)
        if self.eval_every is not None and self.eval_times:
            mean = sum(self.eval_times) / len(self.eval_times)
            eta += events_due(step - 1, self.total_steps, self.eval_every) * mean
        if self.checkpoint_times:
            mean = sum(self.checkpoint_times) / len(self.checkpoint_times)
            eta += events_due(step - 1, self.total_steps, self.checkpoint_every) * mean
        return eta

    def summary(self, step: int) -> dict[str, float | int | None]:
        """The job segment's totals: wall time (from start-up, so it includes building the
        model and loading a checkpoint), where it went, tokens seen and the averages."""
        return {
            "step": step,
            "steps": self.train_steps,
            "wall_s": time.perf_counter() - self.started,
            "train_s": self.train_s,
            "eval_s": sum(self.eval_times),
            "checkpoint_s": sum(self.checkpoint_times),
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.train_s if self.train_s else None,
            "tflops": self.flops / self.train_s / self.world_size / 1e12 if self.train_s else None,
            "mfu": self.mfu(self.flops, self.train_s),
        }


def format_duration(seconds: float) -> str:
    """`1h02m`, `3m05s`, `12s`: short enough for a log line."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


SUMMARY_FILE = "summary.json"


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    """`summary.json` in the run directory: this job segment's totals (rewritten by each)."""
    temp = out_dir / f"{SUMMARY_FILE}.tmp"
    temp.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    temp.replace(out_dir / SUMMARY_FILE)


def summary_line(summary: dict[str, Any]) -> str:
    """`300 steps in 2m05s (training 1m50s, evaluation 5s, checkpoints 3s), ...`."""
    parts = [
        f"{summary['steps']} steps in {format_duration(summary['wall_s'])} "
        f"(training {format_duration(summary['train_s'])}, "
        f"evaluation {format_duration(summary['eval_s'])}, "
        f"checkpoints {format_duration(summary['checkpoint_s'])})",
        f"{summary['tokens']:,} tokens seen",
    ]
    if summary["tokens_per_s"] is not None:
        parts.append(f"{summary['tokens_per_s']:,.0f} tokens/s")
        parts.append(f"{summary['tflops']:.3g} TFLOP/s per device")
    if summary["mfu"] is not None:
        parts.append(f"MFU {100 * summary['mfu']:.1f}%")
    return ", ".join(parts)
