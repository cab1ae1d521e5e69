"""`bert-plot RUN_DIR [RUN_DIR2] --out plot.png`: one PNG of a run's metrics.jsonl.

Six panels against the training step: loss and masked loss, held-out masked loss and accuracy,
learning rate, throughput (tokens/s, with MFU when the run logged it), loss scale and gradient
norm. A second run directory is drawn over the first in another colour, to compare two runs
(dense vs sparse MLM, two learning rates, before and after a change).

Needs matplotlib, an optional extra: `pip install -c constraints.txt -e '.[plot]'`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pretrain.metrics import read_records

FIGSIZE_IN = (15.0, 8.0)
DPI = 100  # so the PNG is FIGSIZE_IN * DPI = 1500 x 800 pixels
COLOURS = ("tab:blue", "tab:orange")


class PlotError(Exception):
    """A user mistake (a directory with no metrics, a missing extra); shown as one line."""


def load_run(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training and held-out records of a run directory's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir} has no metrics.jsonl: give a bert-train train.out_dir")
    records = read_records(path)
    train = [r for r in records if "split" not in r]
    valid = [r for r in records if r.get("split") == "valid"]
    if not train:
        raise PlotError(f"{path} has no training records yet")
    return train, valid


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key`, skipping records without a finite number for it."""
    points = [
        (r["step"], float(r[key]))
        for r in records
        if isinstance(r.get(key), (int, float)) and r[key] == r[key]  # NaN != NaN
    ]
    return [s for s, _ in points], [v for _, v in points]


def plot_runs(run_dirs: list[Path], out: Path) -> None:
    """Draw the runs into one PNG at `out`, written under a temporary name and renamed."""
    runs = [(run_dir, *load_run(run_dir)) for run_dir in run_dirs]
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(
            "matplotlib is not installed: pip install -c constraints.txt -e '.[plot]'"
        ) from None
    figure = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    axes = figure.subplots(2, 3)
    loss, held_out, lr = axes[0]
    throughput, scale, grad_norm = axes[1]
    held_out_acc = held_out.twinx()
    mfu_axis = throughput.twinx()
    for colour, (run_dir, train, valid) in zip(COLOURS, runs, strict=False):
        name = run_dir.resolve().name
        loss.plot(*_series(train, "loss"), color=colour, label=f"{name} loss")
        loss.plot(*_series(train, "masked_loss"), color=colour, ls="--", label=f"{name} masked")
        held_out.plot(*_series(valid, "masked_loss"), "o-", color=colour, label=f"{name} loss")
        held_out_acc.plot(*_series(valid, "mlm_acc"), "s:", color=colour, label=f"{name} accuracy")
        lr.plot(*_series(train, "lr"), color=colour, label=name)
        throughput.plot(*_series(train, "tokens_per_s"), color=colour, label=f"{name} tokens/s")
        steps, mfu = _series(train, "mfu")
        mfu_axis.plot(steps, [100 * m for m in mfu], ":", color=colour, label=f"{name} MFU")
        scale.plot(*_series(train, "loss_scale"), color=colour, label=name)
        grad_norm.plot(*_series(train, "grad_norm"), color=colour, label=name)
    loss.set_title("training loss (solid) and masked loss (dashed)")
    held_out.set_title("held-out masked loss (o) and accuracy (s)")
    held_out.set_ylabel("masked loss")
    held_out_acc.set_ylabel("accuracy")
    lr.set_title("learning rate")
    throughput.set_title("throughput (solid) and MFU (dotted)")
    throughput.set_ylabel("tokens/s")
    mfu_axis.set_ylabel("MFU %")
    scale.set_title("loss scale")
    scale.set_yscale("log", base=2)
    grad_norm.set_title("gradient norm (before clipping)")
    for axis in (loss, held_out, lr, throughput, scale, grad_norm):
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    loss.legend(fontsize="small")
    lr.legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp")
    figure.savefig(temp, format="png", dpi=DPI)
    temp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bert-plot",
        description="Plot a run's metrics.jsonl (loss, held-out accuracy, learning rate, "
        "throughput, loss scale) into one PNG; give two run directories to compare them.",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="train.out_dir")
    parser.add_argument("--out", type=Path, default=Path("plot.png"), help="PNG to write")
    args = parser.parse_args(argv)
    if len(args.runs) > len(COLOURS):
        parser.error(f"at most {len(COLOURS)} run directories")
    try:
        plot_runs(args.runs, args.out)
    except PlotError as error:
        print(f"bert-plot: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"bert-plot: error: {error}", file=sys.stderr)
        return 1
    print(f"bert-plot: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
