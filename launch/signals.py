"""Stop requests: a scheduler's warning signal or the wall-time budget ends training cleanly.

Slurm (`--signal=USR1@120`) and Grid Engine send SIGUSR1 before the kill, and SIGTERM comes at
the time limit; PBS sends nothing, hence `walltime_s`. The handler only sets a flag: the trainer
checks it between steps, writes a checkpoint and exits with EXIT_RESUBMIT.
"""

from __future__ import annotations

import os
import signal
import threading
import time

EXIT_RESUBMIT = 75  # "checkpointed and stopped on request; resubmit to continue"
STOP_SIGNALS = {signal.SIGUSR1, signal.SIGTERM}


def leave_stop_signals_to_the_trainer(_worker_id: int = 0) -> None:
    """For data-loader workers (their `worker_init_fn`): survive a stop signal meant for the job.

    `scancel`, a preemption, `qdel` and a terminal's process-group kill send SIGTERM to every
    process of the job, workers included. By default a worker dies of it at once and the
    trainer then fails on the lost worker instead of checkpointing. Here a thread takes the
    stop signals instead: a SIGTERM from the trainer itself (multiprocessing's `terminate()`,
    used to shut workers down) still ends the worker, as torch's own handler does; any other
    sender is left to the trainer, which got the same signal and will stop the worker.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_take_stop_signals, args=(os.getppid(),), daemon=True).start()


def _take_stop_signals(trainer_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == trainer_pid:
            os._exit(0)


class StopRequest:
    def __init__(self, walltime_s: float | None, start_time: float | None = None) -> None:
        self.start_time = time.monotonic() if start_time is None else start_time
        self.walltime_s = walltime_s
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> None:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def uninstall(self) -> None:
        """Put back the handlers `install` replaced: after training, SIGTERM ends the program
        that called the trainer again, instead of only setting a flag nobody reads."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal_name = signal.Signals(signum).name

    def reason(self) -> str | None:
        """Why training should stop now, or None."""
        if self.signal_name is not None:
            return f"received {self.signal_name}"
        if self.walltime_s is not None and time.monotonic() - self.start_time >= self.walltime_s:
            return f"wall-time budget of {self.walltime_s:.0f} s reached"
        return None
