"""Cluster files: where they are, their `hardware:` section and their fitted `layouts:`.

`--cluster` of bert-launch and bert-plan takes a built-in name (a file stem under
configs/cluster/, e.g. `abci2`) or a path to the user's own file; `resolve_cluster` is the one
place that turns it into a file. A cluster file (configs/cluster/*.yaml) holds bert-launch's
option defaults for a site, what its nodes are (`hardware:` GPU kind, memory per GPU in GiB, GPUs
per node, NVLink bandwidth per GPU and inter-node bandwidth per node, in GB/s one way) and, for
each shipped large config at sequence length 128 and 512, the layout that fits its GPUs and the
smallest node count at which it does (`layouts:`, written by `python -m bench.memory_estimate
layouts FILE` from pretrain's memory estimator). bert-launch only reads them (it does not import
pretrain): for a `--config configs/NAME.yaml` with an entry it appends the layout's keys to the
training command and refuses, in one line, fewer nodes than the entry names or a node count at
which the fitted micro-batch x dp does not divide the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.errors import LaunchError

LAYOUT_KEYS = ("parallel.tp", "parallel.zero", "train.recompute", "train.micro_batch")
CLUSTER_DIR = Path(__file__).resolve().parents[1] / "configs" / "cluster"


@dataclass(frozen=True)
class Hardware:
    gpu: str
    """The device: an NVIDIA name such as V100-SXM2-16GB, or `cpu` (one rank per process)."""
    gpu_memory_gib: float
    gpus_per_node: int
    nvlink_gb_per_s: float
    """NVLink (or, on a CPU node, shared-memory) bandwidth per GPU, GB/s in one direction."""
    internode_gb_per_s: float
    """Network bandwidth per node (all its adapters), GB/s in one direction."""


_POSITIVE = ("gpu_memory_gib", "gpus_per_node", "nvlink_gb_per_s", "internode_gb_per_s")


def builtin_clusters() -> list[str]:
    """The names `--cluster` accepts besides a path: the files under configs/cluster/."""
    return sorted(path.stem for path in CLUSTER_DIR.glob("*.yaml"))


def resolve_cluster(name: str) -> Path:
    """The cluster file for `--cluster NAME`: an existing path, else a built-in name."""
    path = Path(name)
    if path.is_file():
        return path
    builtin = CLUSTER_DIR / f"{name}.yaml"
    if "/" not in name and not name.endswith((".yaml", ".yml")) and builtin.is_file():
        return builtin
    raise LaunchError(
        f"unknown cluster {name!r}: give a path to a cluster file or one of "
        f"{', '.join(builtin_clusters())}"
    )


def read_cluster_file(path: Path) -> dict[str, Any]:
    """The mapping in a cluster file (LaunchError, one line, when it cannot be read)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise LaunchError(f"cannot read cluster file {path}: {error}") from None
    if not isinstance(data, dict):
        raise LaunchError(f"cluster file {path} must be a mapping of option names to values")
    return data


def read_hardware(raw: Any, path: str) -> Hardware:
    """Check a `hardware:` section: every field present, the numbers positive."""
    if not isinstance(raw, dict):
        raise LaunchError(f"cluster file {path}: hardware must be a mapping")
    fields = ("gpu", *_POSITIVE)
    missing = [name for name in fields if name not in raw]
    unknown = sorted(set(raw) - set(fields))
    if missing or unknown:
        problem = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
        raise LaunchError(f"cluster file {path}: hardware needs {', '.join(fields)} ({problem})")
    for name in _POSITIVE:
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise LaunchError(
                f"cluster file {path}: hardware.{name} must be a positive number, got {value!r}"
            )
    if not isinstance(raw["gpus_per_node"], int):
        raise LaunchError(f"cluster file {path}: hardware.gpus_per_node must be an integer")
    return Hardware(
        str(raw["gpu"]),
        float(raw["gpu_memory_gib"]),
        raw["gpus_per_node"],
        float(raw["nvlink_gb_per_s"]),
        float(raw["internode_gb_per_s"]),
    )


def pop_fit_sections(data: dict[str, Any], path: str) -> tuple[Hardware | None, dict[str, Any]]:
    """Remove `hardware:` and `layouts:` from a cluster file's mapping and check them."""
    raw = data.pop("hardware", None)
    hardware = None if raw is None else read_hardware(raw, path)
    layouts = data.pop("layouts", None) or {}
    if not isinstance(layouts, dict):
        raise LaunchError(f"cluster file {path}: layouts must map config names to entries")
    return hardware, layouts


def _training_config(command: list[str]) -> tuple[str | None, dict[str, str]]:
    """(the --config path, the key=value overrides) of a bert-train command."""
    config = None
    overrides = {}
    for index, word in enumerate(command):
        if word == "--config" and index + 1 < len(command):
            config = command[index + 1]
        elif word.startswith("--config="):
            config = word.split("=", 1)[1]
        elif "=" in word and not word.startswith("-") and "." in word.split("=", 1)[0]:
            key, value = word.split("=", 1)
            overrides[key] = value
    return config, overrides


def _config_value(config_path: str, overrides: dict[str, str], key: str) -> int | None:
    """An integer setting such as `data.seq_len` from the command, else from the config file
    (None when neither sets it)."""
    if key in overrides:
        return int(overrides[key])
    import yaml

    section, name = key.split(".")
    try:
        data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    value = (data.get(section) or {}).get(name)
    return None if value is None else int(value)


def _seq_len(config_path: str, overrides: dict[str, str]) -> int:
    """data.seq_len from the command, else from the config file (128 when neither sets it)."""
    return _config_value(config_path, overrides, "data.seq_len") or 128


def _check_global_batch(
    name: str, entry: dict[str, Any], global_batch: int, nodes: int, ranks_per_node: int
) -> None:
    """LaunchError (one line) when the fitted micro-batch x dp at `nodes` does not divide the
    global batch (bert-train would refuse it at start-up, after the job has queued), naming the
    nearest node counts that work."""
    tp, micro_batch = int(entry["parallel.tp"]), int(entry["train.micro_batch"])

    def divides(n: int) -> bool:
        ranks = n * ranks_per_node
        return ranks % tp == 0 and global_batch % (micro_batch * (ranks // tp)) == 0

    if divides(nodes):
        return
    need = int(entry["min_nodes"])
    fewer = [n for n in range(need, nodes) if divides(n)]
    more = [n for n in range(nodes + 1, 4 * nodes + 1) if divides(n)]
    nearest = [str(n) for n in (fewer[-1:] + more[:1])]
    dp = nodes * ranks_per_node // tp
    raise LaunchError(
        f"{name} on {nodes} node(s): train.global_batch={global_batch} is not a multiple of the "
        f"fitted train.micro_batch={micro_batch} x dp_size={dp}: use "
        + (f"--nodes {' or '.join(nearest)}, or " if nearest else "")
        + f"a train.global_batch that is a multiple of {micro_batch * dp}"
    )


def with_cluster_key(command: list[str], cluster: str) -> list[str]:
    """A training command with `train.cluster` appended (bert-train compares its first log
    intervals with the plan for that cluster), unless the command sets it. A built-in name
    stays a name; a path becomes absolute, since a job may start in another directory."""
    config_path, overrides = _training_config(command)
    if config_path is None or "train.cluster" in overrides:
        return command
    path = resolve_cluster(cluster)
    value = cluster if path == CLUSTER_DIR / f"{cluster}.yaml" else str(path.resolve())
    return [*command, f"train.cluster={value}"]


def fit_command(
    command: list[str],
    layouts: dict[str, Any],
    nodes: int,
    ranks_per_node: int,
    cluster: str | None,
) -> tuple[list[str], str | None]:
    """The training command with the fitted layout's keys appended, and a note for the user.
    Refuses (LaunchError) fewer nodes than the entry needs, and a node count at which the
    fitted micro-batch x dp does not divide the global batch.

    Unchanged when the config has no entry, or when the command already sets a layout key (the
    user's layout then wins and is not checked here; bert-train checks it at start-up).
    """
    config_path, overrides = _training_config(command)
    if not layouts or config_path is None:
        return command, None
    name = Path(config_path).stem
    entry = (layouts.get(name) or {}).get(f"seq{_seq_len(config_path, overrides)}")
    if entry is None:
        return command, None
    if any(key in overrides for key in LAYOUT_KEYS):
        return command, f"{name}: keeping your own layout keys (not the cluster file's)"
    need = int(entry["min_nodes"])
    if nodes < need:
        raise LaunchError(
            f"{name} at data.seq_len={_seq_len(config_path, overrides)} needs at least {need} "
            f"node(s) on {cluster} to fit in GPU memory (estimated {entry.get('estimate_gib')} "
            f"GiB per GPU): use --nodes {need} or more"
        )
    global_batch = _config_value(config_path, overrides, "train.global_batch")
    if global_batch is not None:
        _check_global_batch(name, entry, global_batch, nodes, ranks_per_node)
    added = [f"{key}={entry[key]}" for key in LAYOUT_KEYS]
    return [*command, *added], f"{name}: fitted layout from {cluster}: {' '.join(added)}"
