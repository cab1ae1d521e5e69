"""Job scripts for Slurm, PBS Professional, Grid Engine and a plain mpirun, from launch/templates/.

A `JobSpec` says what to run where; `render_script` fills the scheduler's template. Templates are
ordinary shell scripts with `{{name}}` placeholders (no template language, nothing conditional):
the optional parts (directives, module loads, exports, a container) are rendered here as whole
lines, and a line holding only an empty placeholder disappears. The result is meant to be read
and edited by a person.

What every script does: one rank per GPU (or `ranks_per_node` on CPUs), MASTER_ADDR = the first
host (rank 0's), MASTER_PORT from the job id, `train.resume=auto` appended to a bert-train
command, and on exit code 75 (checkpointed and stopped on request) a resubmission of itself that
waits for the current job to end. Slurm stops the ranks with `--signal=USR1@margin`; PBS and
Grid Engine give no warning before the wall time, so their scripts pass
`train.walltime_s = wall time - margin - time already used by the script`.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from launch.errors import LaunchError

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATES = {"slurm": "slurm.sbatch", "pbs": "pbs.sh", "sge": "sge.sh", "mpirun": "mpirun.sh"}
SCHEDULERS = tuple(TEMPLATES)
CONTAINER_RUNTIMES = ("singularity", "apptainer")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Values written into a #SBATCH / #PBS / #$ directive are read by the scheduler, not by a shell:
# a newline there would start a shell line of the job, and whitespace or quotes split or confuse
# the scheduler's own parsing. Names (job, group, queue) take what all three schedulers accept.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_QUEUE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+,-]*$")  # Slurm takes a list: gpu,gpu-long
_DIRECTIVE_PATH = re.compile(r"^[^\s'\"\\`\x00-\x1f\x7f]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The mpirun templates pass these with -x already.
_PASSED_ANYWAY = frozenset(
    (
        "MASTER_ADDR",
        "MASTER_PORT",
        "OMP_NUM_THREADS",
        "PATH",
        "LD_LIBRARY_PATH",
        "PYTHONPATH",
        "VIRTUAL_ENV",
    )
)


@dataclass(frozen=True)
class JobSpec:
    """What to run and on what: the options of `bert-launch`."""

    scheduler: str
    """slurm | pbs | sge | mpirun."""
    command: tuple[str, ...]
    """The training command, e.g. ("bert-train", "--config", "configs/base.yaml", ...)."""
    nodes: int = 1
    gpus_per_node: int = 0
    """GPUs requested per node (0 = CPU job); one rank per GPU."""
    ranks_per_node: int | None = None
    """Processes per node; default: gpus_per_node, or 1 without GPUs."""
    walltime: str = "01:00:00"
    """HH:MM:SS (hours may exceed 24)."""
    stop_margin_s: int = 300
    """Seconds before the wall time at which the trainer checkpoints and exits 75."""
    job_name: str = "bert"
    group: str | None = None
    """Slurm account, PBS project (ABCI group, `-P`), Grid Engine group (ABCI `qsub -g`)."""
    queue: str | None = None
    """Slurm partition, PBS queue (ABCI 3.0: rt_HF), Grid Engine resource type (ABCI: rt_F), or
    with a `parallel_environment` the Grid Engine queue (`-q`)."""
    parallel_environment: str | None = None
    """Grid Engine only: a generic site's parallel environment. The job asks for
    `-pe NAME nodes*ranks` slots and reads its hosts from $PE_HOSTFILE, instead of ABCI's
    `-l rt_F=nodes` and `qsub -g group`."""
    modules: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    """Shell lines run before the launch, e.g. "source ~/venv/bin/activate"."""
    env: tuple[tuple[str, str], ...] = ()
    """Exported to every rank (NCCL_*, UCX_*, ...); values are literal (single-quoted): a `$` or
    `$(...)` in them is not expanded (use a `setup` line for a value the job's shell computes)."""
    image: str | None = None
    """Apptainer/Singularity image (.sif) to run each rank in."""
    container_runtime: str = "singularity"
    binds: tuple[str, ...] = ()
    """Extra paths to bind into the container (e.g. /groups/gXXX)."""
    hostfile: str | None = None
    """mpirun only: "host slots=N" lines; None = this machine."""
    output: str | None = None
    """Log file of the job (Slurm default: %x-%j.out in the submission directory)."""
    directives: tuple[str, ...] = ()
    """Extra scheduler directives, written after #SBATCH / #PBS / #$."""
    max_resubmits: int = 20
    """Stop resubmitting after this many segments (guards against a run that cannot progress)."""

    @property
    def ranks(self) -> int:
        if self.ranks_per_node is not None:
            return self.ranks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1


# The training budget of a PBS/SGE job, in the script's own shell arithmetic: the wall time minus
# the stop margin minus the seconds the script has used, floored at 0.
WALLTIME_LEFT = (
    "$(( WALLTIME_S - STOP_MARGIN_S - SECONDS > 0 ? WALLTIME_S - STOP_MARGIN_S - SECONDS : 0 ))"
)


def walltime_seconds(text: str) -> int:
    """Seconds in "HH:MM:SS" (or "MM:SS"); hours may exceed 24 (ABCI allows 168:00:00)."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise LaunchError(f"wall time {text!r} is not HH:MM:SS, e.g. 24:00:00")
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return seconds


def render_script(spec: JobSpec, script_path: Path) -> str:
    """The job script for `spec`, to be written at `script_path` (it resubmits that path).

    Every value that reaches a shell line is shell-quoted, every value that reaches a scheduler
    directive is validated, and the result must pass `bash -n`.
    """
    _validate(spec)
    if _CONTROL.search(str(script_path)):
        raise LaunchError(
            f"--out {str(script_path)!r}: a script path cannot hold a newline or "
            "other control character"
        )
    script_path = script_path.resolve()
    walltime_s = walltime_seconds(spec.walltime)
    values = {
        "script_path": str(script_path),
        "script_path_quoted": shlex.quote(str(script_path)),
        "job_name": spec.job_name,
        "nodes": str(spec.nodes),
        "ranks_per_node": str(spec.ranks),
        "walltime": _normalized_walltime(walltime_s),
        "walltime_s": str(walltime_s),
        "stop_margin_s": str(spec.stop_margin_s),
        "max_resubmits": str(spec.max_resubmits),
        "optional_directives": "\n".join(_directives(spec)),
        "setup": "\n".join(_setup_lines(spec)),
        "env_exports": "\n".join(f"export {key}={shlex.quote(value)}" for key, value in spec.env),
        "mpirun_env": "".join(f" -x {key}" for key, _ in spec.env if key not in _PASSED_ANYWAY),
        "container": _container_prefix(spec),
        "command": _command(spec),
        "output": spec.output or "%x-%j.out",
        "group_option": f"-g {shlex.quote(spec.group)} " if spec.group else "",
        "hostfile_quoted": shlex.quote(spec.hostfile) if spec.hostfile else '""',
    }
    template = (TEMPLATE_DIR / TEMPLATES[spec.scheduler]).read_text()
    script = fill_template(template, values)
    _check_syntax(script, spec)
    return script


def fill_template(template: str, values: dict[str, str]) -> str:
    """Replace {{name}}; drop lines that held only an empty placeholder; unknown names fail."""
    lines = []
    for line in template.splitlines():
        names = _PLACEHOLDER.findall(line)
        missing = [name for name in names if name not in values]
        if missing:
            raise KeyError(f"template placeholder {{{{{missing[0]}}}}} has no value")
        if names and line.strip() == f"{{{{{names[0]}}}}}" and not values[names[0]]:
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], line))
    return "\n".join(lines) + "\n"


# --- pieces ---------------------------------------------------------------------------------------


def _validate(spec: JobSpec) -> None:
    if spec.scheduler not in TEMPLATES:
        raise LaunchError(f"unknown scheduler {spec.scheduler!r}: choose one of {SCHEDULERS}")
    if not spec.command:
        raise LaunchError("no training command: give it after --, e.g. -- bert-train --config ...")
    if spec.nodes < 1 or spec.gpus_per_node < 0 or spec.ranks < 1:
        raise LaunchError("--nodes and --ranks-per-node must be >= 1, --gpus-per-node >= 0")
    walltime_s = walltime_seconds(spec.walltime)
    if spec.stop_margin_s < 0 or spec.stop_margin_s >= walltime_s:
        raise LaunchError(
            f"--stop-margin {spec.stop_margin_s} s leaves no training time in a wall time of "
            f"{spec.walltime}: use a longer --walltime or a smaller --stop-margin"
        )
    if spec.scheduler == "mpirun" and spec.nodes > 1 and not spec.hostfile:
        raise LaunchError("mpirun on more than one node needs --hostfile (host slots=N per line)")
    for key, _ in spec.env:
        if not _ENV_NAME.match(key):
            raise LaunchError(f"--env {key}=...: {key!r} is not a variable name")
    if spec.container_runtime not in CONTAINER_RUNTIMES:
        raise LaunchError(f"--container-runtime must be one of {CONTAINER_RUNTIMES}")
    if spec.max_resubmits < 0:
        raise LaunchError("--max-resubmits must be >= 0")
    names = (
        ("--job-name", spec.job_name, _NAME),
        ("--group", spec.group, _NAME),
        ("--queue", spec.queue, _QUEUE),
        ("--parallel-environment", spec.parallel_environment, _NAME),
        ("--output", spec.output, _DIRECTIVE_PATH),
    )
    for option, value, pattern in names:
        if value is not None and not pattern.match(value):
            raise LaunchError(
                f"{option} {value!r}: not allowed in a scheduler directive; use letters, digits "
                "and _ . - + (a path for --output), with no spaces, quotes or newlines"
            )
    if spec.parallel_environment is not None:
        if spec.scheduler != "sge":
            raise LaunchError("--parallel-environment is for Grid Engine (sge) only")
        if spec.group is not None:
            raise LaunchError(
                "--group is ABCI's qsub -g, which a Grid Engine site with a parallel environment "
                "does not have: leave it out, or pass your site's option with --directive"
            )
    for directive in spec.directives:
        if _CONTROL.search(directive):
            raise LaunchError(f"--directive {directive!r}: one directive per option, no newlines")


def _check_syntax(script: str, spec: JobSpec) -> None:
    """`bash -n` on the script. Once values are quoted and validated, only a --setup line (shell
    code on purpose) can break it; without one, a failure is a bug of ours."""
    if shutil.which("bash") is None:
        return  # nothing to check with; every cluster node that runs the script has bash
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    if result.returncode == 0:
        return
    message = " ".join(result.stderr.split())
    if spec.setup:
        raise LaunchError(
            f"the job script would not parse (bash -n: {message}): check the --setup lines"
        )
    raise RuntimeError(f"internal error: bert-launch wrote a script bash -n rejects: {message}")


def _normalized_walltime(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def _directives(spec: JobSpec) -> list[str]:
    prefix = {"slurm": "#SBATCH", "pbs": "#PBS", "sge": "#$", "mpirun": None}[spec.scheduler]
    if prefix is None:
        if spec.directives:
            raise LaunchError("--directive has no meaning for mpirun (no scheduler)")
        return []
    lines = []
    if spec.scheduler == "slurm":
        if spec.gpus_per_node:
            lines.append(f"--gpus-per-node={spec.gpus_per_node}")
        if spec.queue:
            lines.append(f"--partition={spec.queue}")
        if spec.group:
            lines.append(f"--account={spec.group}")
    elif spec.scheduler == "pbs":
        lines.append(f"-q {spec.queue or 'rt_HF'}")
        if spec.group:
            lines.append(f"-P {spec.group}")
        if spec.output:
            lines.append(f"-o {spec.output}")
    elif spec.scheduler == "sge":
        if spec.parallel_environment:  # a generic site: slots from a parallel environment
            lines.append(f"-pe {spec.parallel_environment} {spec.nodes * spec.ranks}")
            if spec.queue:
                lines.append(f"-q {spec.queue}")
        else:  # ABCI: whole nodes of a resource type
            lines.append(f"-l {spec.queue or 'rt_F'}={spec.nodes}")
        if spec.output:
            lines.append(f"-o {spec.output}")
    lines += list(spec.directives)
    return [f"{prefix} {line}" for line in lines]


def _setup_lines(spec: JobSpec) -> list[str]:
    lines = []
    if spec.modules:
        # Batch shells are not login shells: make sure `module` exists (ABCI's documented line).
        lines.append(
            "type module >/dev/null 2>&1 || source /etc/profile.d/modules.sh  # environment modules"
        )
        lines.append("module load " + " ".join(shlex.quote(m) for m in spec.modules))
    lines += list(spec.setup)
    return lines


def _container_prefix(spec: JobSpec) -> str:
    if not spec.image:
        return ""
    words = [spec.container_runtime, "exec"]
    if spec.gpus_per_node > 0:
        words.append("--nv")  # the host's NVIDIA driver and GPUs inside the container
    for path in spec.binds:
        words += ["--bind", path]
    words.append(spec.image)
    return shlex.join(words) + " "


def script_notes(spec: JobSpec) -> list[str]:
    """Things the user should know about the script for `spec` (the CLI prints them)."""
    notes = []
    if not _is_bert_train(spec.command):
        notes.append(
            f"{spec.command[0]} is not bert-train: added no train.resume=auto or "
            "train.walltime_s; the command must checkpoint, exit 75 and resume by itself"
        )
    if spec.gpus_per_node and spec.ranks != spec.gpus_per_node:
        notes.append(
            f"{spec.ranks} ranks per node on {spec.gpus_per_node} GPUs: the trainer puts local "
            "rank r on GPU r, so some GPUs are idle or ranks fail"
        )
    return notes


def _is_bert_train(command: tuple[str, ...]) -> bool:
    first = Path(command[0]).name
    if first == "bert-train":
        return True
    return any(a == "-m" and b == "pretrain" for a, b in zip(command, command[1:], strict=False))


def _command(spec: JobSpec) -> str:
    """The command, one `key=value` override per line, plus the overrides the job needs."""
    words = [shlex.quote(word) for word in spec.command]
    if _is_bert_train(spec.command):
        keys = {w.split("=", 1)[0] for w in spec.command if "=" in w and not w.startswith("-")}
        if "train.resume" not in keys:
            words.append("train.resume=auto")
        if spec.scheduler in ("pbs", "sge") and "train.walltime_s" not in keys:
            # Evaluated when the ranks start: $SECONDS is the time the script has used so far.
            # Never below 0: a job whose setup used up its budget still makes one step and
            # checkpoints (exit 75, resubmitted) instead of failing on a negative value.
            words.append(f"train.walltime_s={WALLTIME_LEFT}")
    head: list[str] = []
    rest: list[str] = []
    for word in words:
        (rest if rest or ("=" in word and not word.startswith("-")) else head).append(word)
    lines = [" ".join(head)] + rest
    return " \\\n        ".join(lines)
