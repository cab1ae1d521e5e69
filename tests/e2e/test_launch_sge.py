"""A real Grid Engine runs the scripts `bert-launch sge` writes, in both site styles.

The cell (tests/e2e/gridengine_cell.py) is a private single-node Son of Grid Engine 8.1.9 with a
generic queue (parallel environment `mpi`, hosts in $PE_HOSTFILE; configs/cluster/gridengine.yaml)
and an ABCI 2.0-style queue (`-l rt_F=N`, $SGE_JOB_HOSTLIST, `qsub -g GROUP`;
configs/cluster/abci2.yaml). Every job is the unedited script, submitted by
`bert-launch sge --submit` as a user would; mpirun starts 2 ranks inside the job.

Oracles: Grid Engine's own accounting (`qacct`: exit status, whether the scheduler killed the
job, the account string `-g` became), the trainer's metrics.jsonl, and - for the losses - one
process trained in this test process on the same config, seed and global batch: dp=2 averages
the same micro-batch gradients, so every logged loss must match it to float rounding (relative
1e-5, fp32, dropout off), also across the checkpoint/resume boundaries of a job that Grid
Engine's h_rt would kill, and which therefore stops itself on the train.walltime_s the script
computes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from launch import cli
from tests.e2e.gridengine_cell import GridEngineCell, missing_reason, start_cell, wait_for

REPO = Path(__file__).resolve().parents[2]
STEPS = 4

pytestmark = pytest.mark.slow


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


@pytest.fixture(scope="session")
def gridengine(tmp_path_factory) -> Iterator[GridEngineCell]:
    """The cell for the session. A SIGTERM to the test run (a CI job's timeout) interrupts it
    as Ctrl-C does, so the cell's daemons are stopped instead of outliving it."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with start_cell(tmp_path_factory.mktemp("gridengine")) as cell:
            yield cell
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def on_cell(gridengine: GridEngineCell, tmp_path: Path, monkeypatch) -> GridEngineCell:
    """This test's shell on the cell: its SGE_* variables, the `qsub -g` wrapper first on PATH
    (the ABCI stand-in; it only rewrites -g) and tmp_path as the submission directory (-cwd)."""
    for key, value in gridengine.env.items():
        if key.startswith("SGE_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{gridengine.wrapper_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    return gridengine


def overrides(data: Path, out: Path, steps: int) -> list[str]:
    return [
        f"data.path={data}",
        f"train.out_dir={out}",
        "model.hidden=64",
        "model.heads=2",
        "model.max_seq_len=64",
        "model.dropout=0.0",
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


@pytest.fixture(scope="module")
def reference(small_dataset, tmp_path_factory) -> list[float]:
    """The losses of the one-process run."""
    from pretrain.config import load_config
    from pretrain.trainer import train

    out = tmp_path_factory.mktemp("reference") / "run"
    config = load_config(str(REPO / "configs" / "tiny.yaml"), overrides(small_dataset, out, STEPS))
    return [record["loss"] for record in train(config).history]


def submit(args: list[str], data: Path, out: Path, steps: int, capfd) -> str:
    """`bert-launch sge ... --submit` for a 2-rank CPU job; the job id qsub printed."""
    command = [sys.executable, "-m", "pretrain", "--config", str(REPO / "configs" / "tiny.yaml")]
    code = cli.main(
        [
            "sge",
            *args,
            "--gpus-per-node",
            "0",
            "--ranks-per-node",
            "2",
            "--env",
            f"PYTHONPATH={REPO}",
            # Open MPI refuses root without these; CI (and this cell) run as root.
            "--env",
            "OMPI_ALLOW_RUN_AS_ROOT=1",
            "--env",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
            "--submit",
            "--",
            *command,
            *overrides(data, out, steps),
        ]
    )
    printed = capfd.readouterr()
    assert code == 0, printed.out + printed.err
    return re.search(r"Your job (\d+)", printed.out).group(1)


def losses(out: Path) -> list[float]:
    path = out / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [line["loss"] for line in lines if line.get("split") != "valid"]


def assert_losses_match(out: Path, expected: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(expected), rtol=1e-5, atol=0)


def job_log(name: str, job_id: str) -> str:
    return Path(f"{name}.o{job_id}").read_text()  # -cwd -j y: in the submission directory


def test_generic_site_matches_one_process(on_cell, small_dataset, reference, tmp_path, capfd):
    """configs/cluster/gridengine.yaml: -pe mpi 2, hosts from $PE_HOSTFILE, no group."""
    out = tmp_path / "run"
    cluster = ["--cluster", str(REPO / "configs" / "cluster" / "gridengine.yaml")]
    job_id = submit([*cluster, "--job-name", "generic"], small_dataset, out, STEPS, capfd)
    on_cell.wait_finished(job_id, 600)
    log = job_log("generic", job_id)
    accounting = on_cell.accounting(job_id)
    assert (accounting["exit_status"], accounting["failed"]) == ("0", "0"), log
    assert accounting["granted_pe"] == "mpi" and accounting["slots"] == "2", accounting
    assert f"launcher openmpi: rank 0/2, local rank 0/2, master {on_cell.host}:" in log, log
    assert "dp 2 x tp 1" in log
    assert_losses_match(out, reference)
    assert on_cell.run("qstat", "-u", "*") == ""  # finished: nothing resubmitted


def test_abci_style_stops_before_h_rt(on_cell, small_dataset, reference, tmp_path, capfd):
    """configs/cluster/abci2.yaml (-l rt_F=1, $SGE_JOB_HOSTLIST, qsub -g) with an h_rt that
    cannot hold the run: h_rt kills with SIGKILL and no warning, so each segment must stop on
    train.walltime_s = h_rt - margin - script time, checkpoint, exit 75 and resubmit itself
    (`qsub -g gabc -hold_jid`), until the run is done.

    h_rt is 180 s and the stop margin 178 s, so each segment's training budget is 2 s minus the
    seconds the script used before mpirun, and a `--setup` line that sleeps 3 s uses them up:
    the budget the script computes is floored at 0, so every segment stops after its first step
    whatever the machine's speed, and the 4-step run takes 4 segments. The 178 s left before
    h_rt hold the start-up before the trainer's clock starts (torch imports: up to a minute on
    a loaded 2-core machine), the step and the checkpoint.
    """
    site = yaml.safe_load((REPO / "configs" / "cluster" / "abci2.yaml").read_text())
    site.pop("modules")  # the site's CUDA modules do not exist here; every scheduler key stays
    cluster_file = tmp_path / "abci2-here.yaml"
    cluster_file.write_text(yaml.safe_dump(site))
    walltime, margin_s = "00:03:00", 178
    out = tmp_path / "run"
    args = [
        "--cluster",
        str(cluster_file),
        "--group",
        "gabc",
        "--job-name",
        "abci",
        "--walltime",
        walltime,
        "--stop-margin",
        str(margin_s),
        "--max-resubmits",
        "12",
        "--setup",
        "sleep 3",
    ]
    first = submit(args, small_dataset, out, STEPS, capfd)
    script = (tmp_path / "bert-sge.sh").read_text()
    assert "#$ -l rt_F=1" in script and f"#$ -l h_rt={walltime}" in script

    def all_done() -> list[str] | None:
        ids = sorted((p.name.split(".o")[1] for p in tmp_path.glob("abci.o*")), key=int)
        running = on_cell.run("qstat", "-u", "*")
        return ids if ids and not running else None  # a job resubmits before it ends

    segments = wait_for(all_done, 1200, "the run to finish over resubmitted jobs", 2)
    assert segments[0] == first and len(segments) >= 2, segments
    for number, job_id in enumerate(segments):
        log = job_log("abci", job_id)
        accounting = on_cell.accounting(job_id)
        # exit 0 and not failed: the script ended by itself (a kill at h_rt is exit 137 and
        # failed 37, test_h_rt_kills_a_job_that_overruns)
        assert (accounting["exit_status"], accounting["failed"]) == ("0", "0"), log
        assert accounting["account"] == "gabc" and accounting["qname"] == "rtf.q", accounting
        assert f"segment {number}" in log and f"master {on_cell.host}:" in log, log
        if number < len(segments) - 1:
            assert "wall-time budget of" in log and "resubmitted" in log, log
        else:
            assert "resubmitted" not in log, log
    assert_losses_match(out, reference)  # the same losses, resumed or not


def test_h_rt_kills_a_job_that_overruns(on_cell, tmp_path):
    """The h_rt test's oracle: in this cell, on the same queue, a job that runs past its h_rt is
    killed by Grid Engine and qacct says so (exit 137, failed 37 "qmaster enforced h_rt"), so a
    segment with exit 0 and failed 0 ended by itself before its h_rt."""
    script = tmp_path / "overrun.sh"
    script.write_text("#!/bin/sh\n#$ -cwd\n#$ -j y\n#$ -l rt_F=1\n#$ -l h_rt=0:0:5\nsleep 300\n")
    job_id = re.search(r"Your job (\d+)", on_cell.run("qsub", str(script))).group(1)
    on_cell.wait_finished(job_id, 240)
    accounting = on_cell.accounting(job_id)
    assert accounting["exit_status"].split()[0] == "137", accounting
    assert accounting["failed"].split()[0] != "0" and accounting["qname"] == "rtf.q", accounting


def test_failing_rank_is_reported_and_not_resubmitted(on_cell, small_dataset, tmp_path, capfd):
    """Rank 1 dies (SIGKILL, as the kernel's OOM killer does) in the middle of training: the job
    fails with a code that is not 75, mpirun's report names rank 1, the script says it does
    not resubmit, and no other job appears."""
    out = tmp_path / "run"
    cluster = ["--cluster", str(REPO / "configs" / "cluster" / "gridengine.yaml")]
    job_id = submit([*cluster, "--job-name", "failing"], small_dataset, out, 100_000, capfd)
    wait_for(lambda: len(losses(out)) >= 2, 600, "the job to train")
    os.kill(rank_pid(job_id, rank=1), 9)
    on_cell.wait_finished(job_id, 300)
    log = job_log("failing", job_id)
    accounting = on_cell.accounting(job_id)
    assert accounting["exit_status"] not in ("0", "75") and accounting["failed"] == "0", log
    assert re.search(r"rank 1 .*exited on signal 9", log), log
    assert "training failed with exit code" in log and "not resubmitted" in log, log
    time.sleep(2)
    assert on_cell.run("qstat", "-u", "*") == ""
    assert [p.name for p in tmp_path.glob("failing.o*")] == [f"failing.o{job_id}"]


def rank_pid(job_id: str, rank: int) -> int:
    """The pid of the trainer with Open MPI rank `rank` in Grid Engine job `job_id` (not one of
    its data-loader workers, which share its environment: the one whose parent is no rank)."""
    wanted = {f"JOB_ID={job_id}".encode(), f"OMPI_COMM_WORLD_RANK={rank}".encode()}
    ranks = {}
    for proc in Path("/proc").iterdir():
        try:
            environ = set((proc / "environ").read_bytes().split(b"\0"))
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if proc.name.isdigit() and wanted <= environ:
            ranks[int(proc.name)] = parent
    trainers = [pid for pid, parent in ranks.items() if parent not in ranks]
    assert len(trainers) == 1, f"rank {rank} of job {job_id}: processes {ranks}"
    return trainers[0]
