"""A real `mpirun -np 2` (Open MPI) without MASTER_ADDR: rank 0 picks its address and a free
port, mpi4py broadcasts them, and both ranks join one gloo group.

Each rank writes its report to its own file: mpirun forwards the ranks' stdout through one pipe
and may splice two ranks' lines together.

Oracle: an all-reduce of (rank + 1) over the group must give 1 + 2 = 3 on both ranks, and both
must report the same master; exact integers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, os, pathlib, torch, torch.distributed as dist
from launch.env import detect_environment
from launch.rendezvous import init_distributed
torch.set_num_threads(1)
env = detect_environment()
joined = init_distributed(env, "gloo", 60)
total = torch.tensor([env.rank + 1.0])
dist.all_reduce(total)
report = {"line": joined.describe(), "rank": env.rank, "total": total.item(),
          "master": [joined.master_addr, joined.master_port]}
out = pathlib.Path(os.environ["PROBE_OUT"]) / f"rank{env.rank}.json"
out.write_text(json.dumps(report))
dist.destroy_process_group()
"""


def mpirun_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "OMPI_", "PMI"))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def test_mpi4py_agrees_on_the_master(tmp_path: Path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed: apt-get install -y openmpi-bin libopenmpi-dev")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py not installed: pip install -c constraints.txt mpi4py (extra 'mpi')")
    result = subprocess.run(
        [
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "2",
            sys.executable,
            "-c",
            PROBE,
        ],
        env={**mpirun_env(), "PROBE_OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reports = sorted(tmp_path.glob("rank*.json"))
    assert [p.name for p in reports] == ["rank0.json", "rank1.json"], result.stdout + result.stderr
    ranks = [json.loads(p.read_text()) for p in reports]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["total"] for r in ranks] == [3.0, 3.0]
    assert ranks[0]["master"] == ranks[1]["master"]
    assert ranks[0]["master"][0] == "127.0.0.1"  # both ranks on this host
    assert ranks[1]["line"].startswith("launcher openmpi: rank 1/2, local rank 1/2, master ")
