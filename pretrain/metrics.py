"""`metrics.jsonl` (+ TensorBoard when installed) and the console log line.

Written by global rank 0 only. On resume, lines whose `step` lies beyond the checkpoint are
dropped before appending, so the file reads as one uninterrupted run (DESIGN.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, out_dir: Path, resume_step: int | None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._tensorboard = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # tensorboard is an optional extra
            self._tensorboard = None

    def _truncate(self, resume_step: int | None) -> None:
        if not self.path.exists():
            return
        if resume_step is None:
            self.path.unlink()
            return
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _json_number(v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self._tensorboard is not None:
            prefix = "valid/" if record.get("split") == "valid" else "train/"
            for key, value in clean.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tensorboard.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, skipping a last line cut by a hard kill."""
    records = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a cut line, or the empty string after the last newline
            continue
    return records


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def format_line(record: dict[str, Any]) -> str:
    """A compact console line: `step 40 | loss 7.12 | masked 7.50 | acc 0.061 | ...`."""
    order = [
        ("loss", "loss", "{:.4f}"),
        ("masked_loss", "masked", "{:.4f}"),
        ("mlm_acc", "acc", "{:.3f}"),
        ("lr", "lr", "{:.2e}"),
        ("grad_norm", "gnorm", "{:.2f}"),
        ("loss_scale", "scale", "{:.0f}"),
        ("tokens_per_s", "tok/s", "{:.0f}"),
        ("tflops", "TFLOP/s", "{:.4f}"),
        ("mem_gb", "mem GB", "{:.2f}"),
        ("mem_peak_max_gb", "peak GB", "{:.2f}"),
    ]
    parts = [f"{record.get('split', 'train')} step {record['step']}"]
    for key, label, fmt in order:
        if key in record and isinstance(record[key], (int, float)):
            parts.append(f"{label} {fmt.format(record[key])}")
    if record.get("skipped"):
        parts.append("SKIPPED (fp16 overflow)")
    return " | ".join(parts)
