"""`bert-prep encode` as several ranks of one job (as under mpirun/srun) sharing --out.

The ranks are real processes started with the variables Open MPI / Slurm export (no MPI
library needed: ranks meet through the files in the output directory). Oracle: one process
encoding the same corpus: same shard names and bytes, same manifest apart from "run".
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.encode import encode_corpus
from data_prep.errors import PrepError
from data_prep.ranks import RankInfo, detect_rank
from data_prep.shard_format import verify
from data_prep.sources import CORPUS_DIR
from data_prep.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[2]

# What Open MPI exports to rank r of `mpirun -n 4` on one node, and Slurm to task r of an srun step.
OPENMPI = [
    {
        "OMPI_COMM_WORLD_RANK": str(r),
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": str(r),
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    }
    for r in range(4)
]


def srun_task(rank: int, world: int) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_STEP_NUM_TASKS": str(world),
        "SLURM_NTASKS": str(world),
    }


def test_rank_variables_of_each_launcher() -> None:
    """Oracle: the variables each launcher documents; a Slurm batch script (no srun step)
    is not a multi-rank job."""
    assert detect_rank({}) == RankInfo()
    assert detect_rank(OPENMPI[3]) == RankInfo(3, 4, "openmpi")
    mpich = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    assert detect_rank(mpich).launcher == "mpich"
    assert detect_rank(srun_task(5, 8)) == RankInfo(5, 8, "slurm")
    batch_shell = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    assert detect_rank(batch_shell) == RankInfo()
    assert detect_rank({"BERT_PREP_RANK": "1", "BERT_PREP_WORLD_SIZE": "3"}) == RankInfo(
        1, 3, "bert-prep"
    )
    with pytest.raises(PrepError, match="local rank"):
        detect_rank({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})


def test_two_ranks_write_the_single_process_dataset(tmp_path: Path) -> None:
    """Oracle: the one-process run; rank 1 starts late and rank 0 must wait for its units
    (duplicates across the two ranks' units are removed by rank 0 at the end)."""
    text = gzip.decompress((CORPUS_DIR / "gutenberg_excerpt.txt.gz").read_bytes()).decode()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(text[:150_000])
    (tmp_path / "in" / "b.txt").write_text(text[20_000:60_000])
    tok = train_tokenizer([tmp_path / "in"], tmp_path / "tok", "wordpiece", 800)
    single = encode_corpus([tmp_path / "in"], tok, tmp_path / "one", unit_bytes=40_000)

    args = [
        sys.executable,
        "-m",
        "data_prep",
        "encode",
        "--input",
        tmp_path / "in",
        "--tokenizer",
        tok,
        "--out",
        tmp_path / "ranks",
        "--unit-bytes",
        "40000",
        "--rank-timeout",
        "60",
    ]
    base = {**os.environ, "PYTHONPATH": str(REPO)}
    envs = [
        {**base, **OPENMPI[0], "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
        {**base, **srun_task(1, 2)},
    ]
    rank0 = subprocess.Popen(
        args, env=envs[0], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    rank1 = subprocess.run(args, env=envs[1], cwd=REPO, capture_output=True, text=True, timeout=120)
    out0, err0 = rank0.communicate(timeout=120)
    assert rank1.returncode == 0, rank1.stderr
    assert rank0.returncode == 0, err0
    assert "rank 1 of 2" in rank1.stdout and "manifest.json" in out0

    manifest = json.loads((tmp_path / "ranks" / "manifest.json").read_text())
    assert manifest["run"]["world_size"] == 2
    drop_run = lambda m: {k: v for k, v in m.items() if k != "run"}  # noqa: E731
    assert drop_run(manifest) == drop_run(single)
    assert single["stats"]["dropped"]["duplicate"] > 0 and single["plan"]["units"] >= 4
    names = sorted(p.name for p in (tmp_path / "one").glob("shard_*"))
    assert names == sorted(p.name for p in (tmp_path / "ranks").glob("shard_*"))
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "ranks" / name).read_bytes()
    assert verify(tmp_path / "ranks") == []


def test_two_ranks_replace_a_dataset_with_overwrite(tmp_path: Path) -> None:
    """Oracle: the one-process run of the new command. Two ranks given --overwrite on a
    dataset of other settings both decide to build in OUT.new (each from the files alone),
    rank 0 swaps it in, and the result is the single-process dataset; without --overwrite
    both ranks refuse in one line."""
    text = gzip.decompress((CORPUS_DIR / "gutenberg_excerpt.txt.gz").read_bytes()).decode()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(text[:120_000])
    tok = train_tokenizer([tmp_path / "in"], tmp_path / "tok", "wordpiece", 800)
    encode_corpus([tmp_path / "in"], tok, tmp_path / "ranks", unit_bytes=40_000)
    single = encode_corpus([tmp_path / "in"], tok, tmp_path / "one", unit_bytes=30_000)

    args = [
        sys.executable,
        "-m",
        "data_prep",
        "encode",
        "--input",
        tmp_path / "in",
        "--tokenizer",
        tok,
        "--out",
        tmp_path / "ranks",
        "--unit-bytes",
        "30000",
        "--rank-timeout",
        "60",
    ]
    base = {**os.environ, "PYTHONPATH": str(REPO)}
    envs = [{**base, "BERT_PREP_RANK": str(r), "BERT_PREP_WORLD_SIZE": "2"} for r in (0, 1)]
    for extra, code in (([], 2), (["--overwrite"], 0)):
        runs = [
            subprocess.Popen(
                [*args, *extra],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for env in envs
        ]
        results = [run.communicate(timeout=120) for run in runs]
        for run, (_, err) in zip(runs, results, strict=True):
            assert run.returncode == code, err
            if code == 2:
                assert len(err.strip().splitlines()) == 1 and "--overwrite" in err, err
    manifest = json.loads((tmp_path / "ranks" / "manifest.json").read_text())
    drop_run = lambda m: {k: v for k, v in m.items() if k != "run"}  # noqa: E731
    assert drop_run(manifest) == drop_run(single)
    assert not (tmp_path / "ranks.new").exists()
    assert verify(tmp_path / "ranks") == []
