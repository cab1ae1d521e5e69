"""Checkpoints: `checkpoint.dir/step_000123/`, written atomically, with a `latest` pointer.

A checkpoint holds the model weights (safetensors), the optimizer state, the RNG state and
`train_state.json` (step, consumed samples, loss scaler, config, layout, model shape). It is
written under a temporary name, fsynced, given a COMPLETE marker and only then renamed, so a
job killed mid-write never leaves something that looks like a good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pretrain.config import ConfigError, ModelShape

FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write step `step` under `root`, point `latest` at it and prune to the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    temp = root / f".{final.name}.tmp-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(temp / "model.safetensors"))
    torch.save(optimizer.state_dict(), temp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, temp / "rng.pt")
    info = dict(train_state, format_version=FORMAT_VERSION, step=step)
    (temp / "train_state.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    (temp / COMPLETE).write_text("ok\n", encoding="utf-8")
    _fsync_tree(temp)
    if final.exists():  # the same step written again (e.g. a resumed run's final save)
        shutil.rmtree(final)
    os.replace(temp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name + "\n", encoding="utf-8")
    os.replace(pointer, root / "latest")
    _prune(root, keep)
    return final


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in root.iterdir() if root.is_dir() else []:
        match = STEP_DIR.match(entry.name)
        if match and (entry / COMPLETE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    for _, path in _complete_steps(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint: the `latest` pointer if valid, else a directory scan."""
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / COMPLETE).is_file():
            return candidate
    steps = _complete_steps(root)
    return steps[-1][1] if steps else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a step directory or a checkpoint root (then its latest complete step)."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest
        if (path / "train_state.json").is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker)")
    raise CheckpointError(f"no complete checkpoint at {path}")


def read_train_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "train_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path / 'train_state.json'}: {error}") from None


def check_shape(path: Path, stored: dict[str, Any], shape: ModelShape) -> None:
    """A checkpoint of another model size is a user error, not a load_state_dict traceback."""
    current = dataclasses.asdict(shape)
    keys = ("layers", "hidden", "heads", "ffn_hidden", "vocab_size", "norm")
    diffs = [f"{k} {stored.get(k)} vs {current[k]}" for k in keys if stored.get(k) != current[k]]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} is for another model ({', '.join(diffs)}; checkpoint vs config): "
            "use a matching model config or another checkpoint.dir"
        )


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): check mlm.pair_task and the model size"
        )


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model, optimizer and RNG; return the stored train state."""
    state = read_train_state(path)
    load_model_weights(path, model)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
