"""Masking (done per sample when batches are assembled) and the pre-training losses.

Masking picks `mask_rate` of the non-special tokens (whole words if asked) and corrupts them
80/10/10 ([MASK] / random token / unchanged). Sparse MLM scores only those picked positions;
dense MLM scores every non-special position against its original token, with picked positions
weighing 1 and the others `visible_weight`, and optionally replaces `visible_replace_rate` of the
non-picked tokens by random ones so that visible tokens cannot simply be copied (DESIGN.md).
[CLS]/[SEP]/[PAD] are never scored: predicting them is trivial.

The picks are drawn before any other random choice, from the same generator, so a dense and a
sparse run with the same seed pick the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels
from pretrain.config import MLMConfig
from pretrain.model import SPECIAL_TOKEN_COUNT, Bert
from pretrain.parallel.mappings import copy_to_tp_region

IGNORE = -100
MASK_ID = 4


@dataclass
class MaskedSample:
    input_ids: np.ndarray  # [S] int64, corrupted
    labels: np.ndarray  # [S] int64, original token where scored, IGNORE elsewhere
    picked: np.ndarray  # [S] bool, picked for masking (the "masked positions" of the metrics)


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    mlm: MLMConfig,
    vocab_size: int,
    continuation: np.ndarray | None = None,
    *,
    dense: bool | None = None,
) -> MaskedSample:
    """Corrupt one sequence. `continuation[id]` is True for word pieces that continue a word."""
    dense = mlm.mode == "dense" if dense is None else dense
    tokens = tokens.astype(np.int64)
    candidates = np.flatnonzero(tokens >= SPECIAL_TOKEN_COUNT)
    picked = np.zeros(tokens.shape, dtype=bool)
    if len(candidates):
        target = max(1, int(round(mlm.mask_rate * len(candidates))))
        if mlm.whole_word and continuation is not None:
            picked[_pick_whole_words(tokens, candidates, continuation, target, rng)] = True
        else:
            picked[rng.permutation(candidates)[:target]] = True

    input_ids = tokens.copy()
    picked_idx = np.flatnonzero(picked)
    roll = rng.random(len(picked_idx))
    input_ids[picked_idx[roll < 0.8]] = MASK_ID
    random_idx = picked_idx[(roll >= 0.8) & (roll < 0.9)]
    input_ids[random_idx] = rng.integers(SPECIAL_TOKEN_COUNT, vocab_size, len(random_idx))

    labels = np.full(tokens.shape, IGNORE, dtype=np.int64)
    if dense:
        visible = candidates[~picked[candidates]]
        if mlm.visible_replace_rate > 0 and len(visible):
            swap = visible[rng.random(len(visible)) < mlm.visible_replace_rate]
            input_ids[swap] = rng.integers(SPECIAL_TOKEN_COUNT, vocab_size, len(swap))
        labels[candidates] = tokens[candidates]
    else:
        labels[picked_idx] = tokens[picked_idx]
    return MaskedSample(input_ids=input_ids, labels=labels, picked=picked)


def _pick_whole_words(
    tokens: np.ndarray,
    candidates: np.ndarray,
    continuation: np.ndarray,
    target: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Positions of randomly chosen whole words, stopping once `target` pieces are reached."""
    starts = ~continuation[tokens[candidates]]
    starts[0] = True
    # A word also starts after a gap in the candidates (a special token between two pieces).
    starts[1:] |= np.diff(candidates) != 1
    word_ids = np.cumsum(starts) - 1
    chosen: list[np.ndarray] = []
    count = 0
    for word in rng.permutation(word_ids[-1] + 1):
        pieces = candidates[word_ids == word]
        if count and count + len(pieces) > target * 1.1:
            continue
        chosen.append(pieces)
        count += len(pieces)
        if count >= target:
            break
    return np.concatenate(chosen)


@dataclass
class LossOutput:
    loss: torch.Tensor  # the training objective (scalar, differentiable)
    masked_loss_sum: torch.Tensor  # CE summed over picked positions (detached, fp32)
    masked_correct: torch.Tensor  # correct predictions at picked positions (detached)
    masked_count: torch.Tensor  # number of picked positions scored
    scored_count: int  # positions the MLM head ran on (for the FLOP count)


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
    rows = hidden.reshape(-1, hidden.shape[-1])[scored]  # [N, H]
    targets = labels[scored]
    picked_rows = picked[scored]
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
        tp_group=tp_group,
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
