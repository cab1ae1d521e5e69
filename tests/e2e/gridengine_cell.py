"""A private single-node Son of Grid Engine cell for the launcher tests (`start_cell`).

Debian's gridengine-master/-client/-exec packages provide the binaries (under SGE_ROOT
/var/lib/gridengine); the cell itself is built from scratch in a temporary directory, so the
system's own cell is never touched: a new SGE_ROOT of symlinks to the binaries, a cell `bert`
with classic (plain file) spooling, sge_qmaster and sge_execd on free ports, run as root (CI
runs as root; `min_uid 0` lets root submit). Only `qconf`'s file forms (-A*/-M*) are used, since
the others open an editor. Pitfalls handled as research-notes/machine-facts.md describes them:
`act_qmaster` must name the host, and `host_aliases` maps `localhost` (what 127.0.0.1
reverse-resolves to) to the host name, or the qmaster refuses its own clients.

It has two site styles, one queue each, on the same host:
- `bert.q`, a generic Grid Engine queue: parallel environment `mpi` ($pe_slots: all slots on
  one host), the job's hosts in $PE_HOSTFILE.
- `rtf.q`, ABCI 2.0 style: the consumable complex `rt_F` (requestable FORCED, so only jobs that
  ask for `-l rt_F=N` land there, and they land nowhere else) and a starter method standing in
  for ABCI's site set-up: it writes the node list to $SGE_JOB_HOSTLIST and puts the
  `qsub -g GROUP` wrapper first on the job's PATH. Vanilla Grid Engine has no `-g`; the wrapper
  (`abci-qsub-g/qsub`) turns it into `-A GROUP` (the job's account string, $SGE_ACCOUNT) and
  runs the real qsub, so a job script that resubmits itself with `qsub -g` works as on ABCI.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEBIAN_SGE_ROOT = Path("/var/lib/gridengine")
LIBEXEC = Path("/usr/lib/gridengine")  # spoolinit, spooldefaults, sge_qmaster, sge_execd
CELL = "bert"
TOOLS = ("qsub", "qstat", "qconf", "qdel", "mpirun")
DAEMONS = ("sge_qmaster", "sge_execd", "spoolinit", "spooldefaults")
FINISHED_STATES = ("", "done")

EXECHOST = """hostname {host}
load_scaling NONE
complex_values NONE
user_lists NONE
xuser_lists NONE
projects NONE
xprojects NONE
usage_scaling NONE
report_variables NONE
"""

PARALLEL_ENVIRONMENT = """pe_name mpi
slots 16
user_lists NONE
xuser_lists NONE
start_proc_args NONE
stop_proc_args NONE
allocation_rule $pe_slots
control_slaves TRUE
job_is_first_task FALSE
urgency_slots min
accounting_summary FALSE
qsort_args NONE
"""

# name shortcut type relop requestable consumable default urgency
RT_F_COMPLEX = "rt_F rt_F INT <= FORCED YES 0 0"

QUEUE = """qname {name}
hostlist {host}
seq_no 0
load_thresholds NONE
suspend_thresholds NONE
nsuspend 1
suspend_interval 00:05:00
priority 0
min_cpu_interval 00:05:00
processors UNDEFINED
qtype BATCH
ckpt_list NONE
pe_list {pe_list}
rerun FALSE
slots 4
tmpdir {tmpdir}
shell /bin/sh
prolog NONE
epilog NONE
shell_start_mode posix_compliant
starter_method {starter}
suspend_method NONE
resume_method NONE
terminate_method NONE
notify 00:00:60
owner_list NONE
user_lists NONE
xuser_lists NONE
subordinate_list NONE
complex_values {complex_values}
projects NONE
xprojects NONE
calendar NONE
initial_state default
s_rt INFINITY
h_rt INFINITY
s_cpu INFINITY
h_cpu INFINITY
s_fsize INFINITY
h_fsize INFINITY
s_data INFINITY
h_data INFINITY
s_stack INFINITY
h_stack INFINITY
s_core INFINITY
h_core INFINITY
s_rss INFINITY
h_rss INFINITY
s_vmem INFINITY
h_vmem INFINITY
"""

# What ABCI's site set-up gives every job, for a vanilla Grid Engine: a host list file and `-g`.
ABCI_STARTER = """#!/bin/sh
# ABCI 2.0 stand-in (test cell only): the node list in $SGE_JOB_HOSTLIST, qsub -g on PATH.
hostname > "$SGE_JOB_SPOOL_DIR/sge_job_hostlist"
export SGE_JOB_HOSTLIST="$SGE_JOB_SPOOL_DIR/sge_job_hostlist"
export PATH="{wrapper_dir}:$PATH"
exec "${{SGE_STARTER_SHELL_PATH:-/bin/sh}}" "$@"
"""

QSUB_G_WRAPPER = """#!/bin/sh
# ABCI's `qsub -g GROUP` for a vanilla Grid Engine (test cell only): -g becomes -A GROUP.
for arg do
    shift
    if [ "${{take_group:-}}" = 1 ]; then set -- "$@" -A "$arg"; take_group=; continue; fi
    if [ "$arg" = -g ]; then take_group=1; continue; fi
    set -- "$@" "$arg"
done
exec {qsub} "$@"
"""


def missing_reason() -> str | None:
    """Why this machine cannot run the cell, or None."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    missing += [name for name in DAEMONS if not (LIBEXEC / name).exists()]
    if missing or not (DEBIAN_SGE_ROOT / "util").is_dir():
        return (
            f"Grid Engine is not installed ({', '.join(missing) or DEBIAN_SGE_ROOT} missing): "
            "apt-get install -y gridengine-master gridengine-client gridengine-exec openmpi-bin"
        )
    if os.geteuid() != 0:
        return "starting sge_execd needs root (CI runs as root)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class GridEngineCell:
    """Commands against the private cell; `env` is what a user's shell on it would have."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sge_root = root / "sge"
        self.spool = root / "spool"
        self.host = socket.gethostname().split(".")[0]
        self.wrapper_dir = root / "abci-qsub-g"
        self.env = {
            **os.environ,
            "SGE_ROOT": str(self.sge_root),
            "SGE_CELL": CELL,
            "SGE_QMASTER_PORT": str(_free_port()),
            "SGE_EXECD_PORT": str(_free_port()),
        }

    def run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=60, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def qconf_file(self, option: str, name: str, text: str) -> None:
        """`qconf -A*`/`-M*` with a file (the file's name matters for -Mconf)."""
        path = self.root / "qconf" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        self.run("qconf", option, str(path))

    def job_state(self, job_id: str) -> str:
        """The job's state letters in qstat ("r", "qw", "hqw", ...), "" once it has left."""
        for line in self.run("qstat", "-u", "*").splitlines()[2:]:
            fields = line.split()
            if fields and fields[0] == job_id:
                return fields[4]
        return ""

    def wait_finished(self, job_id: str, timeout_s: float) -> None:
        wait_for(lambda: self.job_state(job_id) == "", timeout_s, f"job {job_id} to finish")

    def accounting(self, job_id: str) -> dict[str, str]:
        """`qacct -j`: exit status, failure reason, ... of a finished job (once its record is
        complete: the qmaster flushes the accounting file every second, a record may be cut)."""

        def record() -> dict[str, str] | None:
            text = self.run("qacct", "-j", job_id, check=False)
            fields = dict(re.findall(r"^(\w+)\s+(.*?)\s*$", text, re.M))
            return fields if "exit_status" in fields and "failed" in fields else None

        return wait_for(record, 60, f"the accounting record of job {job_id}")

    def logs(self) -> str:
        parts = []
        for path in sorted(self.spool.rglob("messages")):
            parts.append(f"--- {path}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)


@contextmanager
def start_cell(root: Path) -> Iterator[GridEngineCell]:
    """Build, start and finally stop a cell under `root` (callers skip on `missing_reason()`)."""
    cell = GridEngineCell(root)
    common = cell.sge_root / CELL / "common"
    common.mkdir(parents=True)
    for name in ("bin", "utilbin", "util"):
        (cell.sge_root / name).symlink_to(DEBIAN_SGE_ROOT / name)
    qmaster_spool = cell.spool / "qmaster"
    for sub in ("qmaster/job_scripts", "execd", "tmp"):
        (cell.spool / sub).mkdir(parents=True)
    (common / "bootstrap").write_text(
        "admin_user root\ndefault_domain none\nignore_fqdn true\n"
        f"spooling_method classic\nspooling_lib libspoolc\n"
        f"spooling_params {common};{qmaster_spool}\nbinary_path {LIBEXEC}\n"
        f"qmaster_spool_dir {qmaster_spool}\nsecurity_mode none\n"
        "listener_threads 2\nworker_threads 2\nscheduler_threads 1\n"
    )
    (common / "act_qmaster").write_text(cell.host + "\n")
    (common / "host_aliases").write_text(f"{cell.host} localhost\n")
    defaults = Path("/usr/share/gridengine")
    config = (defaults / "default-configuration").read_text()
    for key, value in (
        ("execd_spool_dir", cell.spool / "execd"),
        ("min_uid", 0),
        ("min_gid", 0),
        ("load_report_time", "00:00:05"),
    ):
        config = re.sub(rf"^{key}\s.*$", f"{key} {value}", config, flags=re.M)
    config = config.replace("flush_time=00:00:15", "flush_time=00:00:01")  # qacct at once
    (cell.root / "global").write_text(config)
    cell.run(
        str(LIBEXEC / "spoolinit"), "classic", "libspoolc", f"{common};{qmaster_spool}", "init"
    )
    cell.run(str(LIBEXEC / "spooldefaults"), "configuration", str(cell.root / "global"))
    cell.run(str(LIBEXEC / "spooldefaults"), "complexes", str(defaults / "util/resources/centry"))
    cell.run(str(LIBEXEC / "spooldefaults"), "usersets", str(defaults / "util/resources/usersets"))
    cell.run(str(LIBEXEC / "spooldefaults"), "managers", "root")

    cell.wrapper_dir.mkdir()
    wrapper = cell.wrapper_dir / "qsub"
    wrapper.write_text(QSUB_G_WRAPPER.format(qsub=shutil.which("qsub")))
    starter = cell.root / "abci-starter.sh"
    starter.write_text(ABCI_STARTER.format(wrapper_dir=cell.wrapper_dir))
    for path in (wrapper, starter):
        path.chmod(0o755)
    os.chmod(root, 0o755)

    try:
        cell.run(str(LIBEXEC / "sge_qmaster"))
        wait_for(lambda: cell.run("qconf", "-sh", check=False), 60, "sge_qmaster to answer")
        cell.run("qconf", "-as", cell.host)
        cell.qconf_file("-Ae", "exechost", EXECHOST.format(host=cell.host))
        cell.run(str(LIBEXEC / "sge_execd"))
        cell.qconf_file("-Ap", "mpi", PARALLEL_ENVIRONMENT)
        complexes = cell.run("qconf", "-sc")
        cell.qconf_file("-Mc", "complexes", complexes + RT_F_COMPLEX + "\n")
        sched = cell.run("qconf", "-ssconf")
        for key, value in (
            ("schedule_interval", "0:0:1"),
            ("flush_submit_sec", "1"),
            ("flush_finish_sec", "1"),
        ):
            sched = re.sub(rf"^{key}\s.*$", f"{key} {value}", sched, flags=re.M)
        cell.qconf_file("-Msconf", "sched", sched)
        tmpdir = cell.spool / "tmp"
        cell.qconf_file(
            "-Aq",
            "bert.q",
            QUEUE.format(
                name="bert.q",
                host=cell.host,
                pe_list="mpi",
                tmpdir=tmpdir,
                starter="NONE",
                complex_values="NONE",
            ),
        )
        cell.qconf_file(
            "-Aq",
            "rtf.q",
            QUEUE.format(
                name="rtf.q",
                host=cell.host,
                pe_list="NONE",
                tmpdir=tmpdir,
                starter=starter,
                complex_values="rt_F=1",
            ),
        )
        wait_for(lambda: _queues_up(cell), 60, "the execution daemon to report")
        yield cell
    except AssertionError as error:
        raise AssertionError(f"{error}\n{cell.logs()}") from None
    finally:
        _shutdown(cell)
        _stop([qmaster_spool / "qmaster.pid", *(cell.spool / "execd").glob("*/execd.pid")])


def _shutdown(cell: GridEngineCell) -> None:
    """Ask the cell to delete its jobs and stop its daemons. A request that cannot run or does
    not answer (a hung qmaster: cell.run's timeout) must not keep `_stop` from running."""
    for request in (("qdel", "-u", "*"), ("qconf", "-kej", cell.host), ("qconf", "-km")):
        try:
            cell.run(*request, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue


def _queues_up(cell: GridEngineCell) -> bool:
    """Both queue instances exist and carry no state flags (a: alarm/no load report, u: down)."""
    text = cell.run("qstat", "-f", check=False)
    states = {}
    for line in text.splitlines():
        fields = line.split()
        if fields and "@" in fields[0]:
            states[fields[0].split("@")[0]] = fields[5] if len(fields) > 5 else ""
    return set(states) == {"bert.q", "rtf.q"} and not any(states.values())


def _stop(pid_files: list[Path]) -> None:
    """Wait for the daemons this cell started (pids from their own pid files) to exit after the
    shutdown requests; SIGTERM any that have not within 20 s. Nothing else is signalled."""
    pids = set()
    for path in pid_files:
        try:
            pids.add(int(path.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
    deadline = time.monotonic() + 20
    while pids and time.monotonic() < deadline:
        pids = {pid for pid in pids if _alive(pid)}
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
