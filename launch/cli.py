"""`bert-launch {slurm,pbs,sge,mpirun} [options] -- bert-train ...`: write or submit a job script.

Examples:
    # ABCI 3.0 (PBS Professional): 2 nodes x 8 H200, 24 h
    bert-launch pbs --group gXXXXX --nodes 2 --walltime 24:00:00 \\
        --modules cuda/12.6/12.6.1 hpcx/2.20 --setup "source ~/venv/bin/activate" \\
        -- bert-train --config configs/large.yaml data.path=/groups/gXXXXX/bert/data
    # Slurm, inside an Apptainer image, printed instead of written
    bert-launch slurm --nodes 4 --gpus-per-node 4 --partition gpu --image bert.sif --dry-run \\
        -- bert-train --config configs/base.yaml data.path=$PWD/data

Without --dry-run the script is written to --out (default bert-<scheduler>.sh); --submit also
submits it (sbatch / qsub / bash). Also `python -m launch`.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from launch.errors import LaunchError
from launch.fit import (
    fit_command,
    pop_fit_sections,
    read_cluster_file,
    resolve_cluster,
    with_cluster_key,
)
from launch.scripts import (
    CONTAINER_RUNTIMES,
    SCHEDULERS,
    JobSpec,
    render_script,
    script_notes,
)

DEFAULT_GPUS = {"slurm": 0, "pbs": 8, "sge": 4, "mpirun": 0}  # ABCI 3.0 rt_HF: 8; rt_F: 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bert-launch",
        description="Write (and with --submit, submit) a job script that runs bert-train on a "
        "cluster: one rank per GPU, resubmitted after a checkpoint on exit code 75.",
        usage="bert-launch {slurm,pbs,sge,mpirun} [options] -- bert-train --config FILE [k=v ...]",
        epilog="Everything after -- is the training command; train.resume=auto is appended (and "
        "for pbs/sge train.walltime_s). Schedulers: slurm (sbatch + srun), pbs (ABCI 3.0 style "
        "qsub -P GROUP -q rt_HF -l select=N), sge (ABCI 1.0/2.0 style qsub -g GROUP -l rt_F=N), "
        "mpirun (a plain mpirun over a hostfile).",
    )
    parser.add_argument("scheduler", choices=SCHEDULERS)
    parser.add_argument(
        "--cluster",
        metavar="NAME|FILE",
        help="a site's option defaults: a built-in name (a file under configs/cluster/, e.g. "
        "abci3) or a YAML file of your own (keys are option names; the command line wins)",
    )
    job = parser.add_argument_group("resources")
    job.add_argument(
        "--nodes", type=int, default=1, metavar="N", help="number of nodes (default 1)"
    )
    job.add_argument(
        "--gpus-per-node",
        type=int,
        metavar="G",
        help="GPUs per node, one rank each (default: pbs 8 = ABCI rt_HF, sge 4 = ABCI rt_F, "
        "slurm/mpirun 0 = CPU)",
    )
    job.add_argument(
        "--ranks-per-node",
        type=int,
        metavar="R",
        help="processes per node (default: GPUs per node, or 1)",
    )
    job.add_argument(
        "--walltime",
        default="01:00:00",
        metavar="HH:MM:SS",
        help="wall-time limit of each job (default 01:00:00; hours may exceed 24)",
    )
    job.add_argument(
        "--stop-margin",
        type=int,
        default=300,
        metavar="SECONDS",
        help="checkpoint and stop this long before the wall time (default 300)",
    )
    job.add_argument(
        "--group",
        "--account",
        "--project",
        dest="group",
        metavar="NAME",
        help="ABCI group / Slurm account / PBS project",
    )
    job.add_argument(
        "--queue",
        "--partition",
        "--resource-type",
        dest="queue",
        metavar="NAME",
        help="Slurm partition, PBS queue (default rt_HF), SGE resource type (default rt_F; "
        "with --parallel-environment: SGE queue)",
    )
    job.add_argument(
        "--parallel-environment",
        "--pe",
        metavar="NAME",
        help="sge only, for a generic Grid Engine site: request -pe NAME nodes*ranks slots and "
        "read the hosts from $PE_HOSTFILE (instead of ABCI's -l rt_F=N and -g group)",
    )
    job.add_argument("--job-name", default="bert", metavar="NAME", help="job name (default bert)")
    job.add_argument("--output", metavar="FILE", help="job log file (Slurm default %%x-%%j.out)")
    job.add_argument(
        "--directive",
        action="append",
        default=[],
        metavar="TEXT",
        help="extra scheduler directive, e.g. --directive='--qos=high' (repeatable)",
    )
    job.add_argument(
        "--hostfile", metavar="FILE", help="mpirun only: hostfile with 'host slots=N' lines"
    )
    job.add_argument(
        "--max-resubmits",
        type=int,
        metavar="N",
        default=20,
        help="resubmit at most this many times after exit 75 (default 20)",
    )
    software = parser.add_argument_group("software and environment")
    software.add_argument(
        "--modules", nargs="+", default=[], metavar="MODULE", help="environment modules to load"
    )
    software.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before the launch, e.g. 'source ~/venv/bin/activate' (repeatable)",
    )
    software.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="variable exported to every rank, e.g. NCCL_IB_TIMEOUT=22 (repeatable)",
    )
    software.add_argument(
        "--image", metavar="SIF", help="Apptainer/Singularity image (.sif) to run ranks in"
    )
    software.add_argument(
        "--container-runtime",
        choices=CONTAINER_RUNTIMES,
        default="singularity",
        help="command that runs --image (default singularity, as on ABCI)",
    )
    software.add_argument(
        "--bind", action="append", default=[], metavar="PATH", help="bind PATH into the image"
    )
    action = parser.add_argument_group("output")
    action.add_argument("--out", metavar="FILE", help="script path (default bert-<scheduler>.sh)")
    mode = action.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the script, write nothing")
    mode.add_argument("--submit", action="store_true", help="write the script and submit it")
    return parser


def apply_cluster_defaults(
    parser: argparse.ArgumentParser, path: str, scheduler: str
) -> dict[str, Any]:
    """Make the options in a cluster file the parser's defaults (command-line values win;
    repeatable options such as --env add to the file's); returns its fitted layouts."""
    data = read_cluster_file(resolve_cluster(path))
    hardware, layouts = pop_fit_sections(data, path)
    if hardware is not None and hardware.gpu == "cpu":  # a CPU node: ranks, no GPUs
        data.setdefault("ranks_per_node", hardware.gpus_per_node)
    elif hardware is not None:
        data.setdefault("gpus_per_node", hardware.gpus_per_node)
    wanted = data.pop("scheduler", scheduler)
    if wanted != scheduler:
        raise LaunchError(f"cluster file {path} is for {wanted}, not {scheduler}")
    names = {  # every spelling of an option: gpus_per_node, partition (= queue), account, ...
        option.lstrip("-").replace("-", "_"): action.dest
        for action in parser._actions
        for option in action.option_strings
        if action.dest not in ("help", "cluster", "dry_run", "submit", "out")
    }
    defaults = {}
    for key, value in data.items():
        dest = names.get(str(key).replace("-", "_"))
        if dest is None:
            raise LaunchError(
                f"cluster file {path}: unknown option {key!r}; use option names such as "
                "queue, group, gpus_per_node, modules, env"
            )
        if dest == "env" and isinstance(value, dict):
            value = [f"{k}={v}" for k, v in value.items()]
        if dest in ("modules", "setup", "env", "bind", "directive") and isinstance(value, str):
            value = [value]
        defaults[dest] = value
    parser.set_defaults(**defaults)
    return layouts


def spec_from_args(args: argparse.Namespace, command: list[str]) -> JobSpec:
    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise LaunchError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value  # the last wins: the command line over a cluster file
    gpus = args.gpus_per_node if args.gpus_per_node is not None else DEFAULT_GPUS[args.scheduler]
    return JobSpec(
        scheduler=args.scheduler,
        command=tuple(command),
        nodes=args.nodes,
        gpus_per_node=gpus,
        ranks_per_node=args.ranks_per_node,
        walltime=args.walltime,
        stop_margin_s=args.stop_margin,
        job_name=args.job_name,
        group=args.group,
        queue=args.queue,
        parallel_environment=args.parallel_environment,
        modules=tuple(str(m) for m in args.modules),
        setup=tuple(str(line) for line in args.setup),
        env=tuple(env.items()),
        image=args.image,
        container_runtime=args.container_runtime,
        binds=tuple(args.bind),
        hostfile=args.hostfile,
        output=args.output,
        directives=tuple(args.directive),
        max_resubmits=args.max_resubmits,
    )


def submit_command(spec: JobSpec, script: Path) -> list[str]:
    """How the first segment is started (the script resubmits itself the same way)."""
    if spec.scheduler == "slurm":
        return ["sbatch", str(script)]
    if spec.scheduler == "pbs":
        return ["qsub", str(script)]
    if spec.scheduler == "sge":
        return ["qsub", *(["-g", spec.group] if spec.group else []), str(script)]
    return ["bash", str(script)]


def write_script(path: Path, script: str) -> None:
    """Write the executable script whole or not at all (a temporary file renamed into place)."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(script)
        partial.chmod(0o755)
        partial.replace(path)
    except OSError as error:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise LaunchError(
            f"cannot write the job script to {path}: {error.strerror or error}; "
            "choose another --out"
        ) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if "--" in argv:
        split = argv.index("--")
        options, command = argv[:split], argv[split + 1 :]
    else:
        options, command = argv, []
    args = parser.parse_args(options)
    if not command:
        parser.error("give the training command after --, e.g. -- bert-train --config FILE")
    try:
        if args.cluster:
            layouts = apply_cluster_defaults(parser, args.cluster, args.scheduler)
            args = parser.parse_args(options)
            ranks = spec_from_args(args, command).ranks
            command, note = fit_command(command, layouts, args.nodes, ranks, args.cluster)
            command = with_cluster_key(command, args.cluster)
            if note:
                print(f"bert-launch: note: {note}", file=sys.stderr)
        spec = spec_from_args(args, command)
        path = Path(args.out or f"bert-{spec.scheduler}.sh")
        script = render_script(spec, path)
        for note in script_notes(spec):
            print(f"bert-launch: note: {note}", file=sys.stderr)
        if args.dry_run:
            print(script, end="")
            return 0
        write_script(path, script)
        submit = submit_command(spec, path)
        if not args.submit:
            print(f"bert-launch: wrote {path}; start it with: {' '.join(submit)}")
            return 0
        if shutil.which(submit[0]) is None:
            raise LaunchError(
                f"wrote {path}, but {submit[0]} is not on PATH: run bert-launch --submit on a "
                f"login node of the cluster, or copy the script there and run {' '.join(submit)}"
            )
        print(f"bert-launch: wrote {path}; {' '.join(submit)}", flush=True)
        return subprocess.run(submit).returncode
    except LaunchError as error:
        print(f"bert-launch: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
