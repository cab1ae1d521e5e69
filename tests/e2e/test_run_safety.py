"""Nothing lost, nothing silent: run ownership, checkpoint integrity, one writer, one-line errors.

Oracles: the bytes of checkpoints written earlier, an uninterrupted run's weights (resume is
exact, so a fallback resume must reproduce them bit for bit), and the CLI contract for errors
(one stderr line, no traceback, the documented exit code, nothing half-written).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import CheckpointError, full_model_state, verify_checkpoint
from pretrain.config import ConfigError, load_config
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
    "train.global_batch=8",
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


def _train_steps(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "split" not in r]


def _tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_a_run_directory_belongs_to_one_run(small_dataset, tmp_path):
    """Before: a new run (resume=none) in a directory holding a longer run had its checkpoints
    deleted at once by rotation, `latest` pointed at a deleted step and the next auto resume
    continued the old run. Now it is refused; start_over moves the old run aside intact."""
    out = tmp_path / "run"
    train(_config(small_dataset, out, "train.steps=6", "checkpoint.keep=2"))
    old_step = _tree_bytes(out / "checkpoints" / "step_000006")
    with pytest.raises(ConfigError, match="holds another run"):
        train(_config(small_dataset, out, "train.steps=3", "train.resume=none", "train.seed=7"))
    assert _tree_bytes(out / "checkpoints" / "step_000006") == old_step

    new = train(
        _config(
            small_dataset,
            out,
            "train.steps=3",
            "train.resume=start_over",
            "train.seed=7",
            "checkpoint.keep=2",
        )
    )
    assert new.checkpoint == out / "checkpoints" / "step_000003"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000003"
    (previous,) = out.glob("previous-*")
    assert _tree_bytes(previous / "checkpoints" / "step_000006") == old_step
    assert _train_steps(previous) == [1, 2, 3, 4, 5, 6]

    resumed = train(_config(small_dataset, out, "train.steps=4", "train.seed=7"))
    assert resumed.step == 4
    assert _train_steps(out) == [1, 2, 3, 4]  # the new run continued, not the old one


def test_a_checkpoint_dir_outside_out_dir_belongs_to_one_running_trainer(small_dataset, tmp_path):
    """Before: two trainers of different train.out_dir sharing one checkpoint.dir both started
    (neither saw the other's steps yet) and each one's rotation deleted the other's checkpoints.
    Now the second is refused while the first runs; start_over still moves the directory aside
    (the lock is a file beside it)."""
    from pretrain.run_dir import lock_checkpoint_dir

    shared = tmp_path / "ckpt"
    holder = lock_checkpoint_dir(shared)  # a running trainer's lock, as claim_run_dir takes it
    try:
        with pytest.raises(ConfigError, match="checkpoint.dir=.*is in use by another bert-train"):
            train(
                _config(small_dataset, tmp_path / "b", "train.steps=3", f"checkpoint.dir={shared}")
            )
    finally:
        holder.close()
    first = train(
        _config(small_dataset, tmp_path / "a", "train.steps=3", f"checkpoint.dir={shared}")
    )
    assert first.checkpoint == shared / "step_000003"
    again = train(
        _config(
            small_dataset,
            tmp_path / "a",
            "train.steps=3",
            f"checkpoint.dir={shared}",
            "train.resume=start_over",
        )
    )
    assert again.checkpoint == shared / "step_000003"
    (moved,) = tmp_path.glob("ckpt.previous-*")
    assert (moved / "step_000003").is_dir()


def test_resuming_an_earlier_step_moves_the_newer_ones_aside(small_dataset, tmp_path):
    """train.resume=<step 3 of this directory> while step 6 exists: step 6 is kept, moved to
    checkpoints/abandoned-<time>/ (rotation would otherwise compare the new run's steps with
    it), and the run goes on from step 3. Oracle: the bytes of the old step 6, and the new
    step 6 equal to it (resume is exact)."""
    out = tmp_path / "run"
    train(_config(small_dataset, out, "train.steps=6"))
    root = out / "checkpoints"
    old_step = _tree_bytes(root / "step_000006")
    resumed = train(
        _config(small_dataset, out, "train.steps=6", f"train.resume={root / 'step_000003'}")
    )
    assert resumed.step == 6
    (aside,) = root.glob("abandoned-*")
    assert _tree_bytes(aside / "step_000006") == old_step
    new, old = full_model_state(root / "step_000006"), full_model_state(aside / "step_000006")
    assert all(torch.equal(new[name], old[name]) for name in old)


def test_training_gives_back_the_stop_signals(small_dataset, tmp_path):
    """train() takes SIGTERM/SIGUSR1 to stop cleanly; once it returns (or raises), the caller's
    handlers are back. Before, a test session that had trained in-process ignored SIGTERM, so a
    CI timeout could not end it."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    train(_config(small_dataset, tmp_path / "run", "train.steps=1"))
    assert {sig: signal.getsignal(sig) for sig in before} == before
    with pytest.raises(ConfigError):
        train(_config(small_dataset, tmp_path / "run", "train.steps=1", "train.resume=none"))
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_resume_refuses_another_tokenizer_and_unasked_changes(small_dataset, tmp_path, capsys):
    """Before: data from another tokenizer of the same vocabulary size, or another sequence
    length, optimizer or seed, resumed silently."""
    out = tmp_path / "run"
    train(_config(small_dataset, out, "train.steps=2"))
    other = tmp_path / "other_tokenizer"
    shutil.copytree(small_dataset, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["hash"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))

    for extra in ([], ["train.resume_changes=allow"]):  # a tokenizer change is never allowed
        with pytest.raises(ConfigError, match="another tokenizer.*train.init_from"):
            train(_config(other, out, "train.steps=3", *extra))
    with pytest.raises(ConfigError, match="data.seq_len 64 -> 32.*train.seed 1234 -> 5"):
        train(_config(small_dataset, out, "train.steps=3", "data.seq_len=32", "train.seed=5"))
    with pytest.raises(ConfigError, match="optim.name 'lamb' -> 'adamw'"):
        train(_config(small_dataset, out, "train.steps=3", "optim.name=adamw"))
    capsys.readouterr()
    result = train(
        _config(
            small_dataset, out, "train.steps=3", "data.seq_len=32", "train.resume_changes=allow"
        )
    )
    assert result.step == 3
    assert "resume: data.seq_len 64 -> 32 (allowed by train.resume_changes=allow)" in (
        capsys.readouterr().out
    )


def test_a_damaged_checkpoint_is_detected_and_resume_falls_back(small_dataset, tmp_path, capsys):
    """One flipped byte in a weight file: export refuses it, auto resume moves it aside with one
    warning line and continues from the previous step, and the run still ends bit-identical to
    an uninterrupted one. Before, it loaded silently."""
    straight = tmp_path / "straight"
    train(_config(small_dataset, straight, "train.steps=6"))
    out = tmp_path / "run"
    train(_config(small_dataset, out, "train.steps=6"))
    step6 = out / "checkpoints" / "step_000006"
    weights = step6 / "model_tp00.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    assert verify_checkpoint(step6) == "model_tp00.safetensors"
    assert verify_checkpoint(out / "checkpoints" / "step_000003") is None
    torn = tmp_path / "torn"
    shutil.copytree(out / "checkpoints" / "step_000003", torn)
    (torn / "optimizer_tp00_dp00.safetensors").unlink()
    assert verify_checkpoint(torn) == "optimizer_tp00_dp00.safetensors"

    from pretrain.export_hf import export_checkpoint

    with pytest.raises(CheckpointError, match="model_tp00.safetensors is missing or fails"):
        export_checkpoint(step6, tmp_path / "hf")
    capsys.readouterr()
    resumed = train(_config(small_dataset, out, "train.steps=6"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "trying the previous one" in warnings[0]
    assert resumed.step == 6
    (aside,) = (out / "checkpoints").glob("corrupt-step_000006-*")
    assert (aside / "model_tp00.safetensors").read_bytes() == bytes(data)  # kept, not deleted
    final = full_model_state(out / "checkpoints" / "step_000006")
    for name, tensor in full_model_state(straight / "checkpoints" / "step_000006").items():
        assert torch.equal(tensor, final[name]), name


def test_a_checkpoint_without_checksums_or_readable_state_is_skipped(
    small_dataset, tmp_path, capsys
):
    """checksums.json gone and train_state.json cut (a damaged file system): resume falls
    back to the previous step with one warning. Before, reading the format version raised,
    and every resume stopped with the same one-line refusal until a human deleted the step."""
    out = tmp_path / "run"
    train(_config(small_dataset, out, "train.steps=6"))
    step6 = out / "checkpoints" / "step_000006"
    (step6 / "checksums.json").unlink()
    state = (step6 / "train_state.json").read_text()
    (step6 / "train_state.json").write_text(state[: len(state) // 2])
    assert verify_checkpoint(step6) == "checksums.json"

    capsys.readouterr()
    resumed = train(_config(small_dataset, out, "train.steps=6"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "checksums.json is missing" in warnings[0]
    assert resumed.step == 6
    (aside,) = (out / "checkpoints").glob("corrupt-step_000006-*")
    assert (aside / "train_state.json").read_text() == state[: len(state) // 2]
    assert verify_checkpoint(out / "checkpoints" / "step_000006") is None


def test_a_kill_while_deleting_a_step_leaves_no_half_deleted_step(
    small_dataset, tmp_path, monkeypatch
):
    """Rotation is interrupted after deleting one file (as by kill -9). Before, the step
    directory stayed under its name, marked COMPLETE, with files missing; now only a `.trash-*`
    name is left, and the next run sweeps it."""
    import pretrain.checkpoint as checkpoint

    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        next(Path(path).glob("*.safetensors")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(
            _config(small_dataset, out, "train.steps=2", "checkpoint.every=1", "checkpoint.keep=1")
        )
    root = out / "checkpoints"
    assert not (root / "step_000001").exists()
    assert (root / "step_000002" / "COMPLETE").is_file()
    assert [p.name.startswith(".trash-step_000001") for p in root.glob(".trash-*")] == [True]

    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert train(_config(small_dataset, out, "train.steps=3")).step == 3
    assert not list(root.glob(".trash-*"))


def test_a_corpus_too_small_to_hold_out_says_there_is_no_evaluation(
    small_dataset, tmp_path, capsys
):
    """A one-document corpus with data.valid_fraction=0.05 trains (it raised IndexError once)
    but can hold nothing out. Before, the run silently skipped every evaluation; now one
    warning line says so. Oracle: metrics.jsonl holds no evaluation line."""
    from data_prep.encode import encode_corpus

    text = tmp_path / "one.txt"
    text.write_text("The only document has one sentence. And then a second one.\n")
    one = tmp_path / "one"
    encode_corpus([text], small_dataset / "tokenizer", one, lang="en")
    capsys.readouterr()
    out = tmp_path / "run"
    assert train(_config(one, out, "train.steps=3", "train.micro_batch=1")).step == 3
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warnings == [
        "warning: data.valid_fraction=0.05 holds out no sample (too few documents to split a "
        "valid set off): this run has no evaluation"
    ]
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    assert not [r for r in records if "split" in r]


def _bert_train(*args: str, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:  # a full disk, simulated: writes beyond the limit fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [sys.executable, "-m", "pretrain", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit if file_size_limit else None,
    )


def _one_line(proc: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert fragment in proc.stderr, proc.stderr


@pytest.mark.slow
def test_environment_errors_are_one_line_and_leave_nothing_half_written(small_dataset, tmp_path):
    """A full disk while writing a checkpoint or config.yaml, an out_dir that is a file or lies
    under one, token ids beyond the vocabulary, a second trainer on the same out_dir."""
    base = [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        *TINY,
        f"data.path={small_dataset}",
        "train.steps=3",
    ]
    out = tmp_path / "run"
    # The model file is ~300 KB: the checkpoint write fails, metrics and config fit.
    proc = _bert_train(*base, f"train.out_dir={out}", file_size_limit=150_000)
    _one_line(proc, 1, "model_tp00.safetensors")
    assert not [p.name for p in (out / "checkpoints").iterdir()]  # no step, no temporary
    assert (out / "config.yaml").read_text().startswith("model:")

    config_text = (out / "config.yaml").read_text()
    proc = _bert_train(
        *base, f"train.out_dir={out}", "train.eval_every=2", file_size_limit=len(config_text) // 2
    )
    _one_line(proc, 1, "config.yaml")
    assert (out / "config.yaml").read_text() == config_text  # the previous one, not emptied

    # A fresh run under a 500-byte limit: the sample index cannot be cached (it is kept in
    # memory, no cut .npy stays) and the run stops at config.yaml in one line.
    fresh = tmp_path / "fresh"
    _one_line(_bert_train(*base, f"train.out_dir={fresh}", file_size_limit=500), 1, "config.yaml")
    assert not list(fresh.rglob("*.npy")) and not (fresh / "config.yaml").exists()

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _one_line(_bert_train(*base, f"train.out_dir={a_file}"), 2, "is not a directory")
    _one_line(_bert_train(*base, f"train.out_dir={a_file / 'run'}"), 1, str(a_file / "run"))

    shrunk = tmp_path / "shrunk"
    shutil.copytree(small_dataset, shrunk)
    manifest = json.loads((shrunk / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 500
    (shrunk / "manifest.json").write_text(json.dumps(manifest))
    proc = _bert_train(*base, f"data.path={shrunk}", f"train.out_dir={tmp_path / 'ids'}")
    _one_line(proc, 2, "but the tokenizer's vocabulary has 500 ids")

    from pretrain.run_dir import lock_run_dir

    holder = lock_run_dir(out)
    try:
        _one_line(_bert_train(*base, f"train.out_dir={out}"), 2, "is in use by another bert-train")
    finally:
        holder.close()


def test_a_crashed_lock_holder_leaves_no_lock(tmp_path):
    """flock dies with its process: a trainer killed by SIGKILL does not block the next one."""
    from pretrain.run_dir import lock_run_dir

    code = (
        "import os, signal, sys; from pathlib import Path; from pretrain.run_dir import "
        f"lock_run_dir; h = lock_run_dir(Path({str(tmp_path)!r})); print('locked', flush=True); "
        "sys.stdin.readline()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by another bert-train \\(pid {holder.pid}"):
            lock_run_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock_run_dir(tmp_path).close()


def test_sweep_finishes_or_removes_what_a_kill_left(tmp_path):
    """Oracle: the write protocol. A finished temporary (COMPLETE inside) whose step is missing
    was cut while replacing an older copy of that step: it is renamed into place; an unfinished
    temporary and `.trash-*` directories are removed."""
    from pretrain.checkpoint import sweep_leftovers

    for name, complete in (
        (".step_000005.tmp", True),
        (".step_000006.tmp", False),
        (".trash-step_000001-12-34", True),
        ("step_000004", True),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_tp00.safetensors").write_bytes(name.encode())
        if complete:
            (tmp_path / name / "COMPLETE").write_text("ok\n")
    sweep_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004", "step_000005"]
    assert (tmp_path / "step_000005" / "model_tp00.safetensors").read_bytes() == (
        b".step_000005.tmp"
    )
