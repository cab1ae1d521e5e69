"""LAMB, AdamW, schedules and clipping of `pretrain.optim`, against plain references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from pretrain.optim import (
    Lamb,
    build_optimizer,
    build_param_groups,
    clip_grad_norm_,
    lr_at,
    set_lr,
)

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """Mixed shapes: matrices, biases, a LayerNorm, a 3-D tensor, and a zero-initialised matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 5)
        self.LayerNorm = nn.LayerNorm(5)
        self.conv_like = nn.Parameter(torch.randn(2, 5, 3) * 0.1)
        self.zero_w = nn.Parameter(torch.zeros(3, 4))  # ||p|| = 0 -> trust ratio 1
        self.out = nn.Linear(4, 3, bias=False)
        self.unused = nn.Parameter(torch.ones(2, 2))  # never gets a grad -> skipped
        self.dead = nn.Parameter(torch.ones(3))  # grad always 0, no decay -> ||u|| = 0, r = 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.LayerNorm(self.proj(self.embed(ids)))  # [B, 5]
        h = torch.einsum("bi,kij->bj", h, self.conv_like)  # [B, 3]
        return self.out(h @ self.zero_w).sum() + h.pow(2).mean() + (0 * self.dead).sum()


def _set_grads(model: nn.Module, seed: int) -> None:
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, 11, (7,), generator=torch.Generator().manual_seed(seed))
    model(ids).backward()


def reference_lamb_step(
    params: list[torch.Tensor],
    state: dict[int, dict[str, torch.Tensor | int]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decays: list[float],
) -> None:
    """You et al. 2019, Algorithm 2, one tensor at a time in float64 (phi = identity)."""
    b1, b2 = betas
    for i, (p, wd) in enumerate(zip(params, weight_decays, strict=True)):
        if p.grad is None:
            continue
        g = p.grad.double()
        s = state.setdefault(i, {"t": 0, "m": torch.zeros_like(g), "v": torch.zeros_like(g)})
        s["t"] += 1
        s["m"] = b1 * s["m"] + (1 - b1) * g
        s["v"] = b2 * s["v"] + (1 - b2) * g * g
        m_hat = s["m"] / (1 - b1 ** s["t"])
        v_hat = s["v"] / (1 - b2 ** s["t"])
        w = p.detach().double()
        u = m_hat / (v_hat.sqrt() + eps) + wd * w
        w_norm, u_norm = w.norm(), u.norm()
        r = (w_norm / u_norm).item() if w_norm > 0 and u_norm > 0 else 1.0
        with torch.no_grad():
            p.copy_(w - lr * r * u)


def test_lamb_matches_reference_over_five_steps() -> None:
    """Oracle: the per-tensor float64 transcription above; 1e-6 covers float32 rounding."""
    torch.manual_seed(0)
    model = TinyNet()
    ref_model = copy.deepcopy(model)
    opt = build_optimizer(model, "lamb", lr=0.01, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-6)
    assert isinstance(opt, Lamb)
    ref_params = list(ref_model.parameters())
    decays = [
        0.0 if p.ndim < 2 or "norm" in n.lower() else 0.1 for n, p in ref_model.named_parameters()
    ]
    ref_state: dict[int, dict] = {}
    for step in range(5):
        _set_grads(model, step)
        _set_grads(ref_model, step)
        opt.step()
        reference_lamb_step(
            ref_params, ref_state, lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decays=decays
        )
        for (name, p), q in zip(model.named_parameters(), ref_params, strict=True):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=f"{name} at step {step}")
    assert torch.equal(model.unused, torch.ones(2, 2))
    assert model.unused not in opt.state
    assert model.zero_w.abs().sum() > 0  # moved off zero with r = 1
    assert torch.equal(model.dead, torch.ones(3))  # zero update, no NaN from 0/0


def test_weight_decay_exclusion() -> None:
    """Oracle: the rule itself — matrices decay; biases, norms and any ndim < 2 do not."""
    model = TinyNet()
    model.unused.requires_grad_(False)
    groups = build_param_groups(model, 0.01)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for p in groups[0]["params"]}
    plain = {by_id[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert decayed == {"embed.weight", "proj.weight", "conv_like", "zero_w", "out.weight"}
    assert plain == {"proj.bias", "LayerNorm.weight", "LayerNorm.bias", "dead"}


def test_adamw_matches_torch_adamw() -> None:
    """Oracle: torch.optim.AdamW(foreach=False) on the same groups; the foreach path may round
    differently in the last bit, hence 1e-6."""
    torch.manual_seed(1)
    model = TinyNet()
    ref_model = copy.deepcopy(model)
    opt = build_optimizer(model, "adamw", lr=0.01, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)
    ref = torch.optim.AdamW(
        build_param_groups(ref_model, 0.1), lr=0.01, betas=(0.9, 0.99), eps=1e-8, foreach=False
    )
    for step in range(4):
        _set_grads(model, step)
        _set_grads(ref_model, step)
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_state_dict_resume_is_bitwise(name: str) -> None:
    """Oracle: an uninterrupted run; save after 3 steps, load into fresh objects, 3 more steps."""
    torch.manual_seed(2)
    model = TinyNet()
    start = copy.deepcopy(model.state_dict())

    def make(m: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(m, name, lr=0.01, weight_decay=0.1)

    opt = make(model)
    for step in range(6):
        set_lr(opt, 0.01 / (step + 1))
        _set_grads(model, step)
        opt.step()
    expected = [p.detach().clone() for p in model.parameters()]

    model = TinyNet()
    model.load_state_dict(start)
    opt = make(model)
    for step in range(3):
        set_lr(opt, 0.01 / (step + 1))
        _set_grads(model, step)
        opt.step()
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())

    model = TinyNet()
    model.load_state_dict(saved_model)
    opt = make(model)
    opt.load_state_dict(saved_opt)
    for step in range(3, 6):
        set_lr(opt, 0.01 / (step + 1))
        _set_grads(model, step)
        opt.step()
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p, e)


def test_unknown_optimizer_name() -> None:
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(TinyNet(), "sgd", lr=0.1, weight_decay=0.0)  # type: ignore[arg-type]


def test_lr_schedules_at_key_steps() -> None:
    """Oracle: the formulas in lr_at's docstring, evaluated by hand."""
    kw = {"base_lr": 1.0, "warmup_steps": 10, "total_steps": 110}
    for decay in ("poly", "linear", "cosine"):
        assert lr_at(0, decay=decay, **kw) == pytest.approx(0.1)
        assert lr_at(4, decay=decay, **kw) == pytest.approx(0.5)
        assert lr_at(9, decay=decay, **kw) == pytest.approx(1.0)
        assert lr_at(10, decay=decay, **kw) == pytest.approx(1.0)
        assert lr_at(110, decay=decay, **kw) == pytest.approx(0.0)
        assert lr_at(500, decay=decay, **kw) == pytest.approx(0.0)
        assert lr_at(110, decay=decay, min_lr_ratio=0.1, **kw) == pytest.approx(0.1)
    assert lr_at(35, decay="linear", **kw) == pytest.approx(0.75)
    assert lr_at(35, decay="poly", **kw) == pytest.approx(0.75)
    assert lr_at(35, decay="poly", power=2.0, **kw) == pytest.approx(0.5625)
    assert lr_at(60, decay="poly", power=0.5, **kw) == pytest.approx(math.sqrt(0.5))
    assert lr_at(60, decay="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(35, decay="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(60, decay="linear", min_lr_ratio=0.2, **kw) == pytest.approx(0.6)
    no_warmup = {"base_lr": 2.0, "warmup_steps": 0, "total_steps": 100, "decay": "linear"}
    assert lr_at(0, **no_warmup) == pytest.approx(2.0)
    assert lr_at(50, **no_warmup) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown decay"):
        lr_at(20, decay="step", **kw)  # type: ignore[arg-type]


def test_set_lr_sets_every_group() -> None:
    opt = build_optimizer(TinyNet(), "lamb", lr=0.1, weight_decay=0.01)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clip_matches_torch(max_norm: float) -> None:
    """Oracle: torch.nn.utils.clip_grad_norm_ (clipping and not clipping)."""
    torch.manual_seed(3)
    model = TinyNet()
    ref_model = copy.deepcopy(model)
    _set_grads(model, 0)
    _set_grads(ref_model, 0)
    total = clip_grad_norm_(model.parameters(), max_norm)
    ref_total = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm)
    torch.testing.assert_close(total, ref_total)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad)


def test_clip_measure_only_norm_fn_and_non_finite() -> None:
    """max_norm <= 0 only measures; norm_fn sees per-tensor squares; inf leaves grads alone."""
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2, 2))
    a.grad = torch.tensor([3.0, 0.0, 0.0])
    b.grad = torch.full((2, 2), 2.0)
    seen: list[torch.Tensor] = []

    def norm_fn(squares: torch.Tensor) -> torch.Tensor:
        seen.append(squares.clone())
        return squares.sum() * 4  # as if 4 identical ranks were summed

    total = clip_grad_norm_([a, b], 0.0, norm_fn=norm_fn)
    torch.testing.assert_close(seen[0], torch.tensor([9.0, 16.0]))
    torch.testing.assert_close(total, torch.tensor(10.0))
    assert torch.equal(a.grad, torch.tensor([3.0, 0.0, 0.0]))

    b.grad[0, 0] = float("inf")
    total = clip_grad_norm_([a, b], 1.0)
    assert torch.isinf(total)
    assert torch.equal(a.grad, torch.tensor([3.0, 0.0, 0.0]))
