"""Dropout RNG under tensor parallelism (the job of Megatron's RNG tracker).

Outside the split regions every tp rank holds the same activations, so their dropout masks must
be identical: the global generators start from the same seed on every tp rank and are consumed
identically. Inside a split region (attention on this rank's heads) masks must differ per rank.
`TPRegionRNG` runs such a region under a generator seeded from (a number drawn from the global
generator, tp_rank) and restores the global state afterwards. Drawing the number from the global
generator keeps recomputation exact: checkpointing replays the global state, hence the seed.
"""

from __future__ import annotations

import torch
from torch import nn


class TPRegionRNG(nn.Module):
    def __init__(self, region: nn.Module, tp_rank: int) -> None:
        super().__init__()
        self.region = region
        self.tp_rank = tp_rank

    def forward(self, *args, **kwargs):
        if not self.training:
            return self.region(*args, **kwargs)
        base = int(torch.randint(0, 2**31 - 1, (1,)).item())
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(base * 1009 + self.tp_rank)
            return self.region(*args, **kwargs)
