"""Memory in a real training run: the estimate at start-up, memory in metrics.jsonl and the log
line, and the one-line refusal of a config whose estimate exceeds the device.

Oracles: the process's own /proc/self/status (resident memory must be in the range the record
reports), the estimator's numbers for the same config, and the one-line error contract.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from pretrain.__main__ import main
from pretrain.config import load_config, resolve_model_shape
from pretrain.memory import GiB, Layout, estimate_memory
from pretrain.trainer import train

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.hidden=64",
    "model.heads=2",
    "model.layers=2",
    "model.max_seq_len=64",
    "data.seq_len=64",
    "train.micro_batch=4",
    "train.global_batch=8",
    "train.precision=fp32",
    "train.log_every=1",
    "train.steps=2",
    "checkpoint.every=100",
]


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_memory_in_log_and_metrics(small_dataset: Path, tmp_path: Path, capsys):
    """On the CPU each record carries the resident memory (GB), its high-water mark and that
    mark's maximum over ranks (one rank here: equal); the log line shows them; the start-up
    prints the estimate's table."""
    config = load_config(
        REPO / "configs" / "tiny.yaml",
        [*TINY, f"data.path={small_dataset}", f"train.out_dir={tmp_path}"],
    )
    train(config)
    out = capsys.readouterr().out
    assert "estimated memory per rank:" in out and "head_grads" in out
    assert "| mem GB " in out and "| peak GB " in out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "split" not in r]
    assert len(train_records) == 2
    now = _rss() / 1e9
    for record in train_records:
        assert 0.05 < record["mem_gb"] <= record["mem_peak_gb"] == record["mem_peak_max_gb"]
        assert record["mem_peak_gb"] < 2 * now  # the same process, a moment earlier


def test_estimate_over_device_memory_is_refused(small_dataset: Path, tmp_path: Path, capsys):
    """A micro-batch whose estimate exceeds the host's memory (the CPU 'device'): exit 2 and one
    line with the estimate and the keys to change, before the model is built."""
    huge = ["train.micro_batch=65536", "train.global_batch=65536"]
    args = [*TINY, *huge, f"data.path={small_dataset}", f"train.out_dir={tmp_path}"]
    assert main(["--config", str(REPO / "configs" / "tiny.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "train.micro_batch=65536" in err[0] and "train.skip_memory_check=true" in err[0]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_estimate_memory_option(capsys):
    """`bert-train --estimate-memory` prints the same total as the estimator for that layout and
    exits 1 when it does not fit the given GPU memory."""
    config = str(REPO / "configs" / "xlarge.yaml")
    assert main(["--config", config, "--estimate-memory", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    shape = resolve_model_shape(load_config(config), 32768)
    layout = Layout(seq_len=128, micro_batch=64, dp=8, precision="bf16", accumulation=16)
    total = estimate_memory(shape, layout).total
    assert f"{total / GiB:8.2f} GiB" in out
    assert main(["--config", config, "--estimate-memory", "--gpu-memory-gib", "16"]) == 1


def test_out_of_memory_in_a_step_becomes_one_line(
    small_dataset: Path, tmp_path: Path, capsys, monkeypatch
):
    """A CUDA out-of-memory error raised inside a training step (injected: this machine has no
    GPU, and the CPU has no out-of-memory exception to trigger) ends bert-train with exit 2 and
    one line naming the layout keys and the estimate of the running config, no traceback."""
    from pretrain.objectives import PretrainingLoss

    def out_of_memory(self, batch):  # noqa: ANN001, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(PretrainingLoss, "forward", out_of_memory)
    args = [*TINY, f"data.path={small_dataset}", f"train.out_dir={tmp_path}"]
    assert main(["--config", str(REPO / "configs" / "tiny.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "ran out of memory" in err[0]
    for key in ("train.micro_batch=4", "train.recompute=none", "parallel.tp=1", "parallel.zero=0"):
        assert key in err[0]
    assert re.search(r"estimated peak \d+\.\d GiB per rank", err[0])


def test_skip_memory_check_starts_a_refused_config(
    small_dataset: Path, tmp_path: Path, capsys, monkeypatch
):
    """`train.skip_memory_check=true` trains a config whose estimate exceeds the device. The
    device is made smaller than the tiny run's estimate (1 MiB, injected: the host's real memory
    cannot be shrunk); without the key the same run is refused in one line (exit 2)."""
    import pretrain.memory

    monkeypatch.setattr(pretrain.memory, "device_memory_bytes", lambda device: 2**20)
    config = str(REPO / "configs" / "tiny.yaml")
    args = [*TINY, f"data.path={small_dataset}"]
    assert main(["--config", config, *args, f"train.out_dir={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exceeds the device's 0.0 GiB" in err[0]
    skip = [*args, f"train.out_dir={tmp_path / 'b'}", "train.skip_memory_check=true"]
    assert main(["--config", config, *skip]) == 0
    records = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in records if '"split"' not in r]) == 2
