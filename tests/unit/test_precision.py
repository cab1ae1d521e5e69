"""Autocast contexts and the fp16 dynamic loss scaler of `pretrain.precision`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pretrain import precision
from pretrain.precision import (
    DynamicLossScaler,
    autocast_context,
    choose_precision,
    cpu_flags,
    dtype_summary,
    resolve_precision,
)

torch.set_num_threads(1)


def _param_with_grad(grad: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(torch.zeros_like(grad))
    p.grad = grad.clone()
    return p


def test_autocast_context_dtypes() -> None:
    """Oracle: the dtype torch.autocast gives a matmul on the CPU."""
    x, w = torch.randn(2, 3), torch.randn(3, 4)
    with autocast_context("fp32", "cpu"):
        assert (x @ w).dtype == torch.float32
    with autocast_context("bf16", "cpu"):
        assert (x @ w).dtype == torch.bfloat16
    with autocast_context("fp16", "cpu"):
        assert (x @ w).dtype == torch.float16
    with pytest.raises(ValueError, match="unknown precision"):
        autocast_context("fp8", "cpu")  # type: ignore[arg-type]


def test_unscale_equals_division_by_scale() -> None:
    """Oracle: grad / scale, exact because the scale is a power of two."""
    scaler = DynamicLossScaler(init_scale=2.0**10)
    grads = [torch.randn(3, 5), torch.randn(7).half(), torch.randn(2, 2)]
    params = [_param_with_grad(g) for g in grads] + [nn.Parameter(torch.ones(2))]  # no grad
    assert scaler.unscale_and_check(params) is False
    for p, g in zip(params[:-1], grads, strict=True):
        assert torch.equal(p.grad, g / 2.0**10)
    assert params[-1].grad is None


def test_overflow_backs_off_and_clean_steps_grow() -> None:
    """Oracle: the policy — halve on inf/NaN, double after growth_interval clean steps."""
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3, min_scale=2.0)
    bad = _param_with_grad(torch.tensor([1.0, float("inf")]))
    good = _param_with_grad(torch.tensor([1.0, 2.0]))
    found = scaler.unscale_and_check([good, bad])
    assert found is True
    scaler.update(found)
    assert scaler.scale == 4.0 and scaler.growth_tracker == 0

    nan = _param_with_grad(torch.tensor([float("nan")]).half())
    assert scaler.unscale_and_check([nan]) is True
    scaler.update(True)
    scaler.update(True)  # clamped at min_scale
    assert scaler.scale == 2.0

    for _ in range(2):
        scaler.update(False)
    assert scaler.scale == 2.0 and scaler.growth_tracker == 2
    scaler.update(False)
    assert scaler.scale == 4.0 and scaler.growth_tracker == 0
    scaler.update(False)
    scaler.update(True)  # an overflow resets the run of clean steps
    assert scaler.scale == 2.0 and scaler.growth_tracker == 0


def test_reduce_found_inf_hook_decides() -> None:
    """Oracle: another rank's overflow (simulated by the hook) makes this rank skip too."""
    scaler = DynamicLossScaler()
    p = _param_with_grad(torch.ones(3))
    seen: list[float] = []

    def other_rank_overflowed(flag: torch.Tensor) -> torch.Tensor:
        seen.append(flag.item())
        return flag + 1.0

    assert scaler.unscale_and_check([p], reduce_found_inf=other_rank_overflowed) is True
    assert seen == [0.0]


def test_disabled_scaler_only_checks_finiteness() -> None:
    """fp32/bf16: scale 1, gradients untouched, nothing grown; a non-finite gradient is still
    reported (the divergence stop works in every precision)."""
    scaler = DynamicLossScaler(enabled=False)
    loss = torch.tensor(3.0)
    assert scaler.scale_loss(loss) is loss
    finite = _param_with_grad(torch.tensor([3.0, -1.5]))
    assert scaler.unscale_and_check([finite]) is False
    assert torch.equal(finite.grad, torch.tensor([3.0, -1.5]))
    p = _param_with_grad(torch.tensor([float("inf")]))
    assert scaler.unscale_and_check([p]) is True
    scaler.update(True)
    assert scaler.scale == 1.0 and not scaler.at_floor
    assert torch.isinf(p.grad).all()


def test_the_check_reads_half_gradients_in_fp32_and_flags_overflowing_ones() -> None:
    """Oracle: float arithmetic. An fp16 gradient of 300 is finite though its square is not in
    fp16 (the norm must be taken in fp32); an fp32 gradient of 1e20 is finite but its square
    overflows fp32, and such a step is skipped like a non-finite one."""
    scaler = DynamicLossScaler(enabled=False)
    half = _param_with_grad(torch.full((64,), 300.0).half())
    assert scaler.unscale_and_check([half]) is False
    huge = _param_with_grad(torch.tensor([1e20, 1.0]))
    assert scaler.unscale_and_check([half, huge]) is True


def test_auto_precision_rule() -> None:
    """Oracle: the rule of the issue — fp16 below compute capability 8.0, bf16 from 8.0; on the
    CPU bf16 only with native bf16 instructions (AVX512_BF16 or AMX), fp32 on AVX2-only CPUs."""
    avx2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
    assert choose_precision("cuda", (7, 0), avx2) == "fp16"  # V100
    assert choose_precision("cuda", (7, 5), avx2) == "fp16"  # T4
    assert choose_precision("cuda", (8, 0), avx2) == "bf16"  # A100
    assert choose_precision("cuda", (9, 0), frozenset()) == "bf16"  # H100
    assert choose_precision("cpu", None, avx2) == "fp32"
    assert choose_precision("cpu", None, avx2 | {"avx512f", "avx512bw"}) == "fp32"
    assert choose_precision("cpu", None, avx2 | {"avx512f", "avx512_bf16"}) == "bf16"
    assert choose_precision("cpu", None, avx2 | {"amx_bf16", "amx_tile"}) == "bf16"


def test_cpu_flags_read_from_cpuinfo(tmp_path) -> None:
    """Oracle: a hand-written /proc/cpuinfo excerpt; a missing file means no flags."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbogomips\t: 1\n")
    assert cpu_flags(info) == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_bf16_refused_below_capability_8(monkeypatch) -> None:
    """A simulated V100 (the capability query patched): bf16 is refused naming auto/fp16, auto
    resolves to fp16, fp16 and fp32 pass."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    gpu = torch.device("cuda", 0)
    with pytest.raises(ValueError, match="auto or fp16"):
        resolve_precision("bf16", gpu)
    assert resolve_precision("auto", gpu)[0] == "fp16"
    assert resolve_precision("fp16", gpu)[0] == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_precision("bf16", gpu)[0] == "bf16"
    assert resolve_precision("auto", gpu)[0] == "bf16"


def test_auto_on_the_cpu_follows_its_bf16_support(monkeypatch) -> None:
    """Both answers of the CPU rule through `resolve_precision`, on simulated /proc/cpuinfo
    flags: an AVX2-only CPU (bf16 products 8-10x slower than fp32 there) gets fp32, one with
    AVX512_BF16 gets bf16, and the reason names what decided."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx", "avx2", "fma"}))
    assert resolve_precision("auto", cpu) == ("fp32", "auto: CPU without native bf16")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert resolve_precision("auto", cpu) == ("bf16", "auto: CPU with avx512_bf16")


def test_dtype_summary_names_every_dtype() -> None:
    """Oracle: the issue's list for the start-up line (autocast, master weights, optimizer
    state, the MLM head's GEMMs in the autocast dtype, the gradient reduction and its
    `parallel.grad_reduce_dtype`), for each kind of dp reduction."""
    assert dtype_summary("fp16", "cuda", 8, True, "fp16") == (
        "precision fp16: matmuls in fp16 autocast on cuda; master weights fp32; optimizer state "
        "fp32; MLM head (decoder + cross-entropy) GEMMs in fp16, softmax and loss fp32 in "
        "kernels.linear_cross_entropy; gradients fp32, reduced to their ZeRO-1 owner over dp 8 "
        "in fp16; dynamic loss scaling"
    )
    bf16 = dtype_summary("bf16", "cpu", 2, False, "bf16")
    assert "GEMMs in bf16," in bf16
    assert bf16.endswith("gradients fp32, all-reduced over dp 2 in bf16; no loss scaling")
    fp32 = dtype_summary("fp32", "cpu", 1, False, "fp32")
    assert "matmuls in fp32 (no autocast) on cpu" in fp32 and "GEMMs in fp32," in fp32
    assert fp32.endswith("gradients fp32, no dp reduction; no loss scaling")


def test_state_round_trip_through_json() -> None:
    """Oracle: the original scaler's fields after a JSON dump/load."""
    scaler = DynamicLossScaler(init_scale=2.0**12, growth_interval=5)
    scaler.update(True)
    scaler.update(False)
    scaler.update(False)
    text = json.dumps(scaler.state_dict())
    restored = DynamicLossScaler(growth_interval=5)
    restored.load_state_dict(json.loads(text))
    assert restored.scale == 2.0**11 and restored.growth_tracker == 2
    for _ in range(3):
        scaler.update(False)
        restored.update(False)
    assert restored.state_dict() == scaler.state_dict() == {"scale": 2.0**12, "growth_tracker": 0}


def test_fp16_autocast_training_with_scaler_skips_inf_step() -> None:
    """A linear layer learns y = 2x under fp16 autocast on the CPU (tiny shapes: fp16 GEMM is
    slow here); a step with an injected inf gradient is skipped and leaves the weights alone."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = DynamicLossScaler(init_scale=2.0**8)
    x = torch.randn(16, 4)
    y = 2 * x.sum(dim=1, keepdim=True)

    def step(inject_inf: bool) -> tuple[float, bool]:
        opt.zero_grad(set_to_none=True)
        with autocast_context("fp16", "cpu"):
            pred = layer(x)
            assert pred.dtype == torch.float16
            loss = (pred.float() - y).pow(2).mean()
        scaler.scale_loss(loss).backward()
        if inject_inf:
            layer.weight.grad[0, 0] = float("inf")
        found = scaler.unscale_and_check(layer.parameters())
        if not found:
            opt.step()
        scaler.update(found)
        return loss.item(), found

    first, found = step(False)
    assert not found
    for _ in range(30):
        last, found = step(False)
        assert not found
    assert last < 0.05 * first

    before = [p.detach().clone() for p in layer.parameters()]
    scale = scaler.scale
    _, found = step(True)
    assert found
    assert scaler.scale == scale / 2
    for p, b in zip(layer.parameters(), before, strict=True):
        assert torch.equal(p, b)
