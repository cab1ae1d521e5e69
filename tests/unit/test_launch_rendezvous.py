"""Where the rendezvous master comes from: MASTER_ADDR, the scheduler's host list, or an error.

Oracle: the host-file formats of each scheduler (PBS_NODEFILE repeats a host once per mpiprocs;
Grid Engine's PE_HOSTFILE is "host slots queue processors"; ABCI's SGE_JOB_HOSTLIST is one host
per line) and the port convention of the ABCI job scripts (10000 + job id % 50000). Slurm's
host list is expanded by `scontrol show hostnames`; here a stub records that it was asked (the
real expansion is checked against the real scontrol in tests/e2e/test_launch_slurm.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from launch.env import detect_environment
from launch.errors import LaunchError
from launch.rendezvous import init_distributed, port_from_job_id, resolve_master

OPENMPI_RANK1 = {
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "8",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
}


@pytest.fixture
def no_mpi4py(monkeypatch):
    """Make `from mpi4py import MPI` fail as if the optional extra were not installed."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)


def resolve(environ: dict[str, str]) -> tuple[str, int, str]:
    return resolve_master(detect_environment(environ), environ)


@pytest.mark.parametrize(
    "job_id, port", [("1234.pbs1", 11234), ("60001", 20001), ("42[3].pbs", 10042), (None, 29500)]
)
def test_port_from_job_id(job_id, port):
    assert port_from_job_id(job_id) == port


def test_master_addr_wins(no_mpi4py):
    environ = {**OPENMPI_RANK1, "MASTER_ADDR": "10.1.2.3", "PBS_JOBID": "99.pbs1"}
    assert resolve(environ) == ("10.1.2.3", 10099, "MASTER_ADDR")  # port from the job id
    environ["MASTER_PORT"] = "23456"
    assert resolve(environ)[:2] == ("10.1.2.3", 23456)


def test_pbs_nodefile_first_host(tmp_path: Path, no_mpi4py):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("hnode007\n" * 4 + "hnode003\n" * 4)  # select=2:mpiprocs=4
    environ = {**OPENMPI_RANK1, "PBS_JOBID": "1234.pbs1", "PBS_NODEFILE": str(nodefile)}
    assert resolve(environ) == ("hnode007", 11234, "pbs host list")


def test_sge_host_lists(tmp_path: Path, no_mpi4py):
    pe = tmp_path / "pe_hostfile"
    pe.write_text("g0012 4 gpu.q@g0012 UNDEFINED\ng0001 4 gpu.q@g0001 UNDEFINED\n")
    environ = {**OPENMPI_RANK1, "JOB_ID": "777", "SGE_ROOT": "/sge", "PE_HOSTFILE": str(pe)}
    assert resolve(environ) == ("g0012", 10777, "sge host list")
    hostlist = tmp_path / "hostlist"
    hostlist.write_text("g0101\ng0102\n")
    environ["SGE_JOB_HOSTLIST"] = str(hostlist)  # ABCI's, preferred
    assert resolve(environ)[0] == "g0101"


def test_slurm_uses_scontrol(tmp_path: Path, monkeypatch):
    calls = tmp_path / "calls"
    stub = tmp_path / "bin" / "scontrol"
    stub.parent.mkdir()
    stub.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\nprintf "jean-zay-ia816\\njean-zay-ia817\\n"\n'
    )
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:/usr/bin:/bin")
    environ = {
        "SLURM_JOB_ID": "5",
        "SLURM_JOB_NODELIST": "jean-zay-ia[816-817]",
        "SLURM_STEP_NODELIST": "jean-zay-ia[816-817]",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        "SLURM_NODEID": "1",
    }
    assert resolve(environ) == ("jean-zay-ia816", 10005, "slurm host list")
    assert calls.read_text().split("\n")[0] == "show hostnames jean-zay-ia[816-817]"


def test_slurm_without_scontrol_is_a_user_error(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    environ = {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_STEP_ID": "0"}
    environ.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="2")
    with pytest.raises(LaunchError, match="scontrol is not on PATH.*MASTER_ADDR"):
        resolve(environ)


def test_mpi_without_master_or_mpi4py_says_what_to_do(no_mpi4py):
    with pytest.raises(LaunchError) as error:
        resolve(OPENMPI_RANK1)
    message = str(error.value)
    assert "pip install mpi4py" in message and "MASTER_ADDR" in message and "\n" not in message


def test_torchrun_vars_without_master(no_mpi4py):
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        resolve({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})


def test_empty_host_file_is_a_user_error(tmp_path: Path, no_mpi4py):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("\n")
    environ = {**OPENMPI_RANK1, "PBS_JOBID": "1.pbs", "PBS_NODEFILE": str(nodefile)}
    with pytest.raises(LaunchError, match="lists no host"):
        resolve(environ)


def test_one_process_needs_no_rendezvous():
    import torch.distributed as dist

    env = detect_environment({})
    assert init_distributed(env, "gloo", 5.0) == env
    assert not dist.is_initialized()


def test_unreachable_master_is_a_launch_error_within_the_timeout():
    """Rank 1 of 2 with nobody listening at the master: a one-line LaunchError after the
    configured timeout (2 s here), not a hang."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nobody listens there
    environ = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with pytest.raises(LaunchError, match=f"could not join the process group at 127.0.0.1:{port}"):
        init_distributed(detect_environment(environ), "gloo", 2.0)
    assert not dist.is_initialized()


class FakeComm:
    """COMM_WORLD of one rank of a 2-rank job whose other rank is on `peer_host`."""

    def __init__(self, rank: int, size: int, peer_host: str, from_rank0=None) -> None:
        self.rank, self.size, self.peer_host, self.from_rank0 = rank, size, peer_host, from_rank0
        self.finalized = False

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's names
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size

    def allgather(self, value):
        mine = [value, self.peer_host]
        return mine if self.rank == 0 else mine[::-1]

    def bcast(self, value, root: int):
        return value if self.rank == root else self.from_rank0


def fake_mpi4py(monkeypatch, comm: FakeComm) -> FakeComm:
    import types

    mpi = types.SimpleNamespace(COMM_WORLD=comm)
    mpi.Finalize = lambda: setattr(comm, "finalized", True)
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=mpi))
    return comm


def test_mpi4py_rank0_picks_and_broadcasts(monkeypatch):
    """Oracle: what rank 0 decides is what rank 1 uses; MPI is finalized after the rendezvous."""
    import socket

    comm = fake_mpi4py(monkeypatch, FakeComm(0, 2, socket.gethostname()))
    addr, port, source = resolve(
        {**OPENMPI_RANK1, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    )
    assert (addr, source) == ("127.0.0.1", "mpi4py") and 0 < port < 65536  # same host
    assert comm.finalized
    fake_mpi4py(monkeypatch, FakeComm(1, 2, "other", from_rank0=("10.0.0.5", 12345)))
    environ = {**OPENMPI_RANK1, "OMPI_COMM_WORLD_SIZE": "2"}
    assert resolve(environ) == ("10.0.0.5", 12345, "mpi4py")


def test_mpi4py_of_another_mpi_is_a_user_error(monkeypatch):
    """A wheel built for another MPI initialises as a singleton: size 1, not the job's 8."""
    fake_mpi4py(monkeypatch, FakeComm(0, 1, "x"))
    with pytest.raises(LaunchError, match="mpi4py sees rank 0/1 but openmpi set 1/8"):
        resolve(OPENMPI_RANK1)


def test_address_for_peers_on_other_hosts(monkeypatch):
    """Rank 0's non-loopback address when the ranks span hosts (its /etc/hosts may map its name
    to 127.0.1.1, as Debian does)."""
    import socket

    from launch import rendezvous

    def getaddrinfo(host, port, family=0, *args):
        return [(family, 1, 6, "", (a, 0)) for a in ("127.0.1.1", "10.0.0.7")]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert rendezvous._address_for_peers(["n1", "n2", "n1"]) == "10.0.0.7"
    assert rendezvous._address_for_peers(["n1", "n1"]) == "127.0.0.1"
