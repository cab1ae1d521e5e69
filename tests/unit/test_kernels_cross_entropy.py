"""The chunked linear + cross-entropy of `kernels`, against full-logit `F.cross_entropy`.

Odd sizes on purpose: hidden 131, vocabulary 1031, and row counts that are not a multiple of
`chunk_rows`, so the last chunk is ragged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import cross_entropy as ce_module

aten = torch.ops.aten

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


class _MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matrix product dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in (aten.mm.default, aten.addmm.default, aten.addmm_.default):
            a, b = args[-2], args[-1]
            self.seen.append((func.__name__, a.dtype, b.dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemms_run_in_the_autocast_dtype(dtype: torch.dtype) -> None:
    """Under autocast all three GEMMs of every chunk (logits, grad_hidden, grad_weight) take
    inputs of the autocast dtype; without autocast they stay fp32. The loss stays fp32."""
    hidden, weight, bias, target = _inputs((30,), seed=6)
    recorder = _MatmulDtypes()
    with recorder, torch.autocast("cpu", dtype=dtype):
        loss = kernels.linear_cross_entropy(hidden, weight, target, bias=bias, chunk_rows=7)
        loss.backward()
    assert loss.dtype == torch.float32
    assert len(recorder.seen) == 3 * 5  # 30 rows in chunks of 7: five chunks
    assert {a for _, a, _ in recorder.seen} == {dtype}
    assert {b for _, _, b in recorder.seen} == {dtype}
    recorder = _MatmulDtypes()
    with recorder:
        kernels.linear_cross_entropy(hidden, weight, target, bias=bias, chunk_rows=7).backward()
    assert {(a, b) for _, a, b in recorder.seen} == {(torch.float32, torch.float32)}


# A dense micro-batch: 128 sequences x 512 positions, all scored, so sum(w) = 65,536 and
# w_i / sum(w) * softmax is ~1e-7 (fp16 subnormals, 6e-8 apart) for most of d loss / d logits.
DENSE_ROWS, SMALL_HIDDEN, SMALL_VOCAB = 65536, 16, 131
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_grads_against_fp32(dtype: torch.dtype) -> None:
    """Oracle: full fp32 logits + F.cross_entropy on the same fp32 inputs, backward through a
    loss scaled by 2**16 as the trainer's fp16 loss scaler does, grads divided back.

    The head's GEMMs run in `dtype` and the logits GEMM rounds its output to `dtype` before
    the fp32 softmax (as Megatron does; on the CPU there is no half GEMM with fp32 output), so
    logits carry a relative error of about one unit roundoff u (2**-8 bf16, 2**-11 fp16),
    which dominates: measured relative (Frobenius) errors are <= 2u for the loss-free grads of
    hidden, weight and bias at this logit spread (std 2). Tolerance 6u. Without the rescaling
    of d loss / d logits by max(w) / sum(w) (values ~1e-7 cast to fp16 as they are) fp16 gives
    23u for grad_hidden and 29u for grad_weight, so this test fails.
    """
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(DENSE_ROWS, SMALL_HIDDEN, generator=g).requires_grad_()
    weight = (torch.randn(SMALL_VOCAB, SMALL_HIDDEN, generator=g) * 0.5).requires_grad_()
    bias = (torch.randn(SMALL_VOCAB, generator=g) * 0.5).requires_grad_()
    with torch.no_grad():  # a trained model: the target is mostly the top prediction
        best = (hidden @ weight.T + bias).argmax(dim=1)
    target = torch.randint(0, SMALL_VOCAB, (DENSE_ROWS,), generator=g)
    target = torch.where(torch.rand(DENSE_ROWS, generator=g) < 0.7, best, target)
    loss_scale = 2.0**16
    with torch.autocast("cpu", dtype=dtype):
        loss = kernels.linear_cross_entropy(hidden, weight, target, bias=bias)
    (loss * loss_scale).backward()
    got = [t / loss_scale for t in _grads(hidden, weight, bias)]
    ref = F.cross_entropy(hidden @ weight.T + bias, target)
    (ref * loss_scale).backward()
    want = [t / loss_scale for t in _grads(hidden, weight, bias)]
    tolerance = 6 * UNIT_ROUNDOFF[dtype]
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= tolerance * ref.item()
    for got_g, want_g, name in zip(got, want, ("hidden", "weight", "bias"), strict=True):
        error = _relative_error(got_g, want_g)
        assert error <= tolerance, f"grad_{name}: relative error {error:.2e} > {tolerance:.2e}"


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
