"""Which rank of a multi-node `bert-prep encode` this process is, from the launcher's variables.

`mpirun -n 8 bert-prep encode ...` or `srun -n 8 bert-prep encode ...` start the same command
several times; each process finds its rank here, encodes its block of the work units and writes
them to the shared output directory. Rank 0 then waits until every unit's record is on disk,
removes duplicates across units and writes the manifest. The only communication is through
files on the shared filesystem, so no MPI library (mpi4py) is needed and any launcher works
that exports a rank: Open MPI, MVAPICH2, MPICH/Intel MPI (PMI), Slurm's srun, torchrun, or
BERT_PREP_RANK/BERT_PREP_WORLD_SIZE set by hand (e.g. by a job array that wants ranks, or a
test).

Slurm: only an srun step counts (SLURM_STEP_NUM_TASKS), not the batch script itself, whose
SLURM_NTASKS would otherwise make a lone `bert-prep` wait for ranks that never start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from data_prep.errors import PrepError

_VARIABLES = (
    ("bert-prep", "BERT_PREP_RANK", "BERT_PREP_WORLD_SIZE"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("mvapich2", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
    ("mpich", "PMI_RANK", "PMI_SIZE"),
    ("slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),
    ("torchrun", "RANK", "WORLD_SIZE"),
)


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    launcher: str = "none"


def detect_rank(environ: Mapping[str, str] | None = None) -> RankInfo:
    env = os.environ if environ is None else environ
    for launcher, rank_var, size_var in _VARIABLES:
        if env.get(rank_var, "") != "" and env.get(size_var, "") != "":
            try:
                rank, size = int(env[rank_var]), int(env[size_var])
            except ValueError:
                raise PrepError(f"{rank_var}/{size_var} are not integers") from None
            if not 0 <= rank < size:
                raise PrepError(f"{rank_var}={rank} is not in [0, {size_var}={size})")
            return RankInfo(rank, size, launcher)
    return RankInfo()
