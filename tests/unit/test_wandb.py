"""Weights & Biases as an optional logger (`train.wandb_project`).

wandb is not in the dev extra (0.31 pulls ~15 packages, OpenTelemetry among them, and starts a
service process per run), so CI checks the contract without it: asking for it without the
package is one line on every rank. Where wandb is installed, an offline run (WANDB_MODE=offline,
no network) must record our scalars in its run file (wandb 0.31 ships no reader for it; the
protobuf records hold the keys as plain strings).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.config import ConfigError
from pretrain.metrics import MetricsLog

REPO = Path(__file__).resolve().parents[2]


def test_wandb_project_without_wandb_is_one_line(small_dataset: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['wandb'] = None  # what the import system sees when wandb is absent\n"
        "from pretrain.__main__ import main\n"
        f"sys.exit(main(['--config', 'configs/tiny.yaml', 'data.path={small_dataset}',\n"
        f"               'train.out_dir={tmp_path}', 'train.wandb_project=bert']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr == (
        "bert-train: error: train.wandb_project=bert but wandb is not installed: "
        "pip install wandb, or unset train.wandb_project\n"
    )


def test_metrics_log_refuses_wandb_project_without_wandb(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="wandb is not installed: pip install wandb"):
        MetricsLog(tmp_path, resume_step=None, enabled=False, wandb_project="bert")


def test_offline_wandb_run_records_scalars(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path, resume_step=None, wandb_project="bert", run_config={"a": 1})
    log.write({"step": 1, "loss": 7.5, "mfu": 0.25})
    log.write({"step": 2, "loss": 7.25, "mfu": None})
    log.write({"split": "valid", "step": 2, "mlm_acc": 0.125})
    log.close()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    keys = (b"train/loss", b"train/mfu", b"valid/mlm_acc")
    deadline = time.monotonic() + 30  # wandb's service process may still be writing the file
    while not all(key in run_file.read_bytes() for key in keys) and time.monotonic() < deadline:
        time.sleep(0.2)
    data = run_file.read_bytes()  # protobuf records: the keys are stored as plain strings
    for key in keys:
        assert key in data, key
