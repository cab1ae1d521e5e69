"""A run directory (`train.out_dir`) belongs to one run and has one writer at a time.

- `claim_run_dir`: the main rank holds an exclusive `fcntl.flock` on OUT_DIR/train.lock for the
  whole run. The kernel drops the lock when the process ends, however it ends, so a crash leaves
  nothing to clean up. Only the main rank takes it: the other ranks write nothing but their own
  shard files, into a checkpoint directory the main rank created. Holding the lock, the main
  rank sweeps what killed runs left in the checkpoint root, and with `train.resume=start_over`
  moves the previous run aside to OUT_DIR/previous-<time>/ (never deletes it).
- `check_owner`: a new run refuses a checkpoint directory holding another run; resuming from an
  explicit older step of the same directory moves the newer steps aside.
- `check_resume`: resuming with another tokenizer is always refused; changed data, sequence
  length, objective, optimizer, seed or batch are refused unless `train.resume_changes=allow`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pretrain.checkpoint import STEP_DIR, complete_steps, sweep_leftovers
from pretrain.config import Config, ConfigError
from pretrain.distributed import ParallelDims, any_rank, barrier

LOCK_FILE = "train.lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "tensorboard")
"""What a run writes into OUT_DIR besides its checkpoints (moved aside on start_over)."""

# Settings whose change on resume makes the result no longer one run ("section": keys, None =
# the whole section). The model shape and tokenizer are compared separately: never allowed.
RESUME_COMPARED: dict[str, tuple[str, ...] | None] = {
    "data": ("seq_len", "valid_fraction"),
    "mlm": None,
    "optim": None,
    "train": ("seed", "global_batch"),
}


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def lock_run_dir(out_dir: Path) -> IO[str]:
    """Create `out_dir` and take its lock; ConfigError if another process holds it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.out_dir={out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    return _take_lock(out_dir / LOCK_FILE, "train.out_dir", out_dir)


def lock_checkpoint_dir(checkpoint_dir: Path) -> IO[str]:
    """Take the lock of a checkpoint.dir outside train.out_dir: a file beside it, so that
    start_over can move the directory aside while the lock stays."""
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = checkpoint_dir.with_name(f".{checkpoint_dir.name}.{LOCK_FILE}")
    return _take_lock(lock, "checkpoint.dir", checkpoint_dir)


def _take_lock(path: Path, key: str, directory: Path) -> IO[str]:
    """flock `path` for `directory`, which the setting `key` chose (named in the refusal)."""
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(
            f"{key}={directory} is in use by another bert-train ({owner}): "
            f"wait for it to end or choose another {key}"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def move_run_aside(out_dir: Path, checkpoint_dir: Path) -> list[Path]:
    """Rename the previous run's files and checkpoints out of the way; return the new names."""
    stamp = _stamp()
    previous = out_dir / f"previous-{stamp}"
    moves = [(out_dir / name, previous / name) for name in RUN_FILES if (out_dir / name).exists()]
    if checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
        inside = checkpoint_dir.resolve().is_relative_to(out_dir.resolve())
        if checkpoint_dir.resolve() == out_dir.resolve():
            raise ConfigError(
                "train.resume=start_over needs checkpoint.dir apart from train.out_dir"
            )
        target = (
            previous / checkpoint_dir.resolve().relative_to(out_dir.resolve())
            if inside
            else checkpoint_dir.with_name(f"{checkpoint_dir.name}.previous-{stamp}")
        )
        moves.append((checkpoint_dir, target))
    for source, target in moves:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    return sorted({previous if t.is_relative_to(previous) else t for _, t in moves})


@contextmanager
def claim_run_dir(config: Config, dims: ParallelDims, say: Callable[[str], None]) -> Iterator[None]:
    """Hold OUT_DIR's lock for the block (main rank); every rank fails alike if it cannot."""
    out_dir = Path(config.train.out_dir)
    handles: list[IO[str]] = []
    error: Exception | None = None
    if dims.is_main:
        try:
            handles.append(lock_run_dir(out_dir))
            if not config.checkpoint_dir.resolve().is_relative_to(out_dir.resolve()):
                # checkpoint.dir elsewhere: two runs of different out_dirs must not share it,
                # or each one's rotation deletes the other's checkpoints.
                handles.append(lock_checkpoint_dir(config.checkpoint_dir))
            swept = sweep_leftovers(config.checkpoint_dir)
            if swept:
                say(f"tidied {len(swept)} leftover(s) of a killed run: {', '.join(swept)}")
            if config.train.resume == "start_over":
                for moved in move_run_aside(out_dir, config.checkpoint_dir):
                    say(f"start over: the previous run was moved to {moved}")
        except (OSError, ConfigError) as caught:
            error = caught
    if any_rank(error is not None, dims):
        for handle in handles:
            handle.close()
        if error is not None:
            raise error
        raise ConfigError(f"train.out_dir={out_dir}: the main rank could not claim it")
    try:
        yield
    finally:
        for handle in handles:
            handle.close()


def check_owner(
    checkpoint_dir: Path,
    resume_path: Path | None,
    dims: ParallelDims,
    say: Callable[[str], None],
) -> None:
    """Refuse to mix two runs' checkpoints in one directory (rotation compares step numbers,
    so a new run's checkpoints would be deleted in favour of the old run's later steps)."""
    steps = complete_steps(checkpoint_dir)
    inside = resume_path is not None and resume_path.parent.resolve() == checkpoint_dir.resolve()
    if steps and not inside:
        what = "a new run" if resume_path is None else f"resuming from {resume_path}"
        raise ConfigError(
            f"{checkpoint_dir} holds another run (checkpoints up to {steps[-1][1].name}), "
            f"refused for {what}: continue it with train.resume=auto, start over with "
            "train.resume=start_over (moves it to train.out_dir/previous-<time>/), or choose "
            "another train.out_dir"
        )
    if resume_path is None or not inside:
        return
    match = STEP_DIR.match(resume_path.name)
    newer = [path for step, path in steps if match and step > int(match.group(1))]
    if newer:
        aside = checkpoint_dir / f"abandoned-{_stamp()}"
        if dims.is_main:
            aside.mkdir()
            for path in newer:
                os.replace(path, aside / path.name)
        say(f"resuming from an earlier step: {len(newer)} newer checkpoint(s) moved to {aside}")
        barrier(dims)


def check_resume(
    state: dict[str, Any],
    path: Path,
    config: Config,
    tokenizer_hash: str,
    data_paths: list[str],
    say: Callable[[str], None],
) -> None:
    """Compare the checkpoint's stored run with this one (the model shape is checked apart)."""
    stored_hash = state.get("tokenizer_hash")
    if stored_hash and stored_hash != tokenizer_hash:
        raise ConfigError(
            f"checkpoint {path} was trained with another tokenizer than data.path's (hash "
            f"{stored_hash[:12]} vs {tokenizer_hash[:12]}): a run cannot change tokenizer; start "
            "a new run from its weights with train.init_from (and another train.out_dir)"
        )
    changes = resume_changes(state, config, data_paths)
    if not changes:
        return
    if config.train.resume_changes != "allow":
        raise ConfigError(
            f"resuming {path} with changed settings ({'; '.join(changes)}): set "
            "train.resume_changes=allow to accept them, or start a new run with train.init_from"
        )
    for change in changes:
        say(f"resume: {change} (allowed by train.resume_changes=allow)")


def resume_changes(state: dict[str, Any], config: Config, data_paths: list[str]) -> list[str]:
    """`key old -> new` for each compared setting that differs from the checkpoint's."""
    stored = state.get("config", {})
    current = json.loads(json.dumps(config.to_dict()))  # tuples as lists, like the stored one
    changes = []
    if state.get("data_paths") is not None and state["data_paths"] != data_paths:
        changes.append(f"data.path {state['data_paths']} -> {data_paths}")
    for section, keys in RESUME_COMPARED.items():
        old_section = stored.get(section, {})
        for key in keys or tuple(current[section]):
            if key in old_section and old_section[key] != current[section][key]:
                changes.append(f"{section}.{key} {old_section[key]!r} -> {current[section][key]!r}")
    return changes
