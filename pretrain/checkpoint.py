"""Checkpoints: `checkpoint.dir/step_000123/`, written atomically, with a `latest` pointer.

A checkpoint holds, per tensor-parallel rank, the model shard and the optimizer state keyed by
parameter name (`model_tpNN.safetensors`, `optimizer_tpNN_dpMM.safetensors`, written and
fsynced by several ranks at once: `take_snapshot` says which), the RNG state and
`train_state.json` (step, consumed samples, loss scaler, config, layout, model shape, and how
each split parameter was split). Loading reads, for each tensor, only the slices of the saved
shards that make up this rank's piece in the current layout, so a checkpoint loads at any tp/dp
and a rank reads 1/tp of the split tensors. It is written under a temporary name, fsynced, given
a COMPLETE marker and only then renamed, and `latest` moves last, so a job killed mid-write
never leaves something that looks like a good checkpoint. The ranks agree on a save's success
over their own group (`checkpoint.timeout_s`), and `write_snapshot` can run in a background
thread while training goes on (`checkpoint.async_save`, pretrain.trainer).

Integrity: every file's SHA-256 is recorded in `checksums.json` (each writing rank hashes the
files it wrote). `verify_checkpoint` splits the files over the ranks, so each byte is read once
however many ranks there are. Directories are never deleted in place: they are renamed to a
`.trash-*` name first and removed after, and `sweep_leftovers` removes what a kill left behind.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data_prep.shard_format import file_sha256 as sha256_file  # None if the file is missing
from pretrain.config import ConfigError, ModelShape
from pretrain.distributed import ParallelDims, barrier
from pretrain.parallel.zero import ZeroRedundancy

FORMAT_VERSION = 2  # 2: checksums.json
COMPLETE = "COMPLETE"
CHECKSUMS = "checksums.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
TRASH_PREFIX = ".trash-"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync(paths: Iterable[Path]) -> None:
    """Flush files (and directories) to stable storage."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_checksums(directory: Path, names: list[str], tag: str) -> None:
    """Hash the files this rank wrote into a small side file the main rank merges."""
    sums = {name: sha256_file(directory / name) for name in names}
    (directory / f"{tag}.sha256.json").write_text(json.dumps(sums), encoding="utf-8")


def _merge_checksums(directory: Path, own: list[str]) -> None:
    """One `checksums.json` for the whole checkpoint: the ranks' side files plus `own`."""
    sums: dict[str, str] = {}
    for side in sorted(directory.glob("*.sha256.json")):
        sums.update(json.loads(side.read_text(encoding="utf-8")))
        side.unlink()
    sums.update({name: sha256_file(directory / name) for name in own})
    (directory / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True), "utf-8")


def non_finite_tensor(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _move_to_trash(path: Path) -> Path:
    trash = path.parent / f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.time_ns()}"
    os.replace(path, trash)
    return trash


def remove_dir(path: Path) -> None:
    """Delete a directory so that a kill midway leaves only a `.trash-*` name (swept later),
    never a half-deleted directory under its real name."""
    shutil.rmtree(_move_to_trash(path), ignore_errors=True)


def sweep_leftovers(root: Path) -> list[str]:
    """Tidy what killed runs left in a checkpoint root: `.trash-*` directories and unfinished
    `.step_*.tmp` writes are removed; a finished one (COMPLETE) whose step directory is missing
    (a kill while it replaced an older copy of the same step) is renamed into place. Only the
    run directory's lock holder may call this."""
    done = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        temp = re.match(r"^\.(step_\d+)\.tmp$", entry.name)
        if temp and (entry / COMPLETE).is_file() and not (root / temp.group(1)).exists():
            os.replace(entry, root / temp.group(1))
            done.append(f"{entry.name} -> {temp.group(1)}")
        elif temp or entry.name.startswith(TRASH_PREFIX):
            shutil.rmtree(entry, ignore_errors=True)
            done.append(entry.name)
    return done


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' writer reports a full disk as SafetensorError: make it the OSError it is."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as error:
        raise OSError(errno.EIO, str(error).splitlines()[0], str(path)) from None


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


@dataclass
class Snapshot:
    """What one rank contributes to a checkpoint, taken at a step: the tensors of the files it
    writes and, on the main rank, the RNG state and train state. With `copy` the tensors are
    private copies, so training may go on while a background thread writes them."""

    step: int
    files: dict[str, dict[str, torch.Tensor]]  # file name -> tensors
    rng: bytes | None  # main rank only
    info: dict[str, Any] | None  # train_state.json, main rank only


def take_snapshot(
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    dims: ParallelDims | None = None,
    sharding: dict[str, dict[str, int]] | None = None,
    copy: bool = False,
) -> Snapshot:
    """This rank's part of checkpoint `step`, on the host.

    The model shard of tp rank t is written by (t, dp 0). The optimizer state is written by
    every dp rank under ZeRO-1 (each holds a different part), else by dp rank 1 when there is
    one, so two ranks of each tp group share the writing and its fsync."""
    tp_rank, dp_rank, dp_size = (
        (0, 0, 1) if dims is None else (dims.tp_rank, dims.dp_rank, dims.dp_size)
    )
    zero = isinstance(optimizer, ZeroRedundancy) and optimizer.dims.dp_size > 1

    def host(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().contiguous().cpu()
        return tensor.clone() if copy else tensor

    files = {}
    if dp_rank == 0:
        files[_model_file(tp_rank)] = {k: host(v) for k, v in model.state_dict().items()}
    if zero or dp_rank == 1 % dp_size:
        state = _optimizer_tensors(model, optimizer)
        files[_optimizer_file(tp_rank, dp_rank if zero else 0)] = {
            k: host(v) for k, v in state.items()
        }
    rng = info = None
    if dims is None or dims.is_main:
        states = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state()
        buffer = io.BytesIO()
        torch.save(states, buffer)
        rng = buffer.getvalue()
        info = dict(train_state, format_version=FORMAT_VERSION, step=step, sharding=sharding or {})
        info["optimizer_parts"] = dp_size if zero else 1
    return Snapshot(step, files, rng, info)


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    keep: int,
    dims: ParallelDims | None = None,
    sharding: dict[str, dict[str, int]] | None = None,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Write step `step` under `root` from every rank at once; point `latest` at it; prune."""
    snapshot = take_snapshot(step, model, optimizer, train_state, dims, sharding)
    return write_snapshot(root, snapshot, keep, dims, group)


def write_snapshot(
    root: Path,
    snapshot: Snapshot,
    keep: int,
    dims: ParallelDims | None = None,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Every rank writes and fsyncs its files of `snapshot` into a temporary directory; the main
    rank then writes the train state and RNG, the COMPLETE marker, renames the directory into
    place and only then moves `latest`. The ranks agree after each stage over `group` (the
    checkpoint group, with checkpoint.timeout_s; None: the default group), and all of them
    raise if any failed: nothing half-written stays, `latest` never names a partial step."""
    is_main = dims is None or dims.is_main
    step = snapshot.step
    final = root / step_dir_name(step)
    temp = root / f".{final.name}.tmp"
    error: OSError | None = None
    try:
        if is_main:
            root.mkdir(parents=True, exist_ok=True)
            if temp.exists():
                shutil.rmtree(temp)
            temp.mkdir()
    except OSError as caught:
        error = caught
    _agree(error, dims, group, temp, step)
    try:
        for name, tensors in snapshot.files.items():
            _save_tensors(tensors, temp / name)
        if snapshot.files:
            _fsync(temp / name for name in snapshot.files)
            tag = "_".join(name.split(".")[0] for name in sorted(snapshot.files))
            _write_checksums(temp, sorted(snapshot.files), tag)
    except OSError as caught:  # e.g. the disk is full: no rank may go on as if it were written
        error = caught
    _agree(error, dims, group, temp, step)
    try:
        if is_main:
            (temp / "rng.pt").write_bytes(snapshot.rng)
            state_text = json.dumps(snapshot.info, indent=2)
            (temp / "train_state.json").write_text(state_text, encoding="utf-8")
            _merge_checksums(temp, ["rng.pt", "train_state.json"])
            _fsync([temp / "rng.pt", temp / "train_state.json", temp / CHECKSUMS, temp])
            (temp / COMPLETE).write_text("ok\n", encoding="utf-8")
            _fsync([temp / COMPLETE, temp])
            # The same step written again (e.g. a resumed run's final save): the old copy is
            # renamed aside, the new one renamed in, and only then is the old one deleted.
            old = _move_to_trash(final) if final.exists() else None
            os.replace(temp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            pointer = root / "latest.tmp"
            pointer.write_text(final.name + "\n", encoding="utf-8")
            _fsync([pointer, root])
            os.replace(pointer, root / "latest")
            _prune(root, keep)
    except OSError as caught:
        error = caught
    _agree(error, dims, group, temp, step)
    return final


def _agree(
    error: OSError | None,
    dims: ParallelDims | None,
    group: dist.ProcessGroup | None,
    temp: Path,
    step: int,
) -> None:
    """All ranks stop together when any failed to write; nothing half-written stays behind."""
    failed = error is not None
    if dims is not None and dims.world_size > 1:
        flag = torch.tensor([1.0 if failed else 0.0])  # on the host: the group may be gloo
        if group is None:
            flag = flag.to(dims.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        failed = bool(flag.item())
    if not failed:
        return
    if dims is None or dims.is_main:
        shutil.rmtree(temp, ignore_errors=True)
    if error is not None:
        raise error
    raise CheckpointError(f"checkpoint of step {step} not written: another rank failed to write")


def checkpoint_group(dims: ParallelDims, timeout_s: float) -> dist.ProcessGroup | None:
    """A gloo group of all ranks for the agreements around a save, with its own timeout
    (checkpoint.timeout_s), so a slow file system does not trip the training collectives'
    parallel.timeout_s. Every rank must call this, in the same order. None for one process."""
    if dims.world_size == 1:
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


class BackgroundWriter:
    """Runs one checkpoint write at a time in a background thread (checkpoint.async_save)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._outcome: tuple[Path | None, Exception | None] = (None, None)

    def start(self, write: Callable[[], Path]) -> None:
        if self._thread is not None:
            raise RuntimeError("a checkpoint write is still in flight: wait() for it first")

        def run() -> None:
            try:
                self._outcome = (write(), None)
            except Exception as error:  # handed to the training thread by wait()
                self._outcome = (None, error)

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> tuple[Path | None, Exception | None] | None:
        """Block until the write in flight ends: (its path, None) or (None, its error); None
        when there was none."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        return self._outcome


def _barrier(dims: ParallelDims | None) -> None:
    if dims is not None:
        barrier(dims)


def _first_over_ranks(value: int, dims: ParallelDims | None) -> int:
    """The smallest `value` of all ranks, on every rank."""
    if dims is None or dims.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=dims.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def verify_checkpoint(path: Path, dims: ParallelDims | None = None) -> str | None:
    """The first file of `path` that is missing or fails its checksum, or None if all are
    intact. The files are dealt out over the ranks (rank r hashes files r, r + world, ...), so
    each byte is read once in all; every rank returns the same answer."""
    rank, world = (0, 1) if dims is None else (dims.rank, dims.world_size)
    try:
        sums = json.loads((path / CHECKSUMS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        # Checkpoints of format 1 had no checksums: they load unverified.
        sums = {CHECKSUMS: ""} if _format_version(path) >= 2 else {}
    except (OSError, json.JSONDecodeError):
        sums = {CHECKSUMS: ""}
    names = sorted(sums)
    first_bad = len(names)
    for index in range(rank, len(names), world):
        name = names[index]
        if name == CHECKSUMS or not (path / name).is_file():
            first_bad = index
            break
        if sha256_file(path / name) != sums[name]:
            first_bad = index
            break
    first_bad = _first_over_ranks(first_bad, dims)
    return names[first_bad] if first_bad < len(names) else None


def _format_version(path: Path) -> int:
    """The checkpoint format `train_state.json` records; an unreadable one counts as the
    newest format, whose missing checksums then mark the checkpoint as damaged."""
    try:
        return read_train_state(path).get("format_version", 1)
    except CheckpointError:
        return FORMAT_VERSION


def check_intact(path: Path, dims: ParallelDims | None = None) -> None:
    """Raise CheckpointError when a file of `path` is missing or damaged."""
    damaged = verify_checkpoint(path, dims)
    if damaged is not None:
        raise CheckpointError(
            f"checkpoint {path} is damaged: {damaged} is missing or fails its checksum; "
            "use an earlier checkpoint"
        )


def newest_intact_checkpoint(
    root: Path, dims: ParallelDims | None, warn: Callable[[str], None]
) -> Path | None:
    """The newest complete checkpoint under `root` whose files all pass their checksums.

    A damaged one is renamed `corrupt-step_NNNNNN-<time>` (kept for inspection, ignored by
    rotation) by the main rank, with a one-line warning, and the previous one is tried."""
    is_main = dims is None or dims.is_main
    damaged_any = False
    for _, path in reversed(complete_steps(root)):
        damaged = verify_checkpoint(path, dims)
        if damaged is None:
            return path
        damaged_any = True
        aside = root / f"corrupt-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if is_main:
            os.replace(path, aside)
        warn(
            f"warning: checkpoint {path} is damaged ({damaged} is missing or fails its checksum): "
            f"moved to {aside.name}; trying the previous one"
        )
        _barrier(dims)
    if damaged_any:
        raise CheckpointError(
            f"no intact checkpoint left in {root} (damaged ones were moved to corrupt-*): "
            "start over with train.resume=start_over, or from weights with train.init_from"
        )
    return None


def complete_steps(root: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in root.iterdir() if root.is_dir() else []:
        match = STEP_DIR.match(entry.name)
        if match and (entry / COMPLETE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints and, if none of them is finite, the newest finite
    one (a diverged run's last good state)."""
    steps = [path for _, path in complete_steps(root)]
    kept = steps[-keep:]
    if not any(_is_finite(path) for path in kept):
        newest_finite = newest_finite_checkpoint(root)
        kept += [newest_finite] if newest_finite is not None else []
    for path in steps:
        if path not in kept:
            remove_dir(path)


def newest_finite_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint whose weights the trainer recorded as finite, or None."""
    finite = [path for _, path in complete_steps(root) if _is_finite(path)]
    return finite[-1] if finite else None


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
    steps = complete_steps(root)
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
    """Tensors from a checkpoint of any tp layout, one parameter in memory at a time.

    `local` reads only the bytes of this rank's piece (safetensors slices a tensor in its
    file without reading the rest); `whole` assembles the entire tensor. `bytes_read` counts
    what was read through it (memory-mapped reads do not show in /proc/self/io)."""

    def __init__(self, path: Path, names: Callable[[int], list[str]]) -> None:
        state = read_train_state(path)
        self.sharding: dict[str, dict[str, int]] = state.get("sharding", {})
        tp = state.get("layout", {}).get("tp", 1)
        # Per tp rank: key -> the file holding it (ZeRO-1 spreads a rank's state over dp files).
        self.index: list[dict[str, Any]] = []
        for r in range(tp):
            files = [safe_open(str(path / name), framework="pt") for name in names(r)]
            self.index.append({key: f for f in files for key in f.keys()})
        self.bytes_read = 0

    def keys(self) -> list[str]:
        return list(self.index[0])

    def _read(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def whole(self, key: str, param_name: str) -> torch.Tensor:
        info = self.sharding.get(param_name)
        first = self._read(self.index[0][key].get_tensor(key))
        if info is None or first.ndim == 0:
            return first
        parts = [first] + [self._read(files[key].get_tensor(key)) for files in self.index[1:]]
        return torch.cat(parts, dim=info["dim"]).narrow(info["dim"], 0, info["size"])

    def local(
        self, key: str, param_name: str, like: torch.Tensor, split: dict[str, int] | None, rank: int
    ) -> torch.Tensor:
        """This tp rank's piece of `key` for the current layout (`split`: its dim and tp), read
        from the saved parts it overlaps only; vocabulary padding rows are zeros."""
        saved = self.sharding.get(param_name)
        stored = self.index[0][key].get_slice(key)
        shape = stored.get_shape()
        if split is None or len(shape) == 0 or len(shape) != like.ndim:
            return _local_part(self.whole(key, param_name), like, split, rank)
        dim, local = split["dim"], like.shape[split["dim"]]
        size = shape[dim] if saved is None else saved["size"]  # the unpadded whole length
        parts = [stored] if saved is None else [f[key].get_slice(key) for f in self.index]
        step = shape[dim]  # every saved part has the same (padded) length along dim
        begin, end = rank * local, min((rank + 1) * local, size)
        pieces = []
        for r, part in enumerate(parts):
            lo, hi = max(begin, r * step), min(end, (r + 1) * step)
            if lo < hi:
                index = [slice(None)] * len(shape)
                index[dim] = slice(lo - r * step, hi - r * step)
                pieces.append(self._read(part[tuple(index)]))
        missing = local - max(0, end - begin)
        if missing > 0 or not pieces:
            pad_shape = list(like.shape)
            pad_shape[dim] = missing
            pieces.append(torch.zeros(pad_shape, dtype=like.dtype))
        return torch.cat(pieces, dim=dim)


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
) -> int:
    """Load weights saved at any tp into `model` laid out by `sharding` (None: unsharded),
    reading only this rank's piece of each tensor; returns the bytes read."""
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
            target.copy_(reader.local(name, name, target, split(name), tp_rank))
    return reader.bytes_read


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
) -> tuple[dict[str, Any], int]:
    """Restore model, optimizer and RNG (resharding to the current layout); return the train
    state and the bytes of tensors this rank read (its own pieces only)."""
    state = read_train_state(path)
    bytes_read = load_model_weights(path, model, dims, sharding)
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
                    piece = reader.local(key, name, param, split(name), tp_rank)
                    entries[key.split("::", 1)[1]] = piece
            if entries:
                by_index[index] = entries
            index += 1
    optimizer.load_state_dict({"state": by_index, "param_groups": current["param_groups"]})
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state, bytes_read + reader.bytes_read
