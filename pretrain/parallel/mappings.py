"""The four tensor-parallel region mappings, named by their forward effect (Megatron's f and g).

Each is a small autograd function over a plain collective on the tp group; with no group (tp = 1)
each is the identity. `torch.distributed.nn.functional` is not used: it aborts at exit here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd import Function

Group = dist.ProcessGroup | None


def _active(group: Group) -> bool:
    return group is not None and dist.get_world_size(group) > 1


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _own_slice_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    size = x.shape[-1] // dist.get_world_size(group)
    rank = dist.get_rank(group)
    return x[..., rank * size : (rank + 1) * size].contiguous()


class _CopyToTP(Function):
    """fwd: identity; bwd: all-reduce."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(Function):
    """fwd: all-reduce; bwd: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GatherFromTP(Function):
    """fwd: all-gather along the last dim; bwd: keep this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _own_slice_last(grad, ctx.group), None


class _ScatterToTP(Function):
    """fwd: keep this rank's slice of the last dim; bwd: all-gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _own_slice_last(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_last(grad, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _CopyToTP.apply(x, group) if _active(group) else x


def reduce_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group) if _active(group) else x


def gather_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _GatherFromTP.apply(x, group) if _active(group) else x


def scatter_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ScatterToTP.apply(x, group) if _active(group) else x
