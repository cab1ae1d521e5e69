"""Process groups and the few collectives the trainer needs, outside the model.

The world is a `dp × tp` mesh with tensor-parallel ranks adjacent (rank = dp_rank * tp + tp_rank),
so that a tp group stays inside a node. One `ParallelDims` owns the degrees and the groups; there
are no global groups. With one process everything degrades to plain local operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from launch.env import LaunchEnv, detect_environment
from launch.rendezvous import init_distributed
from pretrain.config import Config, ConfigError


@dataclass
class ParallelDims:
    world_size: int
    rank: int
    tp_size: int
    dp_size: int
    tp_rank: int
    dp_rank: int
    dp_group: dist.ProcessGroup | None
    tp_group: dist.ProcessGroup | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def build_dims(
    world_size: int, rank: int, tp_size: int, device: torch.device, timeout_s: float = 300.0
) -> ParallelDims:
    """Validate the degrees and create the dp and tp groups (every rank creates every group).

    Each group gets the collective timeout explicitly: new_group would otherwise use torch's
    30-minute default, and a hung rank would hold DDP's all-reduce that long."""
    timeout = timedelta(seconds=timeout_s)
    if world_size % tp_size:
        raise ConfigError(
            f"parallel.tp={tp_size} does not divide the world size {world_size}: "
            "choose a tp that divides the number of processes"
        )
    dp_size = world_size // tp_size
    dp_rank, tp_rank = divmod(rank, tp_size)
    dp_group = tp_group = None
    if world_size > 1:
        for d in range(dp_size):
            ranks = list(range(d * tp_size, (d + 1) * tp_size))
            group = dist.new_group(ranks, timeout=timeout)
            if d == dp_rank:
                tp_group = group
        for t in range(tp_size):
            ranks = list(range(t, world_size, tp_size))
            group = dist.new_group(ranks, timeout=timeout)
            if t == tp_rank:
                dp_group = group
    return ParallelDims(
        world_size, rank, tp_size, dp_size, tp_rank, dp_rank, dp_group, tp_group, device
    )


def setup_parallel(config: Config) -> tuple[LaunchEnv, ParallelDims, torch.device]:
    """Detect the launcher, join the process group and pick this rank's device."""
    env = detect_environment()
    if config.train.device == "auto":
        # Modulo: sites that bind one GPU per task (--gpu-bind) show each task a single device.
        device = (
            torch.device("cuda", env.local_rank % torch.cuda.device_count())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    else:
        device = torch.device(config.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    init_distributed(env, backend, config.parallel.timeout_s)
    dims = build_dims(
        env.world_size, env.rank, config.parallel.tp, device, config.parallel.timeout_s
    )
    return env, dims, device


def all_reduce_sum(values: list[float], dims: ParallelDims) -> list[float]:
    """Sum a few scalars over the dp group (one small collective; no-op with dp = 1)."""
    if dims.dp_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=dims.device)
    dist.all_reduce(tensor, group=dims.dp_group)
    return tensor.tolist()


def any_rank(flag: bool, dims: ParallelDims) -> bool:
    """True on every rank if it is true on any rank (used to agree on stopping)."""
    if dims.world_size == 1:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=dims.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def max_over_world(flag: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """All-reduce MAX of a small tensor over every rank (tp and dp): one flag agreed by all."""
    if dims.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def barrier(dims: ParallelDims) -> None:
    if dims.world_size > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
