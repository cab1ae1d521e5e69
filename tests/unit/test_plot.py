"""`bert-plot`: a PNG of the expected size, both runs drawn, one-line errors.

Oracles: the PNG read back by matplotlib's own reader (Pillow) and its IHDR header; the pixels
of the second run's colour (present only when a second run is given); and a real process in
which `import matplotlib` fails, for the error line a user without the extra sees.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.metrics import MetricsLog
from pretrain.plot import main

REPO = Path(__file__).resolve().parents[2]


def _write_run(out: Path, lr: float) -> Path:
    log = MetricsLog(out, resume_step=None)
    for step in range(10, 101, 10):
        log.write(
            {
                "step": step,
                "loss": 7 - step / 50,
                "masked_loss": 7.2 - step / 50,
                "lr": lr * step,
                "grad_norm": 1.0,
                "loss_scale": 2.0**16,
                "tokens_per_s": 9000.0 + step,
                "mfu": 0.3,
                "steps_total": 100,
            }
        )
        if step % 50 == 0:
            log.write({"split": "valid", "step": step, "masked_loss": 6.5, "mlm_acc": 0.1})
    log.close()
    return out


def _has_colour(image: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    pixels = (image[..., :3] * 255).round().astype(int)
    return bool((np.abs(pixels - np.array(rgb)).sum(axis=-1) <= 6).any())


def test_plot_one_and_two_runs(tmp_path: Path, capsys) -> None:
    imread = pytest.importorskip("matplotlib.image").imread

    a = _write_run(tmp_path / "dense", 1e-5)
    b = _write_run(tmp_path / "sparse", 2e-5)
    orange = (255, 127, 14)  # tab:orange, the second run's colour
    for runs, name in (([a], "one.png"), ([a, b], "two.png")):
        out = tmp_path / "plots" / name
        assert main([*map(str, runs), "--out", str(out)]) == 0
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        assert struct.unpack(">II", data[16:24]) == (1500, 800)
        image = imread(out)
        assert image.shape[:2] == (800, 1500)
        assert _has_colour(image, orange) == (len(runs) == 2)
    assert capsys.readouterr().out.strip().endswith("two.png")
    assert not list((tmp_path / "plots").glob(".*tmp"))


def test_plot_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path), "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"bert-plot: error: {tmp_path} has no metrics.jsonl: give a bert-train train.out_dir\n"
    )
    assert not (tmp_path / "p.png").exists()


def test_without_matplotlib_one_line(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", 1e-5)
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None  # what `import matplotlib` sees when it is absent\n"
        "from pretrain.plot import main\n"
        f"sys.exit(main([{str(run)!r}, '--out', {str(tmp_path / 'p.png')!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr == (
        "bert-plot: error: matplotlib is not installed: "
        "pip install -c constraints.txt -e '.[plot]'\n"
    )
    assert not (tmp_path / "p.png").exists()
