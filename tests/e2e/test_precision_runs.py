"""Precision end to end on one process: `auto` resolution, the bf16 refusal on a (simulated)
V100, a resume in another precision, and the divergence stop.

Oracles: the run's own outputs read back (config.yaml, train_state.json, the safetensors of the
newest checkpoint), the rule of `pretrain.precision.choose_precision` applied to this machine,
and the one-line / exit-code contract of the README.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from pretrain import __main__ as cli
from pretrain.checkpoint import latest_checkpoint
from pretrain.config import load_config
from pretrain.precision import choose_precision, cpu_flags
from pretrain.trainer import EXIT_DIVERGED, train

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.hidden=32",
    "model.heads=2",
    "model.layers=1",
    "model.max_seq_len=32",
    "data.seq_len=32",
    "train.micro_batch=4",
    "train.global_batch=4",
    "train.log_every=1",
    "train.eval_every=100",
    "optim.warmup_steps=0",
]


def _config(data: Path, out: Path, *extra: str):
    return load_config(
        REPO / "configs" / "tiny.yaml", [*TINY, f"data.path={data}", f"train.out_dir={out}", *extra]
    )


def test_auto_is_resolved_once_and_recorded(small_dataset, tmp_path, capsys):
    """config.yaml, the checkpoint and the start-up lines carry the resolved precision; a resume
    in another precision says so in one line and starts the loss scaler afresh."""
    expected = choose_precision("cpu", None, cpu_flags())
    out = tmp_path / "run"
    result = train(_config(small_dataset, out, "train.steps=2", "checkpoint.every=2"))
    assert result.exit_code == 0
    logged = capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["precision"] == expected
    state = json.loads((result.checkpoint / "train_state.json").read_text())
    assert state["config"]["train"]["precision"] == expected and state["finite"] is True
    assert f"precision {expected}: " in logged and "(auto: CPU " in logged
    head = f"MLM head (decoder + cross-entropy) GEMMs in {expected}, softmax and loss fp32"
    assert head in logged

    # Resume the same run in fp16: one line names both precisions; the scale starts at init.
    result = train(
        _config(
            small_dataset,
            out,
            "train.steps=3",
            "checkpoint.every=3",
            "train.precision=fp16",
            "train.loss_scale_init=256",
        )
    )
    logged = capsys.readouterr().out
    assert result.exit_code == 0
    lines = [line for line in logged.splitlines() if "the loss scaler starts afresh" in line]
    assert lines == [
        f"precision: the checkpoint was trained in {expected}, this run uses fp16 (as "
        "configured); the loss scaler starts afresh"
    ]
    assert result.history[-1]["loss_scale"] in (256.0, 128.0)  # 128 if step 3 overflowed


def test_loss_scale_keys_reach_the_scaler(small_dataset, tmp_path):
    """train.loss_scale_init and train.loss_scale_window as a user sets them: the logged scale
    (the one each step used) starts at 256 and doubles after every 2 clean steps, the
    DynamicLossScaler rule; a tiny model at these scales does not overflow in fp16."""
    result = train(
        _config(
            small_dataset,
            tmp_path / "run",
            "train.precision=fp16",
            "train.loss_scale_init=256",
            "train.loss_scale_window=2",
            "train.steps=5",
            "checkpoint.every=5",
        )
    )
    assert result.exit_code == 0
    assert not any(r.get("skipped") for r in result.history)
    assert [r["loss_scale"] for r in result.history] == [256.0, 256.0, 512.0, 512.0, 1024.0]


def test_bert_train_refuses_bf16_on_a_capability_7_gpu(
    small_dataset, tmp_path, capsys, monkeypatch
):
    """A simulated V100: CUDA availability and the capability query patched at torch's
    boundary (one process, so no NCCL group is created). Explicit bf16 ends in one line naming
    auto/fp16 with exit code 2, before any data is read."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    args = [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        f"data.path={small_dataset}",
        f"train.out_dir={tmp_path}",
        "train.precision=bf16",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "bert-train: error: train.precision=bf16: bf16 on a GPU of compute capability 7.0 (below "
        "8.0, e.g. V100) is emulated and slow: use precision auto or fp16"
    ]
    assert not (tmp_path / "config.yaml").exists()


def test_diverging_fp32_run_stops_and_keeps_a_finite_checkpoint(small_dataset, tmp_path, capsys):
    """optim.lr=1e6: the loss turns NaN within a few steps. No non-finite step is applied;
    after train.max_bad_steps of them the run checkpoints, prints one line and exits with
    EXIT_DIVERGED (not 75, which job scripts resubmit). The newest checkpoint, read back, is
    finite, and rotation (keep=1) left it in place."""
    out = tmp_path / "run"
    result = train(
        _config(
            small_dataset,
            out,
            "train.precision=fp32",
            "optim.lr=1e6",
            "train.steps=200",
            "train.max_bad_steps=4",
            "checkpoint.every=2",
            "checkpoint.keep=1",
        )
    )
    assert result.exit_code == EXIT_DIVERGED != 75
    assert result.step < 200
    skipped = [bool(r.get("skipped")) for r in result.history]
    assert skipped[-4:] == [True] * 4
    logged = capsys.readouterr().out
    stops = [line for line in logged.splitlines() if line.startswith("stopping at step")]
    assert len(stops) == 1 and "train.max_bad_steps=4" in stops[0]
    newest = latest_checkpoint(out / "checkpoints")
    assert newest == result.checkpoint
    weights = load_file(str(newest / "model_tp00.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert json.loads((newest / "train_state.json").read_text())["finite"] is True


def test_a_step_that_overflows_the_weights_leaves_a_finite_checkpoint_named(
    small_dataset, tmp_path, capsys
):
    """A finite step can still overflow the weights: resumed at optim.lr=1e39, step 3's
    gradients are finite, so it is applied and the weights become inf; the later steps are
    non-finite and the run stops (max_bad_steps=2) with a checkpoint that is not finite.
    Oracle: the checkpoints read back. Rotation (keep=1) kept step 2, the newest finite one,
    and the stop line names it for train.resume, since `latest` names the non-finite one."""
    out = tmp_path / "run"
    assert train(_config(small_dataset, out, "train.steps=2", "checkpoint.every=2")).exit_code == 0
    capsys.readouterr()
    result = train(
        _config(
            small_dataset,
            out,
            "train.precision=fp32",
            "optim.lr=1e39",
            "train.resume_changes=allow",
            "train.steps=20",
            "train.max_bad_steps=2",
            "checkpoint.every=1",
            "checkpoint.keep=1",
        )
    )
    assert result.exit_code == EXIT_DIVERGED
    finite = out / "checkpoints" / "step_000002"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [
        finite.name,
        result.checkpoint.name,
    ]
    assert json.loads((result.checkpoint / "train_state.json").read_text())["finite"] is False
    assert json.loads((finite / "train_state.json").read_text())["finite"] is True
    weights = load_file(str(finite / "model_tp00.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    stops = [line for line in capsys.readouterr().out.splitlines() if "exit code 3" in line]
    assert len(stops) == 1
    assert stops[0].endswith(f"resume from the newest finite one with train.resume={finite}")


def test_fp16_overflow_at_the_scale_floor_stops_the_run(small_dataset, tmp_path, capsys):
    """fp16 with the scale already at its floor (init = min = 1) and a diverging rate: the
    first overflow cannot be cured by backing off, so the run stops at once with EXIT_DIVERGED
    and a finite checkpoint, instead of skipping every later step silently."""
    out = tmp_path / "run"
    result = train(
        _config(
            small_dataset,
            out,
            "train.precision=fp16",
            "optim.lr=1e6",
            "train.steps=100",
            "train.loss_scale_init=1",
            "train.loss_scale_min=1",
            "checkpoint.every=100",
        )
    )
    assert result.exit_code == EXIT_DIVERGED
    assert [bool(r.get("skipped")) for r in result.history].count(True) == 1
    assert result.history[-1]["skipped"] and result.history[-1]["loss_scale"] == 1.0
    stops = [line for line in capsys.readouterr().out.splitlines() if "exit code 3" in line]
    assert len(stops) == 1 and "train.loss_scale_min=1" in stops[0]
    weights = load_file(str(result.checkpoint / "model_tp00.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
