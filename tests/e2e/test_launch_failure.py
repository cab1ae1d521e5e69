"""A rank that dies or hangs stops the other with an error within parallel.timeout_s, instead of
holding the job until its wall-time limit.

Two `python -m pretrain` processes per case, started with torchrun's variables (no launcher
that would kill the survivor for us, as mpirun and `srun --kill-on-bad-exit` do), train a long
run with parallel.timeout_s=10. Once they train, rank 1 is SIGKILLed in one case (its sockets
close) and SIGSTOPped in the other (it hangs: nothing closes, only the collective timeout can
end the wait). Oracle: rank 0 must exit on its own with a non-zero code that is not 75 (not a
checkpoint-and-stop) well before the 150 s the test allows; this proves there is no hang and
times nothing. Both cases run at the same time to keep the test short.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 10
ALLOWED_S = 150

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_pair(data: Path, out: Path) -> list[subprocess.Popen]:
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "SLURM_"))}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH", "")) if p)
    args = [
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
        "train.steps=100000",
        "train.precision=fp32",
        "train.log_every=1",
        "train.eval_every=100000",
        "train.eval_batches=1",
        "checkpoint.every=100000",
        f"parallel.timeout_s={TIMEOUT_S}",
    ]
    procs = []
    for rank in range(2):
        env = dict(
            base,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        with open(out.parent / f"{out.name}-rank{rank}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out.parent
                )
            )
    return procs


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_dead_or_hung_rank_stops_the_other(small_dataset, tmp_path):
    cases = {"killed": signal.SIGKILL, "hung": signal.SIGSTOP}
    pairs = {name: start_pair(small_dataset, tmp_path / name) for name in cases}
    try:
        deadline = time.monotonic() + 180
        pending = set(cases)
        struck: dict[str, float] = {}
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                procs = pairs[name]
                if any(p.poll() is not None for p in procs):
                    pytest.fail(f"{name}: a rank exited before the fault: {_logs(tmp_path, name)}")
                if steps_logged(tmp_path / name) >= 2:
                    procs[1].send_signal(cases[name])
                    struck[name] = time.monotonic()
                    pending.discard(name)
            time.sleep(0.25)
        assert not pending, f"{pending} never started training: {_logs(tmp_path, *pending)}"

        for name, procs in pairs.items():
            remaining = ALLOWED_S - (time.monotonic() - struck[name])
            try:
                code = procs[0].wait(timeout=max(remaining, 1))
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"{name}: rank 0 still running {ALLOWED_S} s after rank 1 was "
                    f"{name} (parallel.timeout_s={TIMEOUT_S}): {_logs(tmp_path, name)}"
                )
            assert code not in (0, 75), f"{name}: rank 0 exited {code}: {_logs(tmp_path, name)}"
    finally:
        for procs in pairs.values():
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()  # also ends a SIGSTOPped process
                proc.wait()


def _logs(tmp_path: Path, *names: str) -> str:
    text = []
    for name in names:
        for rank in range(2):
            path = tmp_path / f"{name}-rank{rank}.log"
            if path.exists():
                text.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-8:]))
    return "\n".join(text)
