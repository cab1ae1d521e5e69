"""Checkpoint verification over ranks: each file is hashed by exactly one rank, and every rank
learns about a damaged file that another rank found.

Oracle: the list of files in `checksums.json` (the hashed sets must partition it) and the file
the test damaged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_distributed

REPO = Path(__file__).resolve().parents[2]


def _verify(path: str) -> tuple[list[str], str | None]:
    import torch.distributed as dist

    import pretrain.checkpoint as checkpoint
    from launch.env import detect_environment
    from launch.rendezvous import init_distributed
    from pretrain.distributed import build_dims

    init_distributed(detect_environment(), "gloo", 60)
    dims = build_dims(dist.get_world_size(), dist.get_rank(), 1, torch.device("cpu"))
    hashed = []
    real = checkpoint.sha256_file

    def counting(file: Path) -> str:
        hashed.append(file.name)
        return real(file)

    checkpoint.sha256_file = counting
    try:
        return hashed, checkpoint.verify_checkpoint(Path(path), dims)
    finally:
        checkpoint.sha256_file = real
        dist.destroy_process_group()


@pytest.mark.slow
def test_each_file_is_read_by_one_rank_and_all_ranks_agree(small_dataset, tmp_path):
    import json

    from pretrain.config import load_config
    from pretrain.trainer import train

    config = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            "model.hidden=32",
            "model.heads=2",
            "model.max_seq_len=32",
            "data.seq_len=32",
            "train.micro_batch=2",
            "train.global_batch=2",
            "train.precision=fp32",
            "train.steps=1",
            f"data.path={small_dataset}",
            f"train.out_dir={tmp_path}",
        ],
    )
    step = train(config).checkpoint
    names = sorted(json.loads((step / "checksums.json").read_text()))
    assert len(names) >= 4  # model, optimizer, rng, train state

    ranks = run_distributed(_verify, 2, str(step))
    assert sorted(ranks[0][0] + ranks[1][0]) == names  # every file once, no file twice
    assert [damaged for _, damaged in ranks] == [None, None]

    victim = ranks[1][0][0]  # a file only rank 1 reads
    data = bytearray((step / victim).read_bytes())
    data[-1] ^= 0x01
    (step / victim).write_bytes(bytes(data))
    ranks = run_distributed(_verify, 2, str(step))
    assert [damaged for _, damaged in ranks] == [victim, victim]
