"""The chunked linear + cross-entropy of `kernels`, against full-logit `F.cross_entropy`.

Odd sizes on purpose: hidden 131, vocabulary 1031, and row counts that are not a multiple of
`chunk_rows`, so the last chunk is ragged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import cross_entropy as ce_module

torch.set_num_threads(1)

HIDDEN, VOCAB = 131, 1031


def _inputs(
    leading: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*leading, HIDDEN, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.2).to(dtype).requires_grad_()
    bias = (torch.randn(VOCAB, generator=g) * 0.5).to(dtype).requires_grad_()
    target = torch.randint(0, VOCAB, leading, generator=g)
    return hidden, weight, bias, target


def _grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def _reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    position_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Full logits in fp32; the weighted mean sum(w_i CE_i) / sum(w_i) over scored rows."""
    logits = hidden.float().reshape(-1, HIDDEN) @ weight.float().T + bias.float()
    t = target.reshape(-1)
    if position_weight is None:
        return F.cross_entropy(logits, t, ignore_index=-100, label_smoothing=label_smoothing)
    rows = F.cross_entropy(
        logits, t, ignore_index=-100, reduction="none", label_smoothing=label_smoothing
    )
    w = torch.where(t != -100, position_weight.reshape(-1), 0.0)
    return (w * rows).sum() / w.sum()


def test_matches_cross_entropy_with_ignored_rows() -> None:
    """Oracle: F.cross_entropy on the full fp32 logits; 1e-5 is fp32 summation-order noise.
    Leading dims [3, 41] = 123 rows in chunks of 50; the loss is scaled by 3 so backward's use
    of grad_output is checked too."""
    hidden, weight, bias, target = _inputs((3, 41))
    target[0, :7] = -100
    target[2, 40] = -100
    loss = kernels.linear_cross_entropy(hidden, weight, target, bias=bias, chunk_rows=50)
    (3 * loss).backward()
    got = _grads(hidden, weight, bias)
    ref = _reference(hidden, weight, bias, target)
    (3 * ref).backward()
    want = _grads(hidden, weight, bias)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for g, w, name in zip(got, want, ("hidden", "weight", "bias"), strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)


def test_without_bias_and_default_chunking() -> None:
    """Oracle: F.linear + F.cross_entropy with no bias; default chunk size (one chunk here)."""
    hidden, weight, _, target = _inputs((37,), seed=1)
    loss = kernels.linear_cross_entropy(hidden, weight, target)
    loss.backward()
    got = _grads(hidden, weight)
    ref = F.cross_entropy(hidden @ weight.T, target)
    ref.backward()
    for g, w in zip([loss, *got], [ref, *_grads(hidden, weight)], strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_position_weights() -> None:
    """Oracle: sum(w_i CE_i) / sum(w_i) over non-ignored rows from full logits (above)."""
    hidden, weight, bias, target = _inputs((57,), seed=2)
    target[::5] = -100
    position_weight = torch.rand(57, generator=torch.Generator().manual_seed(3))
    position_weight[1::4] = 0.0  # e.g. visible tokens with mlm.visible_weight = 0
    loss = kernels.linear_cross_entropy(
        hidden, weight, target, bias=bias, position_weight=position_weight, chunk_rows=16
    )
    loss.backward()
    got = _grads(hidden, weight, bias)
    ref = _reference(hidden, weight, bias, target, position_weight)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, _grads(hidden, weight, bias), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_all_ignored_gives_zero_loss_and_zero_grads() -> None:
    """Nothing to score: loss exactly 0 and all-zero (not missing) gradients, no NaN."""
    hidden, weight, bias, target = _inputs((2, 9), seed=4)
    target.fill_(-100)
    loss = kernels.linear_cross_entropy(hidden, weight, target, bias=bias, chunk_rows=4)
    loss.backward()
    assert loss.item() == 0.0
    for g in _grads(hidden, weight, bias):
        assert torch.equal(g, torch.zeros_like(g))


def test_bf16_inputs_against_fp32_reference() -> None:
    """Oracle: the fp32 reference on the same bf16 values upcast. The pass itself is fp32, so the
    loss agrees to fp32 noise (1e-5); the grads differ only by their final rounding to bf16,
    whose unit roundoff is 2**-8, so rtol 2**-7 (with atol 1e-6 for values near zero)."""
    hidden, weight, bias, target = _inputs((45,), dtype=torch.bfloat16, seed=5)
    target[3] = -100
    loss = kernels.linear_cross_entropy(hidden, weight, target, bias=bias, chunk_rows=20)
    loss.backward()
    got = _grads(hidden, weight, bias)
    assert [g.dtype for g in got] == [torch.bfloat16] * 3
    ref_inputs = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    ref = _reference(*ref_inputs, target)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for g, t in zip(got, ref_inputs, strict=True):
        torch.testing.assert_close(g.float(), t.grad, atol=1e-6, rtol=2**-7)


def test_inside_autocast_still_computes_in_fp32() -> None:
    """Under bf16 autocast the pass must not drop to bf16 GEMMs: fp32 inputs give the fp32
    reference to 1e-5."""
    hidden, weight, bias, target = _inputs((30,), seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kernels.linear_cross_entropy(hidden, weight, target, bias=bias, chunk_rows=7)
    loss.backward()
    got = _grads(hidden, weight, bias)
    ref = _reference(hidden, weight, bias, target)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, _grads(hidden, weight, bias), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [True, False])
def test_return_stats_match_full_logits(grad: bool) -> None:
    """Oracle: per-row F.cross_entropy (0 on ignored rows) and argmax of the full logits, with
    and without autograd (the no-grad path skips the gradient work)."""
    hidden, weight, bias, target = _inputs((4, 11), seed=7)
    target[1, 2:5] = -100
    with torch.set_grad_enabled(grad):
        loss, row_loss, argmax = kernels.linear_cross_entropy(
            hidden, weight, target, bias=bias, chunk_rows=13, return_stats=True
        )
    logits = (hidden.reshape(-1, HIDDEN) @ weight.T + bias).detach()
    t = target.reshape(-1)
    want_rows = F.cross_entropy(logits, t, reduction="none", ignore_index=-100)
    assert row_loss.shape == (44,) and row_loss.dtype == torch.float32
    assert argmax.shape == (44,) and argmax.dtype == torch.int64
    assert not row_loss.requires_grad and not argmax.requires_grad
    assert loss.requires_grad == grad
    torch.testing.assert_close(row_loss, want_rows, atol=1e-5, rtol=1e-5)
    assert torch.equal(argmax, logits.argmax(dim=1))
    torch.testing.assert_close(loss.detach(), want_rows.sum() / (t != -100).sum())


def test_label_smoothing() -> None:
    """Oracle: F.cross_entropy(label_smoothing=0.1) on full logits; the stats stay plain CE."""
    hidden, weight, bias, target = _inputs((29,), seed=8)
    target[0] = -100
    position_weight = torch.linspace(0.5, 2.0, 29)
    loss, row_loss, _ = kernels.linear_cross_entropy(
        hidden,
        weight,
        target,
        bias=bias,
        position_weight=position_weight,
        label_smoothing=0.1,
        chunk_rows=8,
        return_stats=True,
    )
    loss.backward()
    got = _grads(hidden, weight, bias)
    ref = _reference(hidden, weight, bias, target, position_weight, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, _grads(hidden, weight, bias), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    logits = (hidden @ weight.T + bias).detach()
    plain = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(row_loss, plain, atol=1e-5, rtol=1e-5)


def test_dispatch_picks_reference_on_cpu() -> None:
    """The device check is real: CPU tensors never take the Triton path."""
    t = torch.zeros(2, 3)
    assert kernels.dispatch.use_triton(t) is False
    assert ce_module._pick_chunk_math(t) is ce_module.chunk_math_reference


def test_shape_errors() -> None:
    hidden, weight, bias, target = _inputs((6,), seed=10)
    with pytest.raises(ValueError, match="target shape"):
        kernels.linear_cross_entropy(hidden, weight, target[:5])
    with pytest.raises(ValueError, match="weight must be"):
        kernels.linear_cross_entropy(hidden, weight[:, :7], target)
    with pytest.raises(ValueError, match="position_weight"):
        kernels.linear_cross_entropy(hidden, weight, target, position_weight=torch.ones(4))
