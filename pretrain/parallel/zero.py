"""ZeRO-1: optimizer state sharded across data-parallel ranks.

Gradients are still averaged over the dp group by DDP; then each dp rank updates only the
parameters it owns (whole tensors, so LAMB's per-tensor trust ratio stays exact) and the owners
broadcast the new values, one flat buffer per owner. Optimizer memory per rank drops to ~1/dp.
Ownership is a greedy balance by size over the parameter order, identical on every rank; tp
ranks own the same shards, so LAMB's tp norm reduction pairs up tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from pretrain.distributed import ParallelDims
from pretrain.optim import tensors_with_tp_norms


def assign_owners(params: list[torch.Tensor], dp_size: int) -> list[int]:
    """dp rank owning each parameter: largest first to the least-loaded rank."""
    load = [0] * dp_size
    owners = [0] * len(params)
    for index in sorted(range(len(params)), key=lambda i: -params[i].numel()):
        rank = min(range(dp_size), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += params[index].numel()
    return owners


class ZeroRedundancy:
    """Wraps an optimizer built by `build(param_groups)` over this rank's share of the groups."""

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        dims: ParallelDims,
    ) -> None:
        self.dims = dims
        self.all_params = [p for group in param_groups for p in group["params"]]
        owners = assign_owners(self.all_params, dims.dp_size)
        self.owner = {id(p): o for p, o in zip(self.all_params, owners, strict=True)}
        local = [
            dict(group, params=[p for p in group["params"] if self.owner[id(p)] == dims.dp_rank])
            for group in param_groups
        ]
        self.optimizer = build([g for g in local if g["params"]])
        # Global rank of each dp rank in this rank's dp group (same tp rank, varying dp rank).
        self.dp_ranks = [d * dims.tp_size + dims.tp_rank for d in range(dims.dp_size)]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def tensors_with_tp_norms(self) -> int:
        """Those of the wrapped optimizer (this rank's share); 0 when it reduces none."""
        return tensors_with_tp_norms(self.optimizer)

    @property
    def state(self) -> dict:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.all_params:
            param.grad = None if set_to_none else param.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        for dp_rank, src in enumerate(self.dp_ranks):
            owned = [p for p in self.all_params if self.owner[id(p)] == dp_rank]
            if not owned:
                continue
            flat = _flatten_dense_tensors([p.data for p in owned])
            dist.broadcast(flat, src=src, group=self.dims.dp_group)
            for param, value in zip(owned, _unflatten_dense_tensors(flat, owned), strict=True):
                param.data.copy_(value)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
