"""DDP as the trainer builds it (`apply_data_parallel`): gradients live in the all-reduce buckets.

Oracle: storage identity (with `gradient_as_bucket_view` the .grad of parameters that share a
bucket are views of one flat tensor, so there is no second fp32 copy of the gradients, which is
what pretrain/memory.py assumes) and the mean of the two ranks' gradients computed by hand.
"""

from __future__ import annotations

import torch
from torch import nn

from tests.distributed.harness import run_distributed


def _grads_and_storages(steps: int) -> tuple[list[torch.Tensor], int, int, list[str]]:
    import warnings

    import torch.distributed as dist

    from pretrain.distributed import build_dims
    from pretrain.parallel.parallelize import apply_data_parallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dims = build_dims(2, rank, 1, torch.device("cpu"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.GELU(), nn.Linear(5, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = apply_data_parallel(model, dims)
    for _ in range(steps):  # set_to_none between steps, as the trainer does
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(100 + rank)
        wrapped(torch.randn(4, 7)).square().sum().backward()
    storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
    dist.destroy_process_group()
    return (
        [p.grad.clone() for p in model.parameters()],
        len(storages),
        len(list(model.parameters())),
        [str(w.message) for w in caught if issubclass(w.category, FutureWarning)],
    )


def _local_grads(rank: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.GELU(), nn.Linear(5, 3))
    torch.manual_seed(100 + rank)
    model(torch.randn(4, 7)).square().sum().backward()
    return [p.grad for p in model.parameters()]


def test_gradients_are_bucket_views_and_averaged():
    """After two steps, every .grad of the small model shares one bucket's storage on each rank,
    and equals the mean of the two ranks' own gradients; building DDP warns of nothing
    deprecated (torch 2.13 deprecated broadcast_buffers)."""
    results = run_distributed(_grads_and_storages, 2, 2)
    expected = [(a + b) / 2 for a, b in zip(_local_grads(0), _local_grads(1), strict=True)]
    for grads, storages, n_params, future_warnings in results:
        assert n_params == 4 and storages == 1
        assert future_warnings == []
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-5, atol=1e-6)
