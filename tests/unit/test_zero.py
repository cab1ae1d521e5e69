"""ZeRO-1's ownership, the gradient wire dtype and the wire-volume arithmetic, without processes.

Oracles: a brute-force search over every way to cut a tensor list into contiguous runs (the
ownership must be as balanced as whole contiguous tensors allow), the ring factors 2(p-1)/p and
(p-1)/p written out by hand, and the README's one-line / exit-code contract for a refused dtype.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

from pretrain import __main__ as cli
from pretrain.config import ModelShape
from pretrain.parallel.comm_stats import analytic_bytes, wire_bytes
from pretrain.parallel.parallelize import resolve_grad_reduce_dtype
from pretrain.parallel.zero import assign_owners

REPO = Path(__file__).resolve().parents[2]


def _best_largest_share(sizes: list[int], dp: int) -> int:
    """The smallest possible largest load over all cuts into at most dp contiguous runs."""
    best = sum(sizes)
    for cuts in itertools.combinations(range(1, len(sizes)), min(dp, len(sizes)) - 1):
        bounds = (0, *cuts, len(sizes))
        best = min(best, max(sum(sizes[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_owners_are_contiguous_balanced_and_nonempty(seed: int):
    rng = random.Random(seed)
    count, dp = rng.randint(1, 9), rng.randint(1, 5)
    sizes = [rng.choice([1, 3, 10, 64, 300]) for _ in range(count)]
    owners = assign_owners([torch.empty(n) for n in sizes], dp)
    assert owners == sorted(owners)  # contiguous runs, rank 0 first
    assert owners[0] == 0 and max(owners) < dp
    if count >= dp:
        assert set(owners) == set(range(dp))  # every rank owns something
    loads = [sum(n for n, o in zip(sizes, owners, strict=True) if o == r) for r in range(dp)]
    assert max(loads) == _best_largest_share(sizes, dp)


def test_wire_bytes_use_ring_factors():
    payload = {"dp.all_reduce": 1000, "dp.reduce": 1000, "dp.broadcast": 1000, "tp.all_gather": 8}
    wire = wire_bytes(payload, {"dp": 4, "tp": 1})
    assert wire == {
        "dp.all_reduce": 1000 * 2 * 3 / 4,
        "dp.reduce": 1000 * 3 / 4,
        "dp.broadcast": 1000 * 3 / 4,
        "tp.all_gather": 0.0,
    }


@pytest.mark.parametrize("dp", [2, 4, 192])
@pytest.mark.parametrize("reduce_bytes", [4, 2])
def test_zero_minimum_is_ddp_wire_volume(dp: int, reduce_bytes: int):
    """On the wire ZeRO-1 moves the gradients once in the reduce dtype and the fp32 weights
    once; with fp32 gradients that is DDP's all-reduce (plus the norm's 4 bytes)."""
    shape = ModelShape(24, 1024, 16, 4096, 30522, 512, "pre", 0.1, False)
    common = dict(encoded=4096, scored=4096, tp=1, dp=dp, local_params=335_000_000)
    common |= dict(optimizer_tensors=0, reduce_bytes=reduce_bytes)
    sizes = {"dp": dp, "world": dp}
    ddp = wire_bytes(analytic_bytes(shape, zero=False, **common), sizes)
    zero = wire_bytes(analytic_bytes(shape, zero=True, **common), sizes)
    ddp_dp = sum(v for k, v in ddp.items() if k.startswith("dp."))
    zero_dp = sum(v for k, v in zero.items() if k.startswith("dp."))
    expected = (reduce_bytes + 4) / (2 * reduce_bytes)  # 1 for fp32, 1.5 for half gradients
    assert zero_dp / ddp_dp == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("setting", "precision", "expected"),
    [
        ("auto", "fp32", "fp32"),
        ("auto", "bf16", "fp32"),
        ("auto", "fp16", "fp16"),
        ("bf16", "fp32", "bf16"),
        ("bf16", "fp16", "bf16"),
        ("fp32", "fp16", "fp32"),
        ("fp16", "fp16", "fp16"),
    ],
)
def test_grad_reduce_dtype_resolution(setting: str, precision: str, expected: str):
    assert resolve_grad_reduce_dtype(setting, precision) == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fp16_reduction_without_loss_scaling_is_refused_in_one_line(
    small_dataset, tmp_path, capsys, precision: str
):
    args = [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        f"data.path={small_dataset}",
        f"train.out_dir={tmp_path}",
        f"train.precision={precision}",
        "parallel.grad_reduce_dtype=fp16",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"bert-train: error: parallel.grad_reduce_dtype=fp16: fp16 gradients need loss "
        f"scaling, which train.precision={precision} does not have: use fp32 or bf16"
    ]
    assert not (tmp_path / "config.yaml").exists()
