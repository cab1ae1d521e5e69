"""`flops_per_step` against an independent count: torch's FlopCounterMode on the real model.

Oracle: FlopCounterMode counts every matrix product that forward + backward of
`pretraining_loss` dispatches (aten.mm, addmm, bmm), with torch's own formulas. It does not
register three ops our CPU run uses, so the test registers them with torch's formulas too:
the CPU flash-attention forward (torch's `sdpa_flop_count`), its backward (twice the forward:
the model-FLOP convention; flash attention's backward also recomputes QK^T, a hardware FLOP we
do not count), and the in-place `addmm_` of the chunked cross-entropy's weight gradient. With
those, the two counts are sums of the same integer products: equal to 1e-9 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from pretrain.config import MLMConfig, ModelShape
from pretrain.model import build_model, flops_per_step
from pretrain.objectives import IGNORE, SCORED_ROW_MULTIPLE, pretraining_loss

aten = torch.ops.aten


def _sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_flop_count(query, key, value)


def _addmm_(self, a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0] * a[1] * b[1]


MAPPING = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
    aten.addmm_: _addmm_,
}


def _shape(norm: str, pair_head: bool) -> ModelShape:
    # Odd sizes on purpose: vocabulary 131, FFN 96, 3 heads of 16.
    return ModelShape(
        layers=2,
        hidden=48,
        heads=3,
        ffn_hidden=96,
        vocab_size=131,
        max_seq_len=64,
        norm=norm,
        dropout=0.0,
        pair_head=pair_head,
    )


def _batch(
    mode: str, sequences: int, seq_len: int, pair: bool, padded: bool
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 131, (sequences, seq_len), generator=g)
    ids[:, 0] = 2  # [CLS], never scored
    picked = torch.rand(sequences, seq_len, generator=g) < 0.15
    picked[:, 0] = False
    picked[0, 1] = True
    mask = torch.ones_like(ids)
    if padded:  # the last sequence ends early: padding is computed, never scored
        mask[-1, seq_len // 2 :] = 0
        ids[-1, seq_len // 2 :] = 0
        picked[-1, seq_len // 2 :] = False
    labels = torch.full_like(ids, IGNORE)
    scored = picked if mode == "sparse" else ids >= 5
    labels[scored] = ids[scored]
    batch = {
        "input_ids": ids,
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": mask,
        "labels": labels,
        "picked": picked,
    }
    if pair:
        batch["pair_labels"] = torch.randint(0, 2, (sequences,), generator=g)
    return batch


@pytest.mark.parametrize(
    "mode, norm, pair, padded",
    [
        ("dense", "post", False, False),
        ("sparse", "pre", False, False),
        ("dense", "post", True, False),
        ("sparse", "post", False, True),
    ],
)
def test_flops_per_step_matches_flop_counter(
    mode: str, norm: str, pair: bool, padded: bool
) -> None:
    sequences, seq_len = 3, 24
    shape = _shape(norm, pair)
    model = build_model(shape)
    batch = _batch(mode, sequences, seq_len, pair, padded)
    with FlopCounterMode(display=False, custom_mapping=MAPPING) as counter:
        out = pretraining_loss(model, batch, MLMConfig(mode=mode))
        out.loss.backward()
    counted = counter.get_total_flops()
    ours = flops_per_step(shape, seq_len, sequences, out.scored_count)
    assert ours == pytest.approx(counted, rel=1e-9)
    # The head term is what separates dense from sparse: it must be in there (its rows rounded
    # up to the head's row multiple with unscored filler).
    labelled = int((batch["labels"] != IGNORE).sum())
    assert out.scored_count == -(-labelled // SCORED_ROW_MULTIPLE) * SCORED_ROW_MULTIPLE


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_filler_rows_change_neither_loss_nor_gradients(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Oracle: the same step with no filler (a row multiple of 1, the head on exactly the
    labelled rows): loss, masked statistics and every gradient equal."""
    import pretrain.objectives as objectives

    shape = _shape("post", pair_head=False)
    batch = _batch(mode, sequences=3, seq_len=24, pair=False, padded=True)
    results = []
    for multiple in (1, SCORED_ROW_MULTIPLE):
        monkeypatch.setattr(objectives, "SCORED_ROW_MULTIPLE", multiple)
        torch.manual_seed(0)
        model = build_model(shape)
        out = pretraining_loss(model, batch, MLMConfig(mode=mode, visible_weight=0.1))
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        results.append((out, grads))
    (plain, plain_grads), (filled, filled_grads) = results
    assert filled.scored_count % SCORED_ROW_MULTIPLE == 0
    assert filled.scored_count > plain.scored_count
    torch.testing.assert_close(filled.loss, plain.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(filled.masked_loss_sum, plain.masked_loss_sum)
    assert torch.equal(filled.masked_correct, plain.masked_correct)
    assert torch.equal(filled.masked_count, plain.masked_count)
    for a, b in zip(filled_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
