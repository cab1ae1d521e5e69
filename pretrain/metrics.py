"""`metrics.jsonl` (+ TensorBoard when installed, + Weights & Biases when asked) and the log line.

Written by global rank 0 only. On resume, lines whose `step` lies beyond the checkpoint are
dropped before appending, so the file reads as one uninterrupted run (docs/design.md).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from pretrain.config import ConfigError, write_text_atomic
from pretrain.progress import format_duration


class MetricsLog:
    def __init__(
        self,
        out_dir: Path,
        resume_step: int | None,
        enabled: bool = True,
        wandb_project: str | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._tensorboard = None
        self._wandb = None
        if wandb_project and importlib.util.find_spec("wandb") is None:  # on every rank
            raise ConfigError(
                f"train.wandb_project={wandb_project} but wandb is not installed: "
                "pip install wandb, or unset train.wandb_project"
            )
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # tensorboard is an optional extra
            self._tensorboard = None
        if wandb_project:
            import wandb

            # One wandb run per job segment, grouped under the run directory's name.
            self._wandb = wandb.init(
                project=wandb_project,
                dir=str(out_dir),
                name=out_dir.resolve().name,
                group=out_dir.resolve().name,
                config=run_config,
            )

    def _truncate(self, resume_step: int | None) -> None:
        if not self.path.exists():
            return
        if resume_step is None:
            self.path.unlink()
            return
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step]
        # Atomic: a kill during the rewrite leaves the old history, never an empty file.
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _json_number(v) for k, v in record.items()}
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(clean) + "\n")
        except OSError as error:  # a failed write() names no file
            raise OSError(error.errno, error.strerror, str(self.path)) from None
        prefix = "valid/" if record.get("split") == "valid" else "train/"
        scalars = {
            prefix + key: value
            for key, value in clean.items()
            if isinstance(value, (int, float)) and key != "step"
        }
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


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
    """A compact console line:
    `train step 40/300 | loss 7.12 | masked 7.50 | acc 0.061 | ... | 85 ms/step | ETA 3m05s`."""
    order = [
        ("loss", "loss", "{:.4f}"),
        ("masked_loss", "masked", "{:.4f}"),
        ("mlm_acc", "acc", "{:.3f}"),
        ("lr", "lr", "{:.2e}"),
        ("grad_norm", "gnorm", "{:.2f}"),
        ("loss_scale", "scale", "{:.0f}"),
        ("ms_per_step", "ms/step", "{:.0f}"),
        ("tokens_per_s", "tok/s", "{:.0f}"),
        ("tflops", "TFLOP/s", "{:.4f}"),
        ("mem_gb", "mem GB", "{:.2f}"),
        ("mem_peak_max_gb", "peak GB", "{:.2f}"),
    ]
    step = f"{record['step']}"
    if "steps_total" in record:
        step += f"/{record['steps_total']}"
    parts = [f"{record.get('split', 'train')} step {step}"]
    for key, label, fmt in order:
        if key in record and isinstance(record[key], (int, float)):
            parts.append(f"{label} {fmt.format(record[key])}")
    if isinstance(record.get("mfu"), float):
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if isinstance(record.get("eta_s"), float):
        parts.append(f"ETA {format_duration(record['eta_s'])}")
    if record.get("skipped"):
        parts.append("SKIPPED (non-finite loss or gradients)")
    return " | ".join(parts)
