"""Stop requests: a scheduler's warning signal or the wall-time budget ends training cleanly.

Slurm (`--signal=USR1@120`) and Grid Engine send SIGUSR1 before the kill, and SIGTERM comes at
the time limit; PBS sends nothing, hence `walltime_s`. The handler only sets a flag: the trainer
checks it between steps, writes a checkpoint and exits with EXIT_RESUBMIT.
"""

from __future__ import annotations

import signal
import time

EXIT_RESUBMIT = 75  # "checkpointed and stopped on request; resubmit to continue"


class StopRequest:
    def __init__(self, walltime_s: float | None, start_time: float | None = None) -> None:
        self.start_time = time.monotonic() if start_time is None else start_time
        self.walltime_s = walltime_s
        self.signal_name: str | None = None

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal_name = signal.Signals(signum).name

    def reason(self) -> str | None:
        """Why training should stop now, or None."""
        if self.signal_name is not None:
            return f"received {self.signal_name}"
        if self.walltime_s is not None and time.monotonic() - self.start_time >= self.walltime_s:
            return f"wall-time budget of {self.walltime_s:.0f} s reached"
        return None
