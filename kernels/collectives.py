"""What a kernel needs from tensor parallelism, as a small interface.

The kernels never call the distributed runtime themselves: a caller whose vocabulary is split
over tp ranks passes an object with these methods (`pretrain.parallel.collectives.
GroupCollectives` wraps a process group; a test can pass its own). `None` means one rank holds
everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class TensorParallel(Protocol):
    """Collectives over the tensor-parallel group; every rank calls each in the same order."""

    rank: int  # this rank's index in the group
    size: int  # ranks in the group

    def all_reduce_sum(self, tensor: Tensor) -> None:
        """In place: the element-wise sum over the group."""

    def all_reduce_max(self, tensor: Tensor) -> None:
        """In place: the element-wise maximum over the group."""

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's `tensor` (equal shapes), in rank order."""


@dataclass(frozen=True)
class VocabShard:
    """This rank's vocabulary rows: [start, start + V_local) of size * V_local; `tp` is None
    when one rank holds the whole vocabulary (then start = 0, size = 1)."""

    tp: TensorParallel | None
    start: int
    size: int

    @classmethod
    def of(cls, tp: TensorParallel | None, local_vocab: int) -> VocabShard:
        """Equal shards in rank order; a group of one is no group."""
        if tp is None or tp.size == 1:
            return cls(None, 0, 1)
        return cls(tp, tp.rank * local_vocab, tp.size)

    def global_argmax(self, values: Tensor, index: Tensor) -> Tensor:
        """[c] the global index of each row's maximum, from every rank's row maximum `values`
        [c] and its global `index` [c]: the first rank holding the largest value wins, which
        matches torch.argmax's first occurrence on the whole row."""
        if self.tp is None:
            return index
        best = torch.stack(self.tp.all_gather(values)).argmax(dim=0)
        return torch.stack(self.tp.all_gather(index)).gather(0, best.unsqueeze(0)).squeeze(0)
