"""Launcher detection: each launcher's variables map to the right rank, world, local rank, master.

Oracle: the variable sets below are what each launcher exports, as documented (torchrun's
elastic docs; Open MPI's environment-variable page; MVAPICH2 and Intel MPI/MPICH Hydra as mapped
by DeepSpeed and Accelerate; Slurm's srun/sbatch man pages) and, for Slurm, as printed by the
real slurmd of this machine (`env` in an sbatch shell and in `srun -n2` tasks,
`srun --mpi=pmi2`). Exact integers, so exact equality.
"""

from __future__ import annotations

import pytest

from launch.env import LaunchEnv, detect_environment
from launch.errors import LaunchError

TORCHRUN = {  # torchrun --nnodes 2 --nproc-per-node 4, worker 6
    "RANK": "6",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "2",
    "LOCAL_WORLD_SIZE": "4",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "node01",
    "MASTER_PORT": "29400",
    "TORCHELASTIC_RUN_ID": "none",
}
OPENMPI = {  # mpirun -np 4 -map-by ppr:2:node, rank 3 on the second node
    "OMPI_COMM_WORLD_RANK": "3",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "OMPI_COMM_WORLD_NODE_RANK": "1",
    "OMPI_UNIVERSE_SIZE": "4",
}
MVAPICH2 = {
    "MV2_COMM_WORLD_RANK": "5",
    "MV2_COMM_WORLD_SIZE": "8",
    "MV2_COMM_WORLD_LOCAL_RANK": "1",
    "MV2_COMM_WORLD_LOCAL_SIZE": "4",
}
INTEL_MPI = {  # mpiexec.hydra -n 16 -ppn 8
    "PMI_RANK": "9",
    "PMI_SIZE": "16",
    "MPI_LOCALRANKID": "1",
    "MPI_LOCALNRANKS": "8",
    "PMI_FD": "5",
}
CRAY_PALS = {"PMI_RANK": "3", "PMI_SIZE": "4", "PALS_LOCAL_RANKID": "1", "PALS_LOCAL_SIZE": "2"}
SLURM_JOB = {  # what the sbatch shell of `sbatch --nodes 2 --ntasks-per-node 2` has
    "SLURM_JOB_ID": "4242",
    "SLURM_JOBID": "4242",
    "SLURM_JOB_NODELIST": "gpu-a[01-02]",
    "SLURM_NODELIST": "gpu-a[01-02]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "4",
    "SLURM_NPROCS": "4",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}
SRUN_TASK = {  # ... and srun's task 3 (second node, second task there)
    **SLURM_JOB,
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0",
    "SLURM_STEP_NODELIST": "gpu-a[01-02]",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}
PBS_JOB = {
    "PBS_JOBID": "1234.pbs1",
    "PBS_NODEFILE": "/var/spool/pbs/aux/1234.pbs1",
    "PBS_O_WORKDIR": "/home/u",
    "PBS_ENVIRONMENT": "PBS_BATCH",
}
SGE_JOB = {
    "JOB_ID": "777",
    "SGE_ROOT": "/home/sge",
    "SGE_O_WORKDIR": "/home/u",
    "PE_HOSTFILE": "/var/spool/sge/g0001/active_jobs/777.1/pe_hostfile",
    "SGE_JOB_HOSTLIST": "/var/spool/sge/g0001/active_jobs/777.1/hostlist",
    "NHOSTS": "2",
}


def fields(env: LaunchEnv) -> tuple:
    return (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size)


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, ("single", 0, 1, 0, 1)),
        (TORCHRUN, ("torchrun", 6, 8, 2, 4)),
        (OPENMPI, ("openmpi", 3, 4, 1, 2)),
        (MVAPICH2, ("mvapich2", 5, 8, 1, 4)),
        (INTEL_MPI, ("mpich", 9, 16, 1, 8)),
        (CRAY_PALS, ("mpich", 3, 4, 1, 2)),
        (SRUN_TASK, ("slurm", 3, 4, 1, 2)),
        ({**PBS_JOB, **OPENMPI}, ("openmpi", 3, 4, 1, 2)),
        ({**SGE_JOB, **OPENMPI}, ("openmpi", 3, 4, 1, 2)),
        ({**SLURM_JOB, **INTEL_MPI}, ("mpich", 9, 16, 1, 8)),
    ],
    ids=[
        "single",
        "torchrun",
        "openmpi",
        "mvapich2",
        "intel-mpi",
        "cray-pals",
        "srun",
        "pbs+openmpi",
        "sge+openmpi",
        "sbatch+mpiexec",
    ],
)
def test_each_launcher(environ, expected):
    assert fields(detect_environment(environ)) == expected


def test_scheduler_and_job_id_recorded():
    assert (detect_environment(SRUN_TASK).scheduler, detect_environment(SRUN_TASK).job_id) == (
        "slurm",
        "4242",
    )
    env = detect_environment({**PBS_JOB, **OPENMPI})
    assert (env.scheduler, env.job_id) == ("pbs", "1234.pbs1")
    env = detect_environment({**SGE_JOB, **OPENMPI})
    assert (env.scheduler, env.job_id) == ("sge", "777")
    # JOB_ID alone is too common a name to mean Grid Engine.
    assert detect_environment({"JOB_ID": "5"}).scheduler is None


def test_master_only_from_master_addr():
    """Detection never guesses a master; rendezvous resolves it from host lists or mpi4py."""
    assert (detect_environment(TORCHRUN).master_addr, detect_environment(TORCHRUN).master_port) == (
        "node01",
        29400,
    )
    assert detect_environment(OPENMPI).master_addr is None
    assert detect_environment(SRUN_TASK).master_addr is None
    env = detect_environment({**OPENMPI, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 29500)


def test_precedence_torchrun_over_mpi_over_slurm():
    """Nested launchers: `srun torchrun` and a torchrun under mpirun are torchrun workers; an
    mpirun inside an sbatch job starts its daemons with srun, so its ranks inherit the srun
    step's SLURM_PROCID, which must not be taken for the MPI rank."""
    srun_torchrun = {**SRUN_TASK, "SLURM_PROCID": "1", **TORCHRUN}
    assert fields(detect_environment(srun_torchrun)) == ("torchrun", 6, 8, 2, 4)
    mpi_in_slurm_step = {**SRUN_TASK, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", **OPENMPI}
    assert fields(detect_environment(mpi_in_slurm_step)) == ("openmpi", 3, 4, 1, 2)
    assert fields(detect_environment({**OPENMPI, **MVAPICH2})) == ("openmpi", 3, 4, 1, 2)


def test_srun_with_pmi2_is_slurm():
    """`srun --mpi=pmi2` sets PMI_RANK/PMI_SIZE equal to Slurm's (seen on the real slurmd)."""
    environ = {**SRUN_TASK, "PMI_RANK": "3", "PMI_SIZE": "4", "PMI_FD": "11"}
    assert fields(detect_environment(environ)) == ("slurm", 3, 4, 1, 2)


def test_sbatch_shell_is_one_process():
    """The batch shell has SLURM_PROCID=0 and SLURM_NTASKS=4 but no SLURM_STEP_ID: taking it
    for rank 0 of 4 would wait for three ranks that never come."""
    env = detect_environment(SLURM_JOB)
    assert fields(env) == ("slurm", 0, 1, 0, 1)
    assert "srun" in env.note and "SLURM_NTASKS=4" in env.describe()


@pytest.mark.parametrize("job", [PBS_JOB, SGE_JOB], ids=["pbs", "sge"])
def test_pbs_sge_batch_shell_is_one_process(job):
    env = detect_environment(job)
    assert fields(env) == (env.scheduler, 0, 1, 0, 1)
    assert "mpirun" in env.note


@pytest.mark.parametrize(
    "tasks, node, expected",
    [("4", "0", 4), ("2(x3)", "2", 2), ("3(x2),1", "2", 1), ("3(x2),1", "1", 3)],
)
def test_slurm_tasks_per_node_by_node(tasks, node, expected):
    environ = {**SRUN_TASK, "SLURM_STEP_TASKS_PER_NODE": tasks, "SLURM_NODEID": node}
    environ.update(SLURM_LOCALID="0", SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="10")
    assert detect_environment(environ).local_world_size == expected


def test_hand_exported_torchrun_variables():
    """The clusters.md recipe `export RANK=$SLURM_PROCID LOCAL_RANK=... WORLD_SIZE=...` inside
    srun: the local size falls back to Slurm's."""
    environ = {**SRUN_TASK, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert fields(detect_environment(environ)) == ("torchrun", 3, 4, 1, 2)
    assert fields(detect_environment({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})) == (
        "torchrun",
        0,
        2,
        0,
        2,
    )


def test_local_rank_fallback_to_local_rank_variable():
    environ = {"PMI_RANK": "1", "PMI_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert fields(detect_environment(environ)) == ("mpich", 1, 2, 1, 2)


@pytest.mark.parametrize(
    "environ, words",
    [
        ({"RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK"),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, "LOCAL_RANK"),
        ({**OPENMPI, "OMPI_COMM_WORLD_RANK": "4"}, "outside world size 4"),
        ({**OPENMPI, "OMPI_COMM_WORLD_SIZE": "two"}, "not an integer"),
        ({**TORCHRUN, "LOCAL_RANK": "4"}, "LOCAL_RANK"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT"),
    ],
    ids=["no-local-rank", "pmi-no-local", "rank-too-big", "not-int", "local-too-big", "port"],
)
def test_user_errors_are_one_line(environ, words):
    with pytest.raises(LaunchError) as error:
        detect_environment(environ)
    assert words in str(error.value) and "\n" not in str(error.value)
    assert isinstance(error.value, ValueError)


def test_describe_is_one_line():
    assert detect_environment(
        {**OPENMPI, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    ).describe() == ("launcher openmpi: rank 3/4, local rank 1/2, master 10.0.0.1:29500")
    assert detect_environment({}).describe() == (
        "launcher single: rank 0/1, local rank 0/1, no rendezvous (one process)"
    )
    line = detect_environment(SRUN_TASK).describe()
    assert line == (
        "launcher slurm: rank 3/4, local rank 1/2, master resolved at rendezvous, slurm job 4242"
    )


def test_reads_os_environ_by_default(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert fields(detect_environment()) == ("torchrun", 1, 2, 1, 2)
