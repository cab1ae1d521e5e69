"""The Grid Engine test cell itself (tests/e2e/gridengine_cell.py): where Grid Engine is missing
its tests skip with the reason, and whatever fails, the daemons it started do not outlive it.

Oracles: the reason `missing_reason()` gives on a PATH without the tools, and the cell's own
pid files, whose processes must have exited after `start_cell` returns or raises.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.e2e.gridengine_cell import missing_reason, start_cell, wait_for


def test_skip_reason_names_what_is_missing(tmp_path: Path, monkeypatch):
    """An empty PATH (as on a machine without the packages): the reason names the commands
    and the packages to install."""
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = missing_reason()
    assert reason is not None
    expected = "Grid Engine is not installed (qsub, qstat, qconf, qdel, mpirun missing)"
    assert reason.startswith(expected), reason
    assert "apt-get install -y gridengine-master gridengine-client gridengine-exec" in reason


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_daemons_stop_when_the_shutdown_requests_fail(tmp_path: Path):
    """A qmaster that no longer answers makes `qdel`/`qconf` fail or time out at shutdown; here
    they cannot even be found. sge_qmaster and sge_execd must still be stopped (from their pid
    files), not left running after the test session."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    pids: list[int] = []
    try:
        with start_cell(tmp_path / "cell") as cell:
            pid_files = [cell.spool / "qmaster" / "qmaster.pid"]
            pid_files += (cell.spool / "execd").glob("*/execd.pid")
            pids = [int(path.read_text().split()[0]) for path in pid_files]
            assert len(pids) == 2 and all(_alive(pid) for pid in pids), pids
            empty = tmp_path / "no-tools"
            empty.mkdir()
            cell.env["PATH"] = str(empty)
        wait_for(lambda: not any(_alive(pid) for pid in pids), 60, "the daemons to exit")
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
