"""Which launcher started this process, and what rank, world and master it implies.

torchrun, Open MPI, MPICH/Intel MPI (PMI), MVAPICH2 and Slurm's srun each export their own
variables; `detect_environment` maps them to one `LaunchEnv`. PBS and Grid Engine are schedulers,
not launchers: under them ranks come from MPI, and their host files name the master.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None

    def describe(self) -> str:
        master = f"{self.master_addr}:{self.master_port}" if self.master_addr else "to be agreed"
        return (
            f"launcher {self.launcher}: rank {self.rank}/{self.world_size}, local rank "
            f"{self.local_rank}/{self.local_world_size}, master {master}"
        )


def _int(environ: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        if environ.get(name, "") != "":
            return int(environ[name])
    return default


def detect_environment(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """torchrun > MPI (Open MPI, MVAPICH2, PMI) > Slurm srun > a single process."""
    import os

    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR") or None
    port = _int(env, "MASTER_PORT")
    if all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return LaunchEnv(
            "torchrun",
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env["LOCAL_RANK"]),
            _int(env, "LOCAL_WORLD_SIZE", default=1),
            addr,
            port,
        )
    for launcher, prefix in (("openmpi", "OMPI_COMM_WORLD_"), ("mvapich2", "MV2_COMM_WORLD_")):
        if f"{prefix}RANK" in env:
            return LaunchEnv(
                launcher,
                int(env[f"{prefix}RANK"]),
                int(env[f"{prefix}SIZE"]),
                _int(env, f"{prefix}LOCAL_RANK", default=0),
                _int(env, f"{prefix}LOCAL_SIZE", default=1),
                addr,
                port,
            )
    if "PMI_RANK" in env:
        return LaunchEnv(
            "mpich",
            int(env["PMI_RANK"]),
            int(env["PMI_SIZE"]),
            _int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK", default=0),
            _int(env, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", default=1),
            addr,
            port,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnv(
            "slurm",
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            _int(env, "SLURM_LOCALID", default=0),
            _int(env, "SLURM_NTASKS_PER_NODE", default=1),
            addr,
            port,
        )
    return LaunchEnv("single", 0, 1, 0, 1, addr, port)
