"""Checkpoints: `checkpoint.dir/step_000123/`, written atomically, with a `latest` pointer.

A checkpoint holds, per tensor-parallel rank, the model shard and the optimizer state keyed by
parameter name (`model_tpNN.safetensors`, `optimizer_tpNN.safetensors`, written by all tp ranks
at once), the RNG state and `train_state.json` (step, consumed samples, loss scaler, config,
layout, model shape, and how each split parameter was split). Loading assembles each whole
tensor from the shards and cuts the current layout's piece, so a checkpoint loads at any tp/dp.
It is written under a temporary name, fsynced, given a COMPLETE marker and only then renamed, so
a job killed mid-write never leaves something that looks like a good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pretrain.config import ConfigError, ModelShape
from pretrain.distributed import ParallelDims, barrier
from pretrain.parallel.zero import ZeroRedundancy

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


def _model_file(tp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}.safetensors"


def _optimizer_file(tp_rank: int, dp_rank: int = 0) -> str:
    return f"optimizer_tp{tp_rank:02d}_dp{dp_rank:02d}.safetensors"


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name (`name::key`), so it can be resharded."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"{names[id(param)]}::{key}"] = tensor.detach().contiguous().cpu()
    return out


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    keep: int,
    dims: ParallelDims | None = None,
    sharding: dict[str, dict[str, int]] | None = None,
) -> Path:
    """Write step `step` under `root` from every rank at once; point `latest` at it; prune.

    Each tp rank of the first dp replica writes its own shard files; the main rank then writes
    the train state and RNG, the COMPLETE marker, and renames the directory into place.
    """
    is_main = dims is None or dims.is_main
    tp_rank = 0 if dims is None else dims.tp_rank
    dp_rank = 0 if dims is None else dims.dp_rank
    writes = dp_rank == 0
    # With ZeRO-1 every dp rank holds a different part of the optimizer state and writes it.
    zero = isinstance(optimizer, ZeroRedundancy) and optimizer.dims.dp_size > 1
    final = root / step_dir_name(step)
    temp = root / f".{final.name}.tmp"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir()
    _barrier(dims)
    if writes:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(temp / _model_file(tp_rank)))
    if writes or zero:
        optimizer_state = _optimizer_tensors(model, optimizer)
        save_file(optimizer_state, str(temp / _optimizer_file(tp_rank, dp_rank)))
    _barrier(dims)
    if is_main:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, temp / "rng.pt")
        info = dict(train_state, format_version=FORMAT_VERSION, step=step, sharding=sharding or {})
        info["optimizer_parts"] = dims.dp_size if zero else 1
        (temp / "train_state.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        _fsync_tree(temp)
        (temp / COMPLETE).write_text("ok\n", encoding="utf-8")
        if final.exists():  # the same step written again (e.g. a resumed run's final save)
            shutil.rmtree(final)
        os.replace(temp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name + "\n", encoding="utf-8")
        os.replace(pointer, root / "latest")
        _prune(root, keep)
    _barrier(dims)
    return final


def _barrier(dims: ParallelDims | None) -> None:
    if dims is not None:
        barrier(dims)


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in root.iterdir() if root.is_dir() else []:
        match = STEP_DIR.match(entry.name)
        if match and (entry / COMPLETE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints and, if none of them is finite, the newest finite
    one (a diverged run's last good state)."""
    steps = [path for _, path in _complete_steps(root)]
    kept = steps[-keep:]
    if not any(_is_finite(path) for path in kept):
        finite = [path for path in steps if _is_finite(path)]
        kept += finite[-1:]
    for path in steps:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def _is_finite(path: Path) -> bool:
    """What the trainer recorded (checkpoints written before it recorded this count as finite;
    an unreadable one does not)."""
    try:
        return bool(read_train_state(path).get("finite", True))
    except CheckpointError:
        return False


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


class _ShardedReader:
    """Whole tensors from a checkpoint of any tp layout (one parameter in memory at a time)."""

    def __init__(self, path: Path, names: Callable[[int], list[str]]) -> None:
        state = read_train_state(path)
        self.sharding: dict[str, dict[str, int]] = state.get("sharding", {})
        tp = state.get("layout", {}).get("tp", 1)
        # Per tp rank: key -> the file holding it (ZeRO-1 spreads a rank's state over dp files).
        self.index: list[dict[str, Any]] = []
        for r in range(tp):
            files = [safe_open(str(path / name), framework="pt") for name in names(r)]
            self.index.append({key: f for f in files for key in f.keys()})

    def keys(self) -> list[str]:
        return list(self.index[0])

    def whole(self, key: str, param_name: str) -> torch.Tensor:
        info = self.sharding.get(param_name)
        first = self.index[0][key].get_tensor(key)
        if info is None or first.ndim == 0:
            return first
        parts = [first] + [files[key].get_tensor(key) for files in self.index[1:]]
        return torch.cat(parts, dim=info["dim"]).narrow(info["dim"], 0, info["size"])


def _local_part(
    whole: torch.Tensor, like: torch.Tensor, split: dict[str, int] | None, tp_rank: int
) -> torch.Tensor:
    """This rank's shard of `whole` for the current layout (zero-padded vocabulary rows)."""
    if split is None or whole.ndim == 0:
        return whole
    dim = split["dim"]
    local = like.shape[dim]
    tp_size = split["tp"]
    missing = local * tp_size - whole.shape[dim]
    if missing > 0:
        pad_shape = list(whole.shape)
        pad_shape[dim] = missing
        whole = torch.cat([whole, whole.new_zeros(pad_shape)], dim=dim)
    return whole.narrow(dim, tp_rank * local, local)


def _current_split(
    sharding: dict[str, dict[str, int]] | None, dims: ParallelDims | None
) -> Callable[[str], dict[str, int] | None]:
    def split(name: str) -> dict[str, int] | None:
        if not sharding or name not in sharding or dims is None:
            return None
        return {"dim": sharding[name]["dim"], "tp": dims.tp_size}

    return split


def load_model_weights(
    path: Path,
    model: torch.nn.Module,
    dims: ParallelDims | None = None,
    sharding: dict[str, dict[str, int]] | None = None,
) -> None:
    """Load weights saved at any tp into `model` laid out by `sharding` (None: unsharded)."""
    reader = _ShardedReader(path, lambda r: [_model_file(r)])
    split = _current_split(sharding, dims)
    tp_rank = 0 if dims is None else dims.tp_rank
    expected = model.state_dict()
    saved = set(reader.keys())
    missing = sorted(set(expected) - saved)
    unexpected = sorted(saved - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): check mlm.pair_task and the model size"
        )
    with torch.no_grad():
        for name, target in expected.items():
            part = _local_part(reader.whole(name, name), target, split(name), tp_rank)
            target.copy_(part)


def full_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The whole (tp = 1, unpadded) state dict of a checkpoint of any layout."""
    reader = _ShardedReader(path, lambda r: [_model_file(r)])
    return {name: reader.whole(name, name) for name in reader.keys()}


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dims: ParallelDims | None = None,
    sharding: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer and RNG (resharding to the current layout); return the state."""
    state = read_train_state(path)
    load_model_weights(path, model, dims, sharding)
    parts = state.get("optimizer_parts", 1)
    reader = _ShardedReader(path, lambda r: [_optimizer_file(r, d) for d in range(parts)])
    split = _current_split(sharding, dims)
    tp_rank = 0 if dims is None else dims.tp_rank
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    current = optimizer.state_dict()
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            entries = {}
            for key in reader.keys():
                if key.startswith(name + "::"):
                    whole = reader.whole(key, name)
                    entries[key.split("::", 1)[1]] = _local_part(whole, param, split(name), tp_rank)
            if entries:
                by_index[index] = entries
            index += 1
    optimizer.load_state_dict({"state": by_index, "param_groups": current["param_groups"]})
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
