"""Who started this process, and as which rank: torchrun, an MPI, Slurm, PBS, Grid Engine or nobody.

`detect_environment()` reads only environment variables (no files, no subprocesses, no network),
so it is cheap and can be tested with a dict. Finding the master's address when the launcher did
not export one is the job of `launch.rendezvous`.

Precedence, most specific first (the first complete set of variables wins; a lower source that
disagrees is not an error because launchers nest legitimately, e.g. `srun torchrun ...` gives
every torchrun worker the srun task's SLURM_PROCID, and `mpirun` inside an sbatch job starts its
daemons with srun):

1. torchrun      RANK, WORLD_SIZE, LOCAL_RANK (+ LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
2. Open MPI      OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}   (also HPC-X)
3. MVAPICH2      MV2_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}
4. PMI           PMI_RANK, PMI_SIZE + MPI_LOCALRANKID/MPI_LOCALNRANKS (MPICH, Intel MPI) or
                 PALS_LOCAL_RANKID (Cray); inside a Slurm step (`srun --mpi=pmi2`) it is "slurm"
5. Slurm srun    SLURM_PROCID, SLURM_STEP_NUM_TASKS/SLURM_NTASKS, SLURM_LOCALID - only inside a
                 job step (SLURM_STEP_ID set). An sbatch batch shell also has SLURM_PROCID=0 and
                 SLURM_NTASKS=N but is one process: treating it as rank 0 of N would wait for N-1
                 ranks that never come, so a batch shell is one process ("slurm", world 1) and
                 the description says to start bert-train with srun.
6. a batch shell of PBS (PBS_JOBID) or Grid Engine (JOB_ID + SGE_*) running bert-train directly:
   one process, launcher "pbs"/"sge". PBS and Grid Engine do not start ranks themselves; under
   them the ranks come from mpirun (2-4) and only the master's host comes from their host files.
7. single        nothing of the above: one process.

LOCAL_RANK / LOCAL_WORLD_SIZE, when set, fill in a local rank that an MPI does not export.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from launch.errors import LaunchError

LAUNCHERS = ("torchrun", "openmpi", "mpich", "mvapich2", "slurm", "pbs", "sge", "single")
MPI_LAUNCHERS = ("openmpi", "mpich", "mvapich2")


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, as the launcher described it."""

    launcher: str
    """Who started the process: one of LAUNCHERS."""
    rank: int
    world_size: int
    local_rank: int
    """Rank among the processes on this node; picks the GPU."""
    local_world_size: int
    master_addr: str | None
    """Rank 0's host for the rendezvous; None when it must still be agreed (launch.rendezvous)."""
    master_port: int | None
    scheduler: str | None = None
    """The batch system around the launch ("slurm", "pbs", "sge") or None; its host list can
    name the master when the launcher did not."""
    job_id: str | None = None
    """The scheduler's job id (the default rendezvous port is derived from it)."""
    note: str = ""
    """Anything the user should know about the detection, e.g. "batch shell without srun"."""

    def describe(self) -> str:
        """One log line: "launcher openmpi: rank 1/4, local rank 1/2, master 10.0.0.1:29500"."""
        line = (
            f"launcher {self.launcher}: rank {self.rank}/{self.world_size}, "
            f"local rank {self.local_rank}/{self.local_world_size}, "
        )
        if self.world_size == 1:
            line += "no rendezvous (one process)"
        elif self.master_addr is not None:
            line += f"master {self.master_addr}:{self.master_port if self.master_port else '?'}"
        else:
            line += "master resolved at rendezvous"
        if self.scheduler is not None:
            line += f", {self.scheduler} job {self.job_id or '?'}"
        if self.note:
            line += f" ({self.note})"
        return line


def detect_environment(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank, world size, local rank and (if exported) master of this process.

    `environ` defaults to os.environ; tests pass a dict. Raises LaunchError when a launcher's
    variables are present but malformed or inconsistent (rank >= world size, missing local rank).
    """
    env = os.environ if environ is None else environ
    scheduler, job_id = _scheduler(env)
    master_addr = env.get("MASTER_ADDR") or None
    master_port = _optional_int(env, "MASTER_PORT")
    common = {
        "master_addr": master_addr,
        "master_port": master_port,
        "scheduler": scheduler,
        "job_id": job_id,
    }

    for detect in (_torchrun, _openmpi, _mvapich2, _pmi, _slurm_step):
        found = detect(env)
        if found is not None:
            launcher, rank, world, local_rank, local_world = found
            result = LaunchEnv(launcher, rank, world, local_rank, local_world, **common)
            _validate(result)
            return result

    if "RANK" in env and _optional_int(env, "WORLD_SIZE") not in (None, 1):
        raise LaunchError(
            "RANK and WORLD_SIZE are set but LOCAL_RANK is not: export LOCAL_RANK too "
            "(torchrun sets all three)"
        )
    if scheduler is None:
        return LaunchEnv("single", 0, 1, 0, 1, **common)
    note = "batch shell: one process"
    if scheduler == "slurm" and (_optional_int(env, "SLURM_NTASKS") or 1) > 1:
        note = (
            f"sbatch shell without srun: one process, although the job has "
            f"SLURM_NTASKS={env['SLURM_NTASKS']}; start bert-train with srun to use every task"
        )
    elif scheduler in ("pbs", "sge"):
        note = "batch shell without mpirun: one process; start bert-train with mpirun for more"
    return LaunchEnv(scheduler, 0, 1, 0, 1, **common, note=note)


# --- one function per launcher: (launcher, rank, world, local_rank, local_world) or None ---------

Found = tuple[str, int, int, int, int]


def _torchrun(env: Mapping[str, str]) -> Found | None:
    if not all(name in env for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    world = _int(env, "WORLD_SIZE")
    local_world = _first_int(
        env,
        "LOCAL_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MV2_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
    )
    if local_world is None:
        local_world = _slurm_tasks_on_this_node(env) if "SLURM_STEP_ID" in env else None
    # Hand-exported RANK/WORLD_SIZE/LOCAL_RANK without a local size: assume one node. Only the
    # log line uses it; the device comes from LOCAL_RANK.
    return "torchrun", _int(env, "RANK"), world, _int(env, "LOCAL_RANK"), local_world or world


def _openmpi(env: Mapping[str, str]) -> Found | None:
    if "OMPI_COMM_WORLD_RANK" not in env or "OMPI_COMM_WORLD_SIZE" not in env:
        return None
    rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
    local_rank, local_world = _local(
        env, "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "Open MPI"
    )
    return "openmpi", rank, world, local_rank, local_world


def _mvapich2(env: Mapping[str, str]) -> Found | None:
    if "MV2_COMM_WORLD_RANK" not in env or "MV2_COMM_WORLD_SIZE" not in env:
        return None
    rank, world = _int(env, "MV2_COMM_WORLD_RANK"), _int(env, "MV2_COMM_WORLD_SIZE")
    local_rank, local_world = _local(
        env, "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE", "MVAPICH2"
    )
    return "mvapich2", rank, world, local_rank, local_world


def _pmi(env: Mapping[str, str]) -> Found | None:
    """PMI_RANK/PMI_SIZE: MPICH's and Intel MPI's Hydra, Cray PALS, and `srun --mpi=pmi2`."""
    if "PMI_RANK" not in env or "PMI_SIZE" not in env:
        return None
    rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
    in_slurm_step = "SLURM_STEP_ID" in env and _optional_int(env, "SLURM_PROCID") == rank
    if in_slurm_step:  # srun --mpi=pmi2 started us: the same ranks, and Slurm knows the node
        found = _slurm_step(env)
        if found is not None and found[2] == world:
            return found
    if "MPI_LOCALRANKID" in env:
        local_rank, local_world = _local(env, "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "MPICH")
    else:
        local_rank, local_world = _local(env, "PALS_LOCAL_RANKID", "PALS_LOCAL_SIZE", "MPICH")
    return "mpich", rank, world, local_rank, local_world


def _slurm_step(env: Mapping[str, str]) -> Found | None:
    """A task started by srun. The batch shell has SLURM_PROCID too, but no SLURM_STEP_ID."""
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return None
    world = _first_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if world is None:
        raise LaunchError("srun task without SLURM_STEP_NUM_TASKS or SLURM_NTASKS: cannot size")
    local_rank = _first_int(env, "SLURM_LOCALID")
    if local_rank is None:
        raise LaunchError("srun task without SLURM_LOCALID: export LOCAL_RANK")
    local_world = _slurm_tasks_on_this_node(env) or _first_int(env, "SLURM_NTASKS_PER_NODE")
    return "slurm", _int(env, "SLURM_PROCID"), world, local_rank, local_world or world


# --- helpers -------------------------------------------------------------------------------------


def _scheduler(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    if "SLURM_JOB_ID" in env or "SLURM_JOBID" in env:
        return "slurm", env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if "PBS_JOBID" in env:
        return "pbs", env["PBS_JOBID"]
    sge_markers = ("SGE_ROOT", "SGE_O_WORKDIR", "PE_HOSTFILE", "SGE_JOB_HOSTLIST")
    if "JOB_ID" in env and any(name in env for name in sge_markers):
        return "sge", env["JOB_ID"]
    return None, None


def _local(env: Mapping[str, str], rank_name: str, size_name: str, who: str) -> tuple[int, int]:
    """The MPI's own local rank/size, else LOCAL_RANK/LOCAL_WORLD_SIZE set by the user."""
    local_rank = _first_int(env, rank_name, "LOCAL_RANK")
    if local_rank is None:
        raise LaunchError(
            f"{who} started this process but exported no local rank ({rank_name}): "
            "export LOCAL_RANK (the rank among processes on this node) to pick the device"
        )
    local_world = _first_int(env, size_name, "LOCAL_WORLD_SIZE")
    return local_rank, local_world if local_world is not None else local_rank + 1


_TASKS_ENTRY = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> int | None:
    """Tasks on this node from SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE.

    The format is a run-length list, one entry per node in node order: "4", "4(x2)", "3(x2),2".
    (This is Slurm's task-count syntax, not the bracketed host-list syntax, which only
    `scontrol show hostnames` should expand.)
    """
    text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not text:
        return None
    counts: list[int] = []
    for entry in text.split(","):
        match = _TASKS_ENTRY.match(entry.strip())
        if match is None:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = _optional_int(env, "SLURM_NODEID") or 0
    return counts[node] if node < len(counts) else None


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def _optional_int(env: Mapping[str, str], name: str) -> int | None:
    return _int(env, name) if env.get(name, "") != "" else None


def _first_int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = _optional_int(env, name)
        if value is not None:
            return value
    return None


def _validate(env: LaunchEnv) -> None:
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise LaunchError(
            f"{env.launcher}: rank {env.rank} is outside world size {env.world_size}; "
            "check the launcher's variables"
        )
    if not 0 <= env.local_rank < env.local_world_size:
        raise LaunchError(
            f"{env.launcher}: local rank {env.local_rank} is outside the local world size "
            f"{env.local_world_size}; check LOCAL_RANK / LOCAL_WORLD_SIZE"
        )
    if env.master_port is not None and not 0 < env.master_port < 65536:
        raise LaunchError(f"MASTER_PORT={env.master_port} is not a TCP port (1-65535)")
