"""The pre-training losses: dense or sparse MLM (+ NSP/SOP) on batches masked by
pretrain/masking.py.

Sparse MLM scores only the picked positions; dense MLM scores every non-special position
against its original token, with picked positions weighing 1 and the others `visible_weight`
(docs/design.md, "Dense and sparse MLM").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import kernels
from pretrain.config import MLMConfig
from pretrain.masking import IGNORE
from pretrain.model import Bert
from pretrain.parallel.collectives import tp_collectives
from pretrain.parallel.mappings import copy_to_tp_region

SCORED_ROW_MULTIPLE = 64
"""The MLM head runs on a multiple of this many rows: the scored positions, then unscored
filler rows. A batch's scored count varies (padding, sparse MLM's random picks), and oneDNN
(PyTorch's CPU matrix products) compiles a kernel for every new shape: on an AMX CPU the tiny
model's steps on real batches took 150 ms against 131 ms on one batch repeated, thousands of
page faults a step from the compiler. Rounded up, a run meets a few shapes and compiles each
once; GPUs' tensor cores also prefer M a multiple of 64. Fixed-size prediction slots are what
BERT's own data format does (max_predictions_per_seq)."""


@dataclass
class LossOutput:
    loss: torch.Tensor  # the training objective (scalar, differentiable)
    masked_loss_sum: torch.Tensor  # CE summed over picked positions (detached, fp32)
    masked_correct: torch.Tensor  # correct predictions at picked positions (detached)
    masked_count: torch.Tensor  # number of picked positions scored
    scored_count: int  # rows the MLM head ran on, filler included (for the FLOP count)


def pretraining_loss(
    model: Bert,
    batch: dict[str, torch.Tensor],
    mlm: MLMConfig,
    tp_group: dist.ProcessGroup | None = None,
) -> LossOutput:
    """MLM loss (+ NSP/SOP when the batch has `pair_labels`) and masked-position statistics.

    Sparse: the head runs only on picked positions. Dense: on every scored position, with the
    cross-entropy chunked so that logits for all of them never exist at once. Under tensor
    parallelism the decoder holds this rank's vocabulary shard and the cross-entropy reduces
    over `tp_group`; the transformed states enter the tp region (backward all-reduces them).
    """
    hidden = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    labels = batch["labels"].reshape(-1)
    picked = batch["picked"].reshape(-1)
    scored = labels != IGNORE  # sparse batches only carry labels on picked positions
    index = scored.nonzero().squeeze(1)  # [N]
    count = index.numel()
    filler = -count % SCORED_ROW_MULTIPLE  # rows that re-read position 0 and are not scored
    index = F.pad(index, (0, filler))
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # [N + filler, H]
    targets = F.pad(labels[index[:count]], (0, filler), value=IGNORE)
    picked_rows = F.pad(picked[index[:count]], (0, filler), value=False)
    weight = None
    if mlm.mode == "dense":
        weight = torch.where(picked_rows, 1.0, mlm.visible_weight).to(torch.float32)
    transformed = copy_to_tp_region(model.mlm_head.transform(rows), tp_group)
    loss, row_loss, prediction = kernels.linear_cross_entropy(
        transformed,
        model.decoder_weight,
        targets,
        bias=model.mlm_head.logit_bias(),
        position_weight=weight,
        tp=tp_collectives(tp_group),
        return_stats=True,
    )
    if "pair_labels" in batch:
        loss = loss + F.cross_entropy(model.pair_logits(hidden).float(), batch["pair_labels"])
    return LossOutput(
        loss=loss,
        masked_loss_sum=row_loss[picked_rows].sum(),
        masked_correct=(prediction[picked_rows] == targets[picked_rows]).sum(),
        masked_count=picked_rows.sum(),
        scored_count=int(targets.numel()),
    )


class PretrainingLoss(nn.Module):
    """The model and its objective as one module: what a training step calls, and what DDP
    wraps, so that DDP sees every parameter used in forward (the MLM decoder is the embedding)."""

    def __init__(self, model: Bert, mlm: MLMConfig, tp_group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.model = model
        self.mlm = mlm
        self.tp_group = tp_group

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        return pretraining_loss(self.model, batch, self.mlm, self.tp_group)
