"""Which path each `kernels` op takes, the PyTorch references, and the model/optimizer wiring.

The Triton kernels themselves are checked in test_kernels_triton.py (interpreter and build
check, in subprocesses). Everything here runs in-process on the CPU in a few seconds.
"""

from __future__ import annotations

import importlib
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import cross_entropy as ce_module
from kernels import dispatch
from kernels import lamb as lamb_module
from pretrain.config import ModelShape
from pretrain.model import LayerNorm, build_model
from pretrain.optim import build_optimizer

# kernels.layer_norm and kernels.bias_gelu are the functions; their modules by full name:
layer_norm_module = importlib.import_module("kernels.layer_norm")
bias_gelu_module = importlib.import_module("kernels.bias_gelu")

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("is_cuda", "capability", "importable", "enabled", "compiling", "version", "expected"),
    [
        (True, (8, 0), True, True, False, (3, 9), True),  # A100
        (True, (8, 6), True, True, False, (3, 9), True),  # A10 / RTX 30xx
        (True, (9, 0), True, True, False, (3, 9), True),  # H100
        (True, (9, 0), True, True, False, None, True),  # H100, version unreadable
        (True, (7, 0), True, True, False, (3, 8), True),  # V100, Triton checked at sm_70
        (True, (7, 0), True, True, False, (3, 9), True),  # V100, Triton checked at sm_70
        (True, (7, 0), True, True, False, (3, 7), False),  # V100, Triton never checked
        (True, (7, 0), True, True, False, (4, 0), False),  # V100, newer Triton: not checked
        (True, (7, 0), True, True, False, None, False),  # V100, version unknown
        (True, (7, 5), True, True, False, (3, 9), False),  # T4: never checked
        (True, (8, 0), False, True, False, (3, 9), False),  # triton not installed
        (True, (8, 0), True, False, False, (3, 9), False),  # kernels.enabled=false
        (True, (8, 0), True, True, True, (3, 9), False),  # inside torch.compile: Inductor fuses
        (False, None, True, True, False, (3, 9), False),  # CPU
    ],
)
def test_dispatch_rule(
    is_cuda, capability, importable, enabled, compiling, version, expected
) -> None:
    """Oracle: kernels/dispatch.py's documented rule (Triton on CUDA with capability >= 8.0,
    or sm_70 with a Triton that kernels.build_check built for sm_70, when importable)."""
    got = dispatch.choose_triton(
        is_cuda=is_cuda,
        capability=capability,
        triton_importable=importable,
        enabled=enabled,
        compiling=compiling,
        version=version,
    )
    assert got is expected


def test_use_triton_reads_device_and_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """`use_triton` on a CUDA-looking tensor asks the device's capability and honours
    set_enabled / reference_only (the choice is tested, not a launch)."""
    capability = {"value": (8, 0)}
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: capability["value"]
    )
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    fake = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    assert dispatch.use_triton(fake) is True
    with kernels.reference_only():
        assert dispatch.use_triton(fake) is False
        assert not kernels.is_enabled()
    assert dispatch.use_triton(fake) is True
    kernels.set_enabled(False)
    try:
        assert dispatch.use_triton(fake) is False
    finally:
        kernels.set_enabled(True)
    capability["value"] = (7, 5)
    assert dispatch.use_triton(fake) is False
    capability["value"] = (7, 0)
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 9))
    assert dispatch.use_triton(fake) is True
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 7))
    assert dispatch.use_triton(fake) is False


def test_cpu_tensors_take_the_references() -> None:
    """CPU tensors never reach a Triton module, whatever is installed."""
    x = torch.zeros(3, 8)
    w, b = torch.ones(8), torch.zeros(8)
    assert dispatch.use_triton(x) is False
    assert ce_module._pick_chunk_math(x) is ce_module.chunk_math_reference
    assert layer_norm_module._triton_applies(x, w, b, None) is False
    assert bias_gelu_module._triton_applies(x, b) is False
    assert lamb_module._triton_applies([w], [w], [w], [w]) is False


def test_layer_norm_reference_matches_torch() -> None:
    """Oracle: nn.LayerNorm after a plain residual add; odd hidden 131, eps 1e-12."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 131, generator=g)
    r = torch.randn(3, 7, 131, generator=g)
    norm = nn.LayerNorm(131, eps=1e-12)
    nn.init.normal_(norm.weight, 1.0, 0.1, generator=g)
    nn.init.normal_(norm.bias, 0.0, 0.1, generator=g)
    y = kernels.layer_norm(x, norm.weight, norm.bias, 1e-12)
    torch.testing.assert_close(y, norm(x), rtol=0, atol=0)
    y, s = kernels.layer_norm(x, norm.weight, norm.bias, 1e-12, residual=r, return_sum=True)
    torch.testing.assert_close(s, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, norm(x + r), rtol=0, atol=0)
    with pytest.raises(ValueError, match="return_sum"):
        kernels.layer_norm(x, norm.weight, norm.bias, return_sum=True)


def test_bias_gelu_reference_matches_torch() -> None:
    """Oracle: F.gelu(x + bias) (exact erf GELU) in fp32; under bf16 autocast the output keeps
    the input's dtype as nn.Linear's bias add would."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 131, generator=g)
    b = torch.randn(131, generator=g)
    torch.testing.assert_close(kernels.bias_gelu(x, b), F.gelu(x + b), rtol=0, atol=0)
    assert kernels.bias_gelu(x.bfloat16(), b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bias must be"):
        kernels.bias_gelu(x, b[:7])


def _tiny_model(norm: str) -> nn.Module:
    shape = ModelShape(
        layers=2,
        hidden=32,
        heads=2,
        ffn_hidden=64,
        vocab_size=101,
        max_seq_len=16,
        norm=norm,
        dropout=0.0,
        pair_head=False,
    )
    return build_model(shape)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_model_calls_the_kernels(norm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every LayerNorm module and every MLP goes through kernels.layer_norm / kernels.bias_gelu,
    and the result equals the unfused torch computation (nn.LayerNorm, F.gelu(fc_in(x)))."""
    torch.manual_seed(0)
    model = _tiny_model(norm).eval()
    calls = {"layer_norm": 0, "bias_gelu": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    ids = torch.randint(5, 101, (2, 9))
    types_ = torch.zeros_like(ids)
    monkeypatch.setattr(kernels, "layer_norm", counting("layer_norm", kernels.layer_norm))
    monkeypatch.setattr(kernels, "bias_gelu", counting("bias_gelu", kernels.bias_gelu))
    hidden = model(ids, types_)
    n_norms = sum(isinstance(m, LayerNorm) for m in model.modules())
    # the MLM head's norm is not part of forward (objectives.py applies the head)
    assert calls == {"layer_norm": n_norms - 1, "bias_gelu": 2}
    assert all(type(m) is not nn.LayerNorm for m in model.modules())

    monkeypatch.undo()
    unfused = _tiny_model(norm).eval()
    unfused.load_state_dict(model.state_dict())
    for layer in unfused.layers:  # the pre-kernels MLP forward
        layer.mlp.forward = lambda x, mlp=layer.mlp: mlp.fc_out(
            F.gelu(F.linear(x, mlp.fc_in.weight, mlp.fc_in.bias))
        )
    torch.testing.assert_close(hidden, unfused(ids, types_), atol=1e-5, rtol=1e-5)


def test_layer_norm_module_is_state_dict_compatible() -> None:
    """Checkpoints and exports written with nn.LayerNorm load unchanged, and vice versa."""
    ours = LayerNorm(131, eps=1e-12)
    plain = nn.LayerNorm(131, eps=1e-12)
    assert list(ours.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(4, 131)
    torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)
    assert isinstance(ours, nn.LayerNorm)  # init and weight-decay rules keep applying


def test_lamb_optimizer_calls_lamb_step_once_per_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """pretrain.optim.Lamb delegates its maths to kernels.lamb_step, passing its
    `_tensor_norms` hook (tensor parallelism's reduction point)."""
    model = _tiny_model("post")
    opt = build_optimizer(model, "lamb", lr=1e-3, weight_decay=0.01)
    seen = []
    original = kernels.lamb_step

    def spy(params, grads, exp_avgs, exp_avg_sqs, steps, **kw):
        seen.append((len(params), kw["weight_decay"], kw["tensor_norms"]))
        return original(params, grads, exp_avgs, exp_avg_sqs, steps, **kw)

    monkeypatch.setattr(kernels, "lamb_step", spy)
    ids = torch.randint(5, 101, (2, 9))
    model(ids, torch.zeros_like(ids)).sum().backward()
    opt.step()
    assert [s[1] for s in seen] == [0.01, 0.0]
    assert all(s[2] == opt._tensor_norms for s in seen)
    assert sum(s[0] for s in seen) == sum(p.grad is not None for p in model.parameters())
