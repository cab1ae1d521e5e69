"""`run_distributed(fn, world_size, *args)`: real processes on gloo, worker errors re-raised.

Each worker gets the torchrun environment variables (RANK, WORLD_SIZE, LOCAL_RANK, ...), so the
code under test finds its rank exactly as it would under torchrun. Results come back per rank.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", _plain(fn(*args))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", traceback.format_exc()))


def _plain(value: Any) -> Any:
    """Tensors go back as CPU copies by ordinary pickling (shared-memory handles die with the
    worker process)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 180) -> list:
    """Run `fn(*args)` in `world_size` processes; return the per-rank results in rank order."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [
        context.Process(target=_worker, args=(rank, world_size, port, fn, args, queue))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in procs:
            rank, status, value = queue.get(timeout=timeout_s)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            results[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise AssertionError("worker failed:\n" + "\n".join(errors))
    return [results[rank] for rank in range(world_size)]
