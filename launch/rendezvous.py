"""Join the process group: agree on a master address and port, then init_process_group."""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from launch.env import LaunchEnv

DEFAULT_PORT = 29500


def init_distributed(env: LaunchEnv, backend: str, timeout_s: float) -> None:
    """No-op for one process; otherwise a TCP rendezvous at the master with the given timeout."""
    if env.world_size == 1 or dist.is_initialized():
        return
    addr = env.master_addr or "127.0.0.1"
    port = env.master_port or DEFAULT_PORT
    os.environ.setdefault("MASTER_ADDR", addr)
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group(
        backend,
        init_method=f"tcp://{addr}:{port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
