"""The tensor-parallel collectives the kernels need (`kernels.collectives.TensorParallel`), over
a torch.distributed process group. The kernels package stays free of torch.distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist


class GroupCollectives:
    """`kernels.collectives.TensorParallel` over `group`."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, group=self.group)

    def all_reduce_max(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return parts


def tp_collectives(group: dist.ProcessGroup | None) -> GroupCollectives | None:
    """What to pass as `tp=` to a kernel: None without a group or with a group of one."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    return GroupCollectives(group)
