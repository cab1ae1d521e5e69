"""Which rank of a multi-node `bert-prep encode` this process is, from the launcher's variables.

`mpirun -n 8 bert-prep encode ...` or `srun -n 8 bert-prep encode ...` start the same command
several times; each process finds its rank here, encodes its block of the work units and writes
them to the shared output directory. Rank 0 then waits until every unit's record is on disk,
removes duplicates across units and writes the manifest. The only communication is through
files on the shared filesystem, so no MPI library (mpi4py) is needed and any launcher works
that exports a rank.

The launcher is read by the same detector `bert-train` uses (`launch.env`, one source of truth
for Open MPI, MVAPICH2, MPICH/Intel MPI, Slurm steps and torchrun, including the rule that an
sbatch shell without srun is one process). `BERT_PREP_RANK`/`BERT_PREP_WORLD_SIZE`, set by hand
(e.g. by a job array that wants ranks), take precedence.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from data_prep.errors import PrepError
from launch.env import detect_environment
from launch.errors import LaunchError


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    launcher: str = "none"


def detect_rank(environ: Mapping[str, str] | None = None) -> RankInfo:
    """This process's rank among the `bert-prep encode` processes of one job."""
    env = os.environ if environ is None else environ
    if env.get("BERT_PREP_RANK", "") != "" or env.get("BERT_PREP_WORLD_SIZE", "") != "":
        try:
            rank, size = int(env["BERT_PREP_RANK"]), int(env["BERT_PREP_WORLD_SIZE"])
        except (KeyError, ValueError):
            message = "set both BERT_PREP_RANK and BERT_PREP_WORLD_SIZE, as integers"
            raise PrepError(message) from None
        if not 0 <= rank < size:
            raise PrepError(f"BERT_PREP_RANK={rank} is not in [0, BERT_PREP_WORLD_SIZE={size})")
        return RankInfo(rank, size, "bert-prep")
    try:
        found = detect_environment(env)
    except LaunchError as error:
        raise PrepError(str(error)) from None
    if found.world_size == 1:
        return RankInfo()
    return RankInfo(found.rank, found.world_size, found.launcher)
