"""A real single-node Slurm runs the script bert-launch writes: 2 srun tasks train to COMPLETED,
and a job sent SIGUSR1 checkpoints, exits 75, resubmits itself and the new job resumes.

Slurm (Debian's slurm-wlm) and munge are started by the fixture on this machine with a generated
slurm.conf and a fresh munge key under a temporary directory, on free ports, as root (CI runs as
root); nothing outside that directory is touched. Oracle: Slurm's own job states and exit codes
(`scontrol show job`), the trainer's metrics.jsonl and checkpoints, and - for the host list -
the real `scontrol show hostnames`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from launch import cli
from launch.rendezvous import slurm_hostnames

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "scancel", "srun")

pytestmark = pytest.mark.slow
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

SLURM_CONF = """\
ClusterName=bertlocal
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=10
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class LocalSlurm:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        )

    def run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=60, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "")

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout_s: float) -> str:
        return _wait_for(
            lambda: (s := self.state(job_id)) in states and s, timeout_s, f"job {job_id} {states}"
        )

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[LocalSlurm]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} missing): apt-get install -y "
            "slurm-wlm munge"
        )
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root (CI runs as root)")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir()
    os.chmod(root, 0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    (root / "slurm.conf").write_text(
        SLURM_CONF.format(
            host=host,
            root=root,
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
            cpus=os.cpu_count() or 2,
        )
    )
    cluster = LocalSlurm(root)
    munge_sock = root / "munge" / "munge.sock"
    cluster.run(
        "munged",
        "--force",
        f"--socket={munge_sock}",
        f"--key-file={key}",
        f"--pid-file={root}/munge/munged.pid",
        f"--log-file={root}/log/munged.log",
        f"--seed-file={root}/munge/seed",
    )
    try:
        cluster.run("slurmctld", "-c", "-i")
        cluster.run("slurmd")
        _wait_for(
            lambda: "idle" in cluster.run("sinfo", "-h", "-o", "%T", check=False),
            60,
            "the local Slurm node to become idle",
        )
        yield cluster
    except AssertionError as error:
        raise AssertionError(f"{error}\n{cluster.logs()}") from None
    finally:
        cluster.run("scancel", "--full", "--user=root", check=False)
        _stop([root / "slurmd.pid", root / "slurmctld.pid", root / "munge" / "munged.pid"])


def _stop(pid_files: list[Path]) -> None:
    """SIGTERM the daemons whose pids this fixture's daemons wrote (never anything else), then
    give them a few seconds to exit."""
    pids = []
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except (ValueError, IndexError, ProcessLookupError, FileNotFoundError):
            pass
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = [pid for pid in pids if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def train_command(data: Path, out: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pretrain",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        f"data.path={data}",
        f"train.out_dir={out}",
        "model.hidden=64",
        "model.heads=2",
        "model.max_seq_len=64",
        "data.seq_len=64",
        "train.micro_batch=4",
        "train.global_batch=8",
        f"train.steps={steps}",
        "train.precision=fp32",
        "train.log_every=1",
        f"train.eval_every={steps}",
        "train.eval_batches=1",
        "optim.warmup_steps=1",
        f"checkpoint.every={steps}",
        "parallel.timeout_s=60",
    ]


def write_job(tmp_path: Path, name: str, command: list[str], *options: str) -> Path:
    script = tmp_path / f"{name}.sbatch"
    code = cli.main(
        [
            "slurm",
            "--ranks-per-node",
            "2",
            "--walltime",
            "00:15:00",
            "--job-name",
            name,
            "--output",
            str(tmp_path / "%x-%j.out"),
            "--out",
            str(script),
            *options,
            "--",
            *command,
        ]
    )
    assert code == 0
    return script


def submit(slurm: LocalSlurm, script: Path) -> str:
    return slurm.run("sbatch", "--parsable", str(script)).strip().split(";")[0]


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line.get("split") != "valid"]


def test_scontrol_expands_host_lists(slurm, monkeypatch):
    """The dashed names that broke hand-written bracket parsing elsewhere."""
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    assert slurm_hostnames("jean-zay-ia[816-817],gpu-a[01-02]") == [
        "jean-zay-ia816",
        "jean-zay-ia817",
        "gpu-a01",
        "gpu-a02",
    ]


def test_sbatch_script_two_tasks_completes(slurm, small_dataset, tmp_path):
    out = tmp_path / "run"
    script = write_job(tmp_path, "bert-ok", train_command(small_dataset, out, steps=4))
    job_id = submit(slurm, script)
    state = slurm.wait_state(job_id, FINISHED, 150)
    log = (tmp_path / f"bert-ok-{job_id}.out").read_text()
    assert state == "COMPLETED", log + slurm.logs()
    assert slurm.job(job_id)["ExitCode"] == "0:0"
    host = socket.gethostname().split(".")[0]
    assert f"launcher slurm: rank 0/2, local rank 0/2, master {host}:" in log
    # SLURM_LABELIO=1 in the script (srun --label): the ranks' lines start with their rank.
    lines = log.splitlines()
    assert any(line.startswith("0: launcher slurm: rank 0/2") for line in lines), log
    assert any(line.startswith("0: train step 4/4 |") for line in lines), log
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "step_000004").is_dir()


def test_sigusr1_checkpoints_and_resubmits(slurm, small_dataset, tmp_path):
    """SIGUSR1 to the job's steps (what --signal=USR1@margin does before the time limit).

    The run is far longer than the test, so no signal can arrive after training ended: the
    first job is signalled once it has trained, checkpoints, exits 75 and resubmits itself; the
    resubmitted job resumes from that checkpoint, is signalled in turn, checkpoints again and -
    with --max-resubmits 1 - stops there with exit code 75 instead of resubmitting.
    """
    out = tmp_path / "run"
    command = train_command(small_dataset, out, steps=100_000)
    script = write_job(tmp_path, "bert-stop", command, "--max-resubmits", "1")
    first = submit(slurm, script)
    _wait_for(lambda: len(metrics(out)) >= 2, 150, "the first job to train")
    slurm.run("scancel", "--signal=USR1", first)  # the job steps only, like --signal without B:
    state = slurm.wait_state(first, FINISHED, 120)
    first_log = (tmp_path / f"bert-stop-{first}.out").read_text()
    assert state == "COMPLETED", first_log  # exit 75, then resubmitted: this segment is done
    assert "received SIGUSR1" in first_log and "resubmitted" in first_log, first_log
    stopped_at = max(m["step"] for m in metrics(out))
    assert (out / "checkpoints" / f"step_{stopped_at:06d}").is_dir()

    second = _wait_for(lambda: _other_job(tmp_path, "bert-stop", first), 60, "the resubmission")
    _wait_for(lambda: len(metrics(out)) >= stopped_at + 2, 150, "the resubmitted job to train")
    slurm.run("scancel", "--signal=USR1", second)
    state = slurm.wait_state(second, FINISHED, 120)
    second_log = (tmp_path / f"bert-stop-{second}.out").read_text()
    assert "segment 1" in second_log and f"at step {stopped_at}" in second_log, second_log
    assert (state, slurm.job(second)["ExitCode"]) == ("FAILED", "75:0"), second_log
    assert "resubmit by hand" in second_log
    steps = [m["step"] for m in metrics(out)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > stopped_at  # no repeats
    assert (out / "checkpoints" / f"step_{steps[-1]:06d}").is_dir()
    assert _other_job(tmp_path, "bert-stop", first, second) is None  # nothing resubmitted


def _other_job(tmp_path: Path, name: str, *known: str) -> str | None:
    for log in tmp_path.glob(f"{name}-*.out"):
        job_id = log.name.removeprefix(f"{name}-").removesuffix(".out")
        if job_id not in known:
            return job_id
    return None
