"""Tensor-parallel layers; each is a plain layer when the tp group is None or of size 1.

Shapes: X [..., in], A [in, out] as in Y = XA (stored as torch's weight = A^T).

Every parameter these layers split is tagged where it is split (`mark_split`: the dimension and
the whole, unpadded size, as Megatron tags `partition_dim`); clipping, checkpoints, resharding
and export read the tags (`split_of`), never module types or parameter names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.parallel.mappings import Group, copy_to_tp_region, reduce_from_tp_region

TP_SPLIT = "tp_split"  # attribute name of the tag on a split nn.Parameter


def mark_split(param: nn.Parameter, dim: int, whole_size: int) -> nn.Parameter:
    """Tag `param` as this rank's shard along `dim` of a tensor `whole_size` long there
    (without vocabulary padding). Returns `param`."""
    setattr(param, TP_SPLIT, {"dim": dim, "size": whole_size})
    return param


def split_of(param: torch.Tensor) -> dict[str, int] | None:
    """{"dim", "size"} of a split parameter; None for a replicated one."""
    return getattr(param, TP_SPLIT, None)


def _shard_rows(tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    rows = tensor.shape[0] // size
    return tensor[rank * rows : (rank + 1) * rows].detach().clone()


class ColumnParallelLinear(nn.Module):
    """Y = XA with A = [A_1 … A_p] split by columns; rank i computes Y_i = X A_i (no gather).

    The input enters the tp region through copy_to_tp_region (backward all-reduces dX). When
    the replaced layer has `skip_bias_add` set (model.BiasSkippingLinear), forward returns
    (X A_i, b_i) with the bias unapplied, as Megatron's skip_bias_add, for a fused bias + GELU.
    """

    def __init__(self, linear: nn.Linear, group: Group, rank: int, size: int) -> None:
        super().__init__()
        if linear.out_features % size:
            raise ValueError(f"{linear.out_features} output features do not split {size} ways")
        self.group = group
        self.skip_bias_add = bool(getattr(linear, "skip_bias_add", False))
        out = linear.out_features
        self.weight = mark_split(nn.Parameter(_shard_rows(linear.weight, rank, size)), 0, out)
        self.bias = (  # [out/p, in] and [out/p]
            mark_split(nn.Parameter(_shard_rows(linear.bias, rank, size)), 0, out)
            if linear.bias is not None
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        x = copy_to_tp_region(x, self.group)
        if self.skip_bias_add:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Y = XA with A = [A_1; …; A_p] split by rows and X = [X_1 … X_p]; Y = Σ_i X_i A_i.

    The partial products are summed by reduce_from_tp_region; the (replicated) bias is added
    once, after the sum.
    """

    def __init__(self, linear: nn.Linear, group: Group, rank: int, size: int) -> None:
        super().__init__()
        if linear.in_features % size:
            raise ValueError(f"{linear.in_features} input features do not split {size} ways")
        self.group = group
        cols = linear.in_features // size
        weight = linear.weight[:, rank * cols : (rank + 1) * cols]
        self.weight = mark_split(  # [out, in/p]
            nn.Parameter(weight.detach().clone()), 1, linear.in_features
        )
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp_region(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose (padded) vocabulary rows are split across ranks: rank i holds rows
    [start_i, end_i); ids outside give zeros locally and the sum over ranks picks the owner's."""

    def __init__(
        self, embedding: nn.Embedding, padded_vocab: int, group: Group, rank: int, size: int
    ) -> None:
        super().__init__()
        vocab, hidden = embedding.weight.shape
        full = torch.zeros(padded_vocab, hidden, dtype=embedding.weight.dtype)
        full[:vocab] = embedding.weight.detach().to(full.device)
        self.group = group
        self.vocab_size = vocab
        self.per_rank = padded_vocab // size
        self.vocab_start = rank * self.per_rank
        self.weight = mark_split(  # [V_pad/p, H]
            nn.Parameter(_shard_rows(full, rank, size).to(embedding.weight.device)), 0, vocab
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(out, self.group)
