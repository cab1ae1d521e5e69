"""Pre-training end to end on one process: train → checkpoint → resume → init_from → errors.

Oracles: an uninterrupted run of the same config (resume must reproduce its losses and weights
bit for bit in fp32 on the CPU), the checkpoint's own files (init_from), and the one-line error
contract of docs/design.md (user mistakes never print a traceback).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch.signals import EXIT_RESUBMIT
from pretrain.checkpoint import full_model_state
from pretrain.config import load_config
from pretrain.trainer import train

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.hidden=64",
    "model.heads=2",
    "model.layers=2",
    "model.max_seq_len=64",
    "data.seq_len=64",
    "data.valid_fraction=0.05",
    "train.micro_batch=4",
    "train.global_batch=8",  # 2 accumulation steps
    "train.precision=fp32",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=2",
    "optim.warmup_steps=2",
    "checkpoint.every=3",
    "checkpoint.keep=5",
]


def _config(data: Path, out: Path, *extra: str):
    return load_config(
        REPO / "configs" / "tiny.yaml", [*TINY, f"data.path={data}", f"train.out_dir={out}", *extra]
    )


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return full_model_state(checkpoint)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_resume_reproduces_an_uninterrupted_run_bitwise(small_dataset, tmp_path, mode):
    """Stop after step 3 (wall-time budget → exit 75), resume, and compare with a straight run.

    Dropout is on, so the RNG state must be restored too; metrics.jsonl must read as one run.
    """
    straight = train(_config(small_dataset, tmp_path / "a", "train.steps=6", f"mlm.mode={mode}"))
    assert straight.exit_code == 0

    stopped = train(
        _config(
            small_dataset, tmp_path / "b", "train.steps=6", f"mlm.mode={mode}", "train.walltime_s=0"
        )
    )
    assert stopped.exit_code == EXIT_RESUBMIT and stopped.step == 1
    for _ in range(2):  # two more interruptions, then let it finish
        again = train(
            _config(
                small_dataset,
                tmp_path / "b",
                "train.steps=6",
                f"mlm.mode={mode}",
                "train.walltime_s=0",
            )
        )
        assert again.exit_code == EXIT_RESUBMIT
    resumed = train(_config(small_dataset, tmp_path / "b", "train.steps=6", f"mlm.mode={mode}"))
    assert resumed.exit_code == 0 and resumed.step == 6

    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    train_a = [(r["step"], r["loss"], r["grad_norm"]) for r in a if "split" not in r]
    train_b = [(r["step"], r["loss"], r["grad_norm"]) for r in b if "split" not in r]
    assert train_a == train_b  # exact equality, including the step numbering
    final_a = _weights(tmp_path / "a" / "checkpoints" / "step_000006")
    final_b = _weights(tmp_path / "b" / "checkpoints" / "step_000006")
    for name, tensor in final_a.items():
        assert torch.equal(tensor, final_b[name]), name


def test_metrics_fields_and_checkpoint_layout(small_dataset, tmp_path):
    """Every field docs/design.md names is logged; checkpoints are complete and pruned to `keep`."""
    result = train(_config(small_dataset, tmp_path, "train.steps=7", "checkpoint.keep=2"))
    records = _metrics(tmp_path)
    fields = {
        "step",
        "consumed_samples",
        "loss",
        "masked_loss",
        "mlm_acc",
        "lr",
        "grad_norm",
        "loss_scale",
        "tokens_per_s",
        "tflops",
        "elapsed_s",
    }
    train_records = [r for r in records if "split" not in r]
    assert [r["step"] for r in train_records] == list(range(1, 8))
    assert all(fields <= set(r) for r in train_records)
    assert train_records[-1]["consumed_samples"] == 7 * 8
    valid = [r for r in records if r.get("split") == "valid"]
    assert [r["step"] for r in valid] == [3, 6, 7]
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) == [
        "step_000006",
        "step_000007",
    ]
    assert (ckpt / "latest").read_text().strip() == "step_000007"
    state = json.loads((ckpt / "step_000007" / "train_state.json").read_text())
    assert state["step"] == 7 and state["consumed_samples"] == 56
    assert result.checkpoint == ckpt / "step_000007"
    assert (tmp_path / "config.yaml").is_file()


def test_incomplete_checkpoint_is_ignored(small_dataset, tmp_path):
    """A step directory without COMPLETE (a hard kill mid-write) is never resumed from."""
    train(_config(small_dataset, tmp_path, "train.steps=3"))
    ckpt = tmp_path / "checkpoints"
    broken = ckpt / "step_000009"
    shutil.copytree(ckpt / "step_000003", broken)
    (broken / "COMPLETE").unlink()
    (ckpt / "latest").write_text("step_000009\n")
    result = train(_config(small_dataset, tmp_path, "train.steps=4"))
    assert result.step == 4
    records = [r for r in _metrics(tmp_path) if "split" not in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # resumed from 3, not from 9


def test_init_from_checkpoint_and_hf_export(small_dataset, tmp_path):
    """init_from loads exactly the stored weights (ours and an HF export) with a fresh schedule."""
    from pretrain.export_hf import export_checkpoint
    from pretrain.model import build_model
    from pretrain.trainer import _init_weights_from

    train(_config(small_dataset, tmp_path / "p1", "train.steps=3"))
    ckpt = tmp_path / "p1" / "checkpoints" / "step_000003"
    export_checkpoint(ckpt, tmp_path / "hf")
    stored = _weights(ckpt)
    from pretrain.config import resolve_model_shape

    shape = resolve_model_shape(_config(small_dataset, tmp_path), vocab_size=1000)
    for source in (ckpt, tmp_path / "hf"):
        model = build_model(shape)
        _init_weights_from(str(source), model)
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, stored[name]), (source, name)

    phase2 = train(
        _config(small_dataset, tmp_path / "p2", "train.steps=2", f"train.init_from={ckpt}")
    )
    records = [r for r in _metrics(tmp_path / "p2") if "split" not in r]
    assert phase2.step == 2 and records[0]["step"] == 1  # fresh schedule, not step 4


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_pair_tasks_train(small_dataset, tmp_path, task):
    """NSP/SOP batches carry two segments and pair labels; the loss is finite and logged."""
    result = train(_config(small_dataset, tmp_path, "train.steps=2", f"mlm.pair_task={task}"))
    assert result.exit_code == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


def test_fp16_loss_scaling_runs(small_dataset, tmp_path):
    """fp16 autocast with dynamic loss scaling: steps run and the scale is logged (tiny shapes:
    fp16 matrix products are ~30x slower on these CPUs)."""
    result = train(_config(small_dataset, tmp_path, "train.steps=2", "train.precision=fp16"))
    assert result.exit_code == 0
    assert result.history[0]["loss_scale"] == 2.0**16 or result.history[0].get("skipped")


def _bert_train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pretrain", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_user_errors_are_one_line(small_dataset, tmp_path):
    """Bad keys, bad types, missing data, bad batch layout, another model's checkpoint."""
    train(_config(small_dataset, tmp_path / "run", "train.steps=1"))
    cases = [
        (["train.stepz=3"], "unknown key 'train.stepz'"),
        (["train.steps=ten"], "train.steps must be an integer"),
        ([f"data.path={tmp_path / 'nowhere'}"], "has no manifest.json"),
        (["train.global_batch=10"], "not a multiple"),
        (["model.hidden=128", f"train.out_dir={tmp_path / 'run'}"], "another model"),
    ]
    base = [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        *TINY,
        f"data.path={small_dataset}",
        f"train.out_dir={tmp_path / 'run'}",
        "train.steps=2",
    ]
    for overrides, fragment in cases:
        proc = _bert_train(*base, *overrides)
        assert proc.returncode == 2, (overrides, proc.stderr)
        assert fragment in proc.stderr, (overrides, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_deepspeed_launcher_local_rank_argument(small_dataset, tmp_path):
    """deepspeed's launcher exports RANK, WORLD_SIZE and the master, and passes the local rank
    as `--local_rank=N` in argv (the oracle: its launcher's documented contract). bert-train
    takes it as LOCAL_RANK; a disagreeing LOCAL_RANK is a one-line usage error."""
    base = [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        *TINY,
        f"data.path={small_dataset}",
        f"train.out_dir={tmp_path / 'run'}",
        "train.steps=1",
    ]
    with socket.socket() as probe:  # a free port for the one-process rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    launcher = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    environ = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "--local_rank=0", *base],
        cwd=REPO,
        env={**environ, **launcher, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "launcher torchrun: rank 0/1, local rank 0" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "--local_rank=1", *base],
        cwd=REPO,
        env={**environ, **launcher, "LOCAL_RANK": "0", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "--local_rank=1 but LOCAL_RANK=0" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_kernels_name_does_not_fool_transformers():
    """Our `kernels` package must not pass for Hugging Face's `kernels` library (docs/design.md)."""
    from transformers.utils.import_utils import is_kernels_available

    assert not is_kernels_available()


def test_blended_datasets_train_and_resume_exactly(small_dataset, tmp_path):
    """data.path as weight/path pairs: batches mix the datasets by weight, and a resumed run
    continues exactly (oracle: the uninterrupted blended run)."""
    from pretrain.data import open_training_data

    copy = tmp_path / "copy"
    shutil.copytree(small_dataset, copy)
    blend = f"data.path=[0.7, {small_dataset}, 0.3, {copy}]"
    config = _config(small_dataset, tmp_path / "a", "train.steps=4", blend)
    data = open_training_data(config.data.sources, None, 64, 0.05, config.mlm, 1)
    assert len(data.train) == 2 * len(data.train.parts[0])

    straight = train(config)
    stopped = train(
        _config(small_dataset, tmp_path / "b", "train.steps=4", blend, "train.walltime_s=0")
    )
    assert stopped.exit_code == EXIT_RESUBMIT
    resumed = train(_config(small_dataset, tmp_path / "b", "train.steps=4", blend))
    assert resumed.step == 4
    losses = [[r["loss"] for r in _metrics(tmp_path / d) if "split" not in r] for d in "ab"]
    assert losses[0] == losses[1]
    assert straight.exit_code == 0


def test_blending_datasets_of_different_tokenizers_is_refused(
    small_dataset, small_corpus, tmp_path
):
    from data_prep.encode import encode_corpus
    from data_prep.tokenizer import train_tokenizer

    train_tokenizer([small_corpus], tmp_path / "tok", "wordpiece", 900, lang="en")
    encode_corpus([small_corpus], tmp_path / "tok", tmp_path / "other", lang="en")
    proc = _bert_train(
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        *TINY,
        f"data.path=[0.5, {small_dataset}, 0.5, {tmp_path / 'other'}]",
        f"train.out_dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 2 and "another tokenizer" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_to_the_process_group_checkpoints(small_dataset, tmp_path, signum):
    """`scancel`, a preemption, `qdel`, Slurm's `--signal=USR1@margin` without B: and a
    terminal's process-group kill signal every process of the job, data-loader workers
    included: the run must still checkpoint and exit 75, not fail on a worker that died first."""
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "pretrain",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        *TINY,
        f"data.path={small_dataset}",
        f"train.out_dir={out}",
        "train.steps=100000",
        "data.workers=2",
        "checkpoint.every=100000",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and len(_metrics(out)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, signum)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_RESUBMIT, output
    assert f"received {signal.Signals(signum).name}" in output
    assert "Traceback" not in output
    last = max(m["step"] for m in _metrics(out) if "split" not in m)
    assert (out / "checkpoints" / f"step_{last:06d}").is_dir()
