"""Join the process group: agree on the master's address and port, then init_process_group.

Where the master comes from, first match wins:

1. MASTER_ADDR (and MASTER_PORT) in the environment: torchrun, and every script bert-launch
   writes, export them. This is also the user's override.
2. Under an MPI (Open MPI, MPICH/Intel MPI, MVAPICH2) with mpi4py installed: rank 0 picks its own
   address and a free port and broadcasts them. MPI is finalized right after, so the processes
   can fork DataLoader workers and exit independently.
3. The scheduler's host list names the node of rank 0 (block placement puts it on the first
   host): Slurm - first host of SLURM_STEP_NODELIST/SLURM_JOB_NODELIST expanded by
   `scontrol show hostnames` (the bracket syntax is never parsed here); PBS - first line of
   PBS_NODEFILE; Grid Engine - first line of SGE_JOB_HOSTLIST, else first field of PE_HOSTFILE.
   The port is MASTER_PORT, else 10000 + job id % 50000 (the ABCI scripts' convention, so two
   jobs sharing a node do not collide), else 29500.

Anything else is a LaunchError that says what to set or install.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

from launch.env import MPI_LAUNCHERS, LaunchEnv
from launch.errors import LaunchError

DEFAULT_PORT = 29500


def init_distributed(env: LaunchEnv, backend: str, timeout_s: float) -> LaunchEnv:
    """Join the default process group as `env.rank` of `env.world_size`.

    No-op for one process (or when a group already exists). `timeout_s` bounds both the
    rendezvous and every later collective, so a dead or hung rank stops the others with an error
    instead of holding the job until its wall-time limit. Returns `env` with the master that was
    used filled in (log `describe()` of it to show where the job met).
    """
    import torch.distributed as dist

    if env.world_size == 1 or dist.is_initialized():
        return env
    addr, port, source = resolve_master(env)
    resolved = dataclasses.replace(env, master_addr=addr, master_port=port)
    host = f"[{addr}]" if ":" in addr else addr  # IPv6 literal
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    except (RuntimeError, OSError) as error:  # DistStoreError and timeouts are RuntimeErrors
        text = str(error).strip() or type(error).__name__
        first = re.split(r"\[[EWI]\d{4} ", text.splitlines()[0])[0].strip()  # drop c10d log tail
        raise LaunchError(
            f"rank {env.rank}/{env.world_size} could not join the process group at {addr}:{port} "
            f"(master from {source}) within {timeout_s:.0f} s: {first}"
        ) from error
    return resolved


def resolve_master(
    env: LaunchEnv, environ: Mapping[str, str] | None = None
) -> tuple[str, int, str]:
    """(address, port, where it came from) of the rendezvous; see the module docstring."""
    environ = os.environ if environ is None else environ
    if env.master_addr:
        port = env.master_port or port_from_job_id(env.job_id)
        return env.master_addr, port, "MASTER_ADDR"
    if env.launcher in MPI_LAUNCHERS:
        agreed = _agree_with_mpi4py(env)
        if agreed is not None:
            return agreed[0], agreed[1], "mpi4py"
    host = first_scheduler_host(env.scheduler, environ)
    if host is not None:
        return host, env.master_port or port_from_job_id(env.job_id), f"{env.scheduler} host list"
    if env.launcher in MPI_LAUNCHERS:
        raise LaunchError(
            f"{env.launcher} started {env.world_size} ranks but MASTER_ADDR is not set and "
            "mpi4py is not installed (or finds no MPI library): pip install mpi4py (extra "
            "'mpi') and load the job's MPI, or export MASTER_ADDR="
            "<rank 0's host> MASTER_PORT=<free port> and pass them on (mpirun -x MASTER_ADDR "
            "-x MASTER_PORT)"
        )
    raise LaunchError(
        f"{env.launcher} started {env.world_size} ranks but MASTER_ADDR is not set: export "
        "MASTER_ADDR=<rank 0's host> and MASTER_PORT=<free port> for every rank"
    )


def port_from_job_id(job_id: str | None) -> int:
    """10000 + job number % 50000 ("1234.pbs1" -> 11234), or 29500 without a job."""
    match = re.match(r"\d+", job_id or "")
    return 10000 + int(match.group()) % 50000 if match else DEFAULT_PORT


def first_scheduler_host(scheduler: str | None, environ: Mapping[str, str]) -> str | None:
    """The first host of the scheduler's host list, or None if there is none to read."""
    if scheduler == "slurm":
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        return slurm_hostnames(nodelist)[0] if nodelist else None
    if scheduler == "pbs":
        return _first_line(environ.get("PBS_NODEFILE"), "PBS_NODEFILE")
    if scheduler == "sge":
        if environ.get("SGE_JOB_HOSTLIST"):  # ABCI: one host per line
            return _first_line(environ["SGE_JOB_HOSTLIST"], "SGE_JOB_HOSTLIST")
        line = _first_line(environ.get("PE_HOSTFILE"), "PE_HOSTFILE")  # "host slots queue ..."
        return line.split()[0] if line else None
    return None


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm host list ("gpu[01-02],login-1") with `scontrol show hostnames`.

    Hand-parsing the brackets goes wrong on names with dashes (Lightning issue #1943), so this
    asks Slurm, which is installed wherever the variable is set.
    """
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except FileNotFoundError:
        raise LaunchError(
            "scontrol is not on PATH, so the Slurm node list cannot be expanded: export "
            "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) in the job"
        ) from None
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        raise LaunchError(f"scontrol show hostnames {nodelist!r} failed: {error}") from None
    hosts = out.split()
    if not hosts:
        raise LaunchError(f"scontrol show hostnames {nodelist!r} printed no host")
    return hosts


def _first_line(path: str | None, name: str) -> str | None:
    if not path:
        return None
    try:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                return line.strip()
    except OSError as error:
        raise LaunchError(f"cannot read {name}={path}: {error.strerror}") from None
    raise LaunchError(f"{name}={path} lists no host")


# --- MPI: rank 0 picks, everyone receives ---------------------------------------------------------


def _agree_with_mpi4py(env: LaunchEnv) -> tuple[str, int] | None:
    """Rank 0's address and a free port, broadcast over MPI; None when mpi4py is absent or
    cannot load an MPI library."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError):  # absent, or the wheel finds no MPI library
        return None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != env.world_size or comm.Get_rank() != env.rank:
        raise LaunchError(
            f"mpi4py sees rank {comm.Get_rank()}/{comm.Get_size()} but {env.launcher} set "
            f"{env.rank}/{env.world_size}: mpi4py was built for another MPI than the one running "
            "the job; rebuild it (pip install --no-binary mpi4py mpi4py) or export MASTER_ADDR"
        )
    hostnames = comm.allgather(socket.gethostname())
    if env.rank == 0:
        try:
            agreed: tuple[str, int] | str = (_address_for_peers(hostnames), _free_port())
        except LaunchError as error:
            agreed = str(error)
    else:
        agreed = None
    agreed = comm.bcast(agreed, root=0)
    MPI.Finalize()  # only the rendezvous needs MPI; forked workers and lone exits stay safe
    if isinstance(agreed, str):
        raise LaunchError(agreed)
    return agreed


def _address_for_peers(hostnames: list[str]) -> str:
    """An address of this host (rank 0) that the hosts of all ranks can reach."""
    me = hostnames[0]
    if all(name == me for name in hostnames):
        return "127.0.0.1"
    try:
        candidates = [info[4][0] for info in socket.getaddrinfo(me, None, socket.AF_INET)]
    except OSError:
        candidates = []
    for addr in candidates:
        if not addr.startswith("127."):
            return addr
    # The hostname maps to loopback (common in /etc/hosts): ask the kernel which local address
    # routes to another rank's host. A UDP "connect" sends nothing.
    peer = next(name for name in hostnames if name != me)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((peer, 9))
            return sock.getsockname()[0]
    except OSError:
        raise LaunchError(
            f"cannot find an address of {me} reachable from {peer}: export MASTER_ADDR"
        ) from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
