"""A run a user can read: progress fields in metrics.jsonl, the ETA's parts and the summary.

Oracles: the run's own clock (the interval times in metrics.jsonl add up to the summary's
training time, and training + evaluation + checkpoints fit inside the wall time), the CPU peak
read back from the cache file (MFU = achieved FLOP/s per device / that peak, exactly), and
`flops_per_step` (checked against torch's FlopCounterMode in tests/unit/test_flops.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.devices import cache_path
from pretrain.progress import SUMMARY_FILE
from pretrain.trainer import print_summary, train

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.hidden=64",
    "model.heads=2",
    "model.layers=2",
    "model.max_seq_len=64",
    "data.seq_len=64",
    "data.valid_fraction=0.05",
    "train.micro_batch=4",
    "train.global_batch=8",
    "train.precision=fp32",
    "train.log_every=2",
    "train.eval_every=3",
    "train.eval_batches=2",
    "optim.warmup_steps=2",
    "checkpoint.every=4",
    "train.steps=8",
]


def test_progress_fields_mfu_and_summary(small_dataset, tmp_path, capsys):
    config = load_config(
        REPO / "configs" / "tiny.yaml",
        [*TINY, f"data.path={small_dataset}", f"train.out_dir={tmp_path}"],
    )
    result = train(config)
    print_summary(result)
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "split" not in r]
    assert [r["step"] for r in train_records] == [2, 4, 6, 8]

    peaks = json.loads(cache_path().read_text())
    # This process's entry: other tests of the session may have cached other thread counts.
    this = f"|threads={torch.get_num_threads()}|fp32|"
    (peak,) = [rate for key, rate in peaks.items() if this in key]
    for r in train_records:
        assert r["steps_total"] == 8
        assert r["ms_per_step"] * 2 / 1000 == pytest.approx(r["elapsed_s"], rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops"] * 1e12 / peak, rel=1e-9)
        assert 0 < r["mfu"] < 1
        assert r["loss_scale"] == 1.0  # fp32: no loss scaling
        assert r["eta_s"] >= 0
        assert f"train step {r['step']}/8 |" in printed
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())

    # The ETA's parts, worked out from the schedule: logs at 2, 4, 6, 8 (each before that
    # step's own evaluation and checkpoint), evaluations at 3, 6, 8 (e3, e6, e8), checkpoints
    # at 4, 8 (c4, c8). eta(2) = 6 steps; eta(4) = 4 steps + 2 evaluations x e3;
    # eta(6) = 2 steps + 2 x e3 + 1 checkpoint x c4; eta(8) = mean(e3, e6) + c4. Solving for
    # e3, c4 and e6 from the logged ETAs, each must be a real duration, and with the final
    # evaluation and checkpoint they must add up to the summary's evaluation and checkpoint time.
    eta = {r["step"]: r["eta_s"] for r in train_records}
    ms = {r["step"]: r["ms_per_step"] / 1000 for r in train_records}
    assert eta[2] == pytest.approx(6 * ms[2], rel=1e-9)
    e3 = (eta[4] - 4 * ms[4]) / 2
    c4 = eta[6] - 2 * ms[6] - 2 * e3
    e6 = 2 * (eta[8] - c4) - e3
    assert e3 > 1e-6 and c4 > 1e-6 and e6 > 1e-6, (e3, c4, e6)
    assert summary["eval_s"] - e3 - e6 > 1e-6  # e8
    assert summary["checkpoint_s"] - c4 > 1e-6  # c8
    assert summary == result.summary
    assert summary["steps"] == 8
    assert summary["train_s"] == pytest.approx(sum(r["elapsed_s"] for r in train_records))
    tokens = sum(r["tokens_per_s"] * r["elapsed_s"] for r in train_records)
    assert summary["tokens"] == pytest.approx(tokens, rel=1e-9)
    assert summary["eval_s"] > 0 and summary["checkpoint_s"] > 0
    spent = summary["train_s"] + summary["eval_s"] + summary["checkpoint_s"]
    assert spent < summary["wall_s"]
    assert summary["mfu"] == pytest.approx(summary["tflops"] * 1e12 / peak, rel=1e-9)
    assert f"{summary['tokens']:,} tokens seen" in printed

    # TensorBoard (the dev extra installs it): the same numbers, read back from the events.
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for tag, rows, key in [
        ("train/loss", train_records, "loss"),
        ("train/mfu", train_records, "mfu"),
        ("train/eta_s", train_records, "eta_s"),
        ("valid/mlm_acc", [r for r in records if r.get("split") == "valid"], "mlm_acc"),
    ]:
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == [r["step"] for r in rows], tag
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6)


def test_first_intervals_are_compared_with_the_plan(small_dataset, tmp_path, capsys):
    """train.cluster=cpu with a stored calibration: the start-up line gives bert-plan's memory
    and step time for the run's own layout, and the first two log intervals (not the third)
    print them next to what was measured, with the deviation computed from the logged figures."""
    import re

    from pretrain.config import resolve_model_shape
    from pretrain.plan import StartupPrediction, startup_prediction
    from pretrain.plan_measure import Calibration, _key, _store

    for threads in {1, torch.get_num_threads()}:  # whatever count this process's rank gets
        _store(
            _key("cpu", "fp32", threads),
            Calibration(threads, 1e11, 0.5, 1e10, 1e9, 1e-4, 1e9),
        )
    overrides = [*TINY, "train.log_every=1", "train.eval_every=100", "train.steps=3"]
    config = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            *overrides,
            "train.cluster=cpu",
            f"data.path={small_dataset}",
            f"train.out_dir={tmp_path}",
        ],
    )
    train(config)
    printed = capsys.readouterr().out
    start = re.search(r"plan: predicted ([\d.]+) GiB per rank and ([\d.]+) ms per step", printed)
    assert start is not None, printed
    compared = re.findall(
        r"plan vs measured at step (\d+): ([\d.]+) ms predicted, ([\d.]+) ms measured per step "
        r"\(measured ([+-]\d+)%\); ([\d.]+) GiB predicted, ([\d.]+) GiB peak measured",
        printed,
    )
    assert [int(c[0]) for c in compared] == [1, 2]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for (step, predicted_ms, measured_ms, deviation, predicted_gib, peak_gib), record in zip(
        compared, records, strict=False
    ):
        assert record["step"] == int(step)
        assert float(predicted_ms) == pytest.approx(float(start[2]), rel=1e-2)
        assert float(predicted_gib) == float(start[1])
        assert float(measured_ms) == pytest.approx(record["ms_per_step"], rel=1e-2, abs=0.1)
        expected = 100 * (record["ms_per_step"] / float(predicted_ms) - 1)
        assert int(deviation) == pytest.approx(expected, abs=2)
        assert float(peak_gib) == pytest.approx(record["mem_peak_max_gb"] * 1e9 / 1024**3, abs=0.01)
    # Without a cluster and without a GPU there is nothing to compare with.
    config.train.cluster = None
    assert startup_prediction(config, resolve_model_shape(config, 1000), None, "cpu") == (
        StartupPrediction("plan: no prediction (set train.cluster to a cluster bert-plan knows)")
    )
