"""Tensor parallelism in real processes (gloo) against the unsharded computation.

Oracles: the same layers / the same model computed by one process. Shards are cut from the
same full weights, so results agree to float rounding (fp32; tolerances 1e-5 relative).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_distributed

REPO = Path(__file__).resolve().parents[2]


def _dims(tp: int):
    import torch.distributed as dist

    from launch.env import detect_environment
    from launch.rendezvous import init_distributed
    from pretrain.distributed import build_dims

    env = detect_environment()
    init_distributed(env, "gloo", 60)
    return build_dims(dist.get_world_size(), dist.get_rank(), tp, torch.device("cpu"))


def _vocab_parallel_ce(position_weight: bool) -> dict:
    """Rank's view: loss, stats and full grads (gathered) of the vocab-parallel CE."""
    import kernels
    from pretrain.parallel.collectives import tp_collectives
    from pretrain.parallel.mappings import copy_to_tp_region, gather_from_tp_region

    dims = _dims(2)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 131, generator=gen)
    weight = torch.randn(1031 + 1, 131, generator=gen) * 0.1  # 1032 rows: 516 per rank
    bias = torch.randn(1032, generator=gen)
    target = torch.randint(0, 1031, (13,), generator=gen)
    target[[2, 7]] = -100
    pw = torch.rand(13, generator=gen) if position_weight else None
    half = 1032 // 2
    rows = slice(dims.tp_rank * half, (dims.tp_rank + 1) * half)
    h = hidden.clone().requires_grad_()
    w = weight[rows].clone().requires_grad_()
    b = bias[rows].clone().requires_grad_()
    loss, row_loss, argmax = kernels.linear_cross_entropy(
        copy_to_tp_region(h, dims.tp_group),
        w,
        target,
        bias=b,
        position_weight=pw,
        tp=tp_collectives(dims.tp_group),
        return_stats=True,
        chunk_rows=4,
    )
    loss.backward()
    grad_w = gather_from_tp_region(w.grad.T.contiguous(), dims.tp_group).T
    grad_b = gather_from_tp_region(b.grad, dims.tp_group)
    return {
        "loss": loss,
        "row_loss": row_loss,
        "argmax": argmax,
        "grad_h": h.grad,
        "grad_w": grad_w,
        "grad_b": grad_b,
    }


@pytest.mark.parametrize("position_weight", [False, True])
def test_vocab_parallel_cross_entropy_matches_full_logits(position_weight):
    import torch.nn.functional as F

    ranks = run_distributed(_vocab_parallel_ce, 2, position_weight)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 131, generator=gen).requires_grad_()
    weight = (torch.randn(1032, 131, generator=gen) * 0.1).requires_grad_()
    bias = torch.randn(1032, generator=gen).requires_grad_()
    target = torch.randint(0, 1031, (13,), generator=gen)
    target[[2, 7]] = -100
    pw = torch.rand(13, generator=gen) if position_weight else None
    logits = hidden @ weight.T + bias
    per_row = F.cross_entropy(logits, target, reduction="none", ignore_index=-100)
    w = (target != -100).float() * (pw if pw is not None else 1.0)
    loss = (per_row * w).sum() / w.sum()
    loss.backward()
    for out in ranks:
        out = {k: torch.from_numpy(v) for k, v in out.items()}
        torch.testing.assert_close(out["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["row_loss"], per_row.detach(), rtol=1e-5, atol=1e-5)
        scored = target != -100
        assert torch.equal(out["argmax"][scored], logits.argmax(1)[scored])
        torch.testing.assert_close(out["grad_h"], hidden.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["grad_w"], weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["grad_b"], bias.grad, rtol=1e-5, atol=1e-6)


HALF_ROWS, HALF_HIDDEN, HALF_VOCAB = 8192, 16, 262  # 131 vocabulary rows per rank


def _half_inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(HALF_ROWS, HALF_HIDDEN, generator=gen)
    weight = torch.randn(HALF_VOCAB, HALF_HIDDEN, generator=gen) * 0.5
    bias = torch.randn(HALF_VOCAB, generator=gen) * 0.5
    target = torch.randint(0, HALF_VOCAB, (HALF_ROWS,), generator=gen)
    target[::9] = -100
    position_weight = torch.where(torch.rand(HALF_ROWS, generator=gen) < 0.15, 1.0, 0.1)
    return hidden, weight, bias, target, position_weight


def _vocab_parallel_ce_half(dtype_name: str) -> dict:
    """Rank's view of the vocab-parallel head under autocast: loss and full (gathered) grads."""
    import kernels
    from pretrain.parallel.collectives import tp_collectives
    from pretrain.parallel.mappings import copy_to_tp_region, gather_from_tp_region

    dims = _dims(2)
    hidden, weight, bias, target, pw = _half_inputs()
    half = HALF_VOCAB // 2
    rows = slice(dims.tp_rank * half, (dims.tp_rank + 1) * half)
    h = hidden.clone().requires_grad_()
    w = weight[rows].clone().requires_grad_()
    b = bias[rows].clone().requires_grad_()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    with torch.autocast("cpu", dtype=dtype):
        loss = kernels.linear_cross_entropy(
            copy_to_tp_region(h, dims.tp_group),
            w,
            target,
            bias=b,
            position_weight=pw,
            tp=tp_collectives(dims.tp_group),
        )
    (loss * 2.0**16).backward()  # as the fp16 loss scaler does; divided back below
    grad_w = gather_from_tp_region(w.grad.T.contiguous(), dims.tp_group).T
    grad_b = gather_from_tp_region(b.grad, dims.tp_group)
    return {
        "loss": loss,
        "grad_h": h.grad / 2.0**16,
        "grad_w": grad_w / 2.0**16,
        "grad_b": grad_b / 2.0**16,
    }


@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
def test_vocab_parallel_cross_entropy_in_half_precision(dtype_name):
    """tp 2 under bf16/fp16 autocast (GEMMs in the half dtype, 8,192 scored rows with dense-MLM
    weights 1 / 0.1) against full fp32 logits + F.cross_entropy on one process. The logits are
    rounded to the half dtype before the fp32 softmax, which dominates the error: tolerance 6
    unit roundoffs u (2**-8 bf16, 2**-11 fp16) of relative (Frobenius) error, as in the
    single-process test in tests/unit/test_kernels_cross_entropy.py."""
    import torch.nn.functional as F

    ranks = run_distributed(_vocab_parallel_ce_half, 2, dtype_name)
    hidden, weight, bias, target, pw = _half_inputs()
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    per_row = F.cross_entropy(
        leaves[0] @ leaves[1].T + leaves[2], target, reduction="none", ignore_index=-100
    )
    w = (target != -100).float() * pw
    loss = (per_row * w).sum() / w.sum()
    loss.backward()
    loss = loss.detach()
    tolerance = 6 * {"bf16": 2.0**-8, "fp16": 2.0**-11}[dtype_name]
    for out in ranks:
        out = {k: torch.from_numpy(v) for k, v in out.items()}
        assert abs(float(out["loss"]) - float(loss)) <= tolerance * float(loss)
        for name, leaf in zip(("grad_h", "grad_w", "grad_b"), leaves, strict=True):
            error = float((out[name] - leaf.grad).norm() / leaf.grad.norm())
            assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.2e}"


def _layers() -> dict:
    """Column → row MLP and the vocab-parallel embedding: outputs and input grads."""
    from torch import nn

    from pretrain.parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    dims = _dims(2)
    torch.manual_seed(0)
    fc_in, fc_out, emb = nn.Linear(12, 20), nn.Linear(20, 12), nn.Embedding(131, 12)
    x = torch.randn(3, 5, 12)
    ids = torch.randint(0, 131, (3, 5))
    g, r, p = dims.tp_group, dims.tp_rank, 2
    col, row = ColumnParallelLinear(fc_in, g, r, p), RowParallelLinear(fc_out, g, r, p)
    vemb = VocabParallelEmbedding(emb, 256, g, r, p)
    xin = x.clone().requires_grad_()
    y = row(torch.nn.functional.gelu(col(xin)))
    y.square().sum().backward()
    return {
        "y": y.detach(),
        "dx": xin.grad,
        "emb": vemb(ids).detach(),
        "row_bias_grad": row.bias.grad,
    }


def test_column_row_linear_and_vocab_embedding():
    ranks = run_distributed(_layers, 2)
    from torch import nn

    torch.manual_seed(0)
    fc_in, fc_out, emb = nn.Linear(12, 20), nn.Linear(20, 12), nn.Embedding(131, 12)
    x = torch.randn(3, 5, 12).requires_grad_()
    ids = torch.randint(0, 131, (3, 5))
    y = fc_out(torch.nn.functional.gelu(fc_in(x)))
    y.square().sum().backward()
    for out in ranks:
        out = {k: torch.from_numpy(v) for k, v in out.items()}
        torch.testing.assert_close(out["y"], y.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["dx"], x.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["emb"], emb(ids).detach())
        torch.testing.assert_close(out["row_bias_grad"], fc_out.bias.grad, rtol=1e-5, atol=1e-6)


MLP_SHAPE = dict(
    layers=1,
    hidden=12,
    heads=2,
    ffn_hidden=20,
    vocab_size=131,
    max_seq_len=8,
    norm="post",
    dropout=0.0,
    pair_head=False,
)


def _mlp_at_tp2() -> dict:
    """The model's MLP with fc_in/fc_out replaced by their tp shards as apply_tensor_parallel
    does; every call of kernels.bias_gelu is recorded (and passed through unchanged)."""
    import kernels
    from pretrain import model as model_module
    from pretrain.config import ModelShape
    from pretrain.parallel.layers import ColumnParallelLinear, RowParallelLinear

    dims = _dims(2)
    torch.manual_seed(0)
    mlp = model_module.MLP(ModelShape(**MLP_SHAPE))
    g, r, p = dims.tp_group, dims.tp_rank, 2
    mlp.fc_in = ColumnParallelLinear(mlp.fc_in, g, r, p)
    mlp.fc_out = RowParallelLinear(mlp.fc_out, g, r, p)
    calls = []
    real = kernels.bias_gelu

    def recording_bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        calls.append((list(x.shape), list(bias.shape)))
        return real(x, bias)

    model_module.kernels.bias_gelu = recording_bias_gelu
    x = torch.randn(3, 5, 12).requires_grad_()
    y = mlp(x)
    y.square().sum().backward()
    return {"y": y.detach(), "dx": x.grad, "calls": calls, "bias_grad": mlp.fc_in.bias.grad}


def test_bias_gelu_stays_fused_at_tp2():
    """At tp 2 the MLP still adds fc_in's bias inside kernels.bias_gelu (on this rank's [.., 10]
    column shard), and output, input grad and fc_in's bias grad equal the one-process MLP's
    (fp32, 1e-5 relative)."""
    from pretrain.config import ModelShape
    from pretrain.model import MLP

    ranks = run_distributed(_mlp_at_tp2, 2)
    torch.manual_seed(0)
    mlp = MLP(ModelShape(**MLP_SHAPE))
    x = torch.randn(3, 5, 12).requires_grad_()
    y = mlp(x)
    y.square().sum().backward()
    for rank, out in enumerate(ranks):
        assert out["calls"] == [([3, 5, 10], [10])]
        torch.testing.assert_close(torch.from_numpy(out["y"]), y.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(out["dx"]), x.grad, rtol=1e-5, atol=1e-6)
        shard = mlp.fc_in.bias.grad[rank * 10 : (rank + 1) * 10]
        torch.testing.assert_close(torch.from_numpy(out["bias_grad"]), shard, rtol=1e-5, atol=1e-6)


def _train(data: str, out: str, mode: str, tp: int, zero: int = 0, reduce: str = "fp32") -> list:
    from pretrain.config import load_config
    from pretrain.trainer import train

    config = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={data}",
            f"train.out_dir={out}",
            f"mlm.mode={mode}",
            f"parallel.tp={tp}",
            f"parallel.zero={zero}",
            "model.hidden=64",
            "model.heads=4",
            "model.max_seq_len=64",
            "model.dropout=0.0",
            "data.seq_len=64",
            "train.micro_batch=4",
            "train.global_batch=8",
            "train.steps=10",
            "train.precision=fp32",
            "train.log_every=1",
            "train.eval_every=10",
            "train.eval_batches=2",
            "optim.name=lamb",
            "optim.warmup_steps=2",
            "checkpoint.every=10",
            f"parallel.grad_reduce_dtype={reduce}",
        ],
    )
    result = train(config)
    return [(r["loss"], r["grad_norm"]) for r in result.history] + [
        ("eval", result.evals[-1]["masked_loss"], result.evals[-1]["mlm_acc"])
    ]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_layouts_train_like_one_process(small_dataset, tmp_path, mode):
    """10 LAMB steps at tp=2, dp=2 with ZeRO-1, dp=2 x tp=2, and dp=2 x tp=2 with ZeRO-1:
    losses, global gradient norms (every parameter counted once), evaluation and the final
    parameters (relative distance over the whole model) agree with tp = 1 x dp = 1."""
    from pretrain.checkpoint import full_model_state

    data = str(small_dataset)
    single = _train(data, str(tmp_path / "single"), mode, 1)
    reference = full_model_state(tmp_path / "single" / "checkpoints" / "step_000010")
    for world, tp, zero in ((2, 2, 0), (2, 1, 1), (4, 2, 0), (4, 2, 1)):
        out = tmp_path / f"w{world}-tp{tp}-zero{zero}"
        ranks = run_distributed(_train, world, data, str(out), mode, tp, zero)
        for got in ranks:
            for a, b in zip(got[:-1], single[:-1], strict=True):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=0)
            assert got[-1][0] == "eval"
            torch.testing.assert_close(
                torch.tensor(got[-1][1:]), torch.tensor(single[-1][1:]), rtol=1e-5, atol=0
            )
        params = full_model_state(out / "checkpoints" / "step_000010")
        diff = sum(float((params[k] - reference[k]).norm()) ** 2 for k in reference) ** 0.5
        norm = sum(float(reference[k].norm()) ** 2 for k in reference) ** 0.5
        assert diff / norm < 1e-5, (world, tp, zero, diff / norm)


@pytest.mark.slow
def test_bf16_gradient_reduction_trains_like_one_process(small_dataset, tmp_path):
    """dp=2 x tp=2 with gradients reduced in bf16 (DDP's comm hook, and ZeRO-1's reduces): each
    gradient is rounded to 8 significant bits on the wire, so the run follows the fp32
    one-process run to looser tolerances. Measured over 10 LAMB steps (both ways alike): losses
    within relative 1.4e-6, gradient norms 1.7e-4, final parameters 7.7e-5 over the whole model;
    the bounds are about 6x that. The gradient norms must also differ by more than fp32 layouts
    do (1e-5), or the gradients did not travel in bf16."""
    from pretrain.checkpoint import full_model_state

    data = str(small_dataset)
    single = _train(data, str(tmp_path / "single"), "dense", 1)
    reference = full_model_state(tmp_path / "single" / "checkpoints" / "step_000010")
    losses = torch.tensor([loss for loss, _ in single[:-1]])
    norms = torch.tensor([norm for _, norm in single[:-1]])
    for zero in (0, 1):
        out = tmp_path / f"bf16-zero{zero}"
        ranks = run_distributed(_train, 4, data, str(out), "dense", 2, zero, "bf16")
        for got in ranks:
            torch.testing.assert_close(
                torch.tensor([loss for loss, _ in got[:-1]]), losses, rtol=1e-5, atol=0
            )
            got_norms = torch.tensor([norm for _, norm in got[:-1]])
            torch.testing.assert_close(got_norms, norms, rtol=1e-3, atol=0)
            assert ((got_norms - norms).abs() / norms).max() > 1e-5
        params = full_model_state(out / "checkpoints" / "step_000010")
        diff = sum(float((params[k] - reference[k]).norm()) ** 2 for k in reference) ** 0.5
        norm = sum(float(reference[k].norm()) ** 2 for k in reference) ** 0.5
        assert diff / norm < 5e-4, (zero, diff / norm)


def _dropout_masks() -> dict:
    """Dropout masks seen on each tp rank: in the replicated region (after the row-parallel
    reduction) and inside the split region (attention on this rank's heads)."""
    from torch import nn

    from pretrain.parallel.rng import TPRegionRNG

    dims = _dims(2)
    torch.manual_seed(1234)  # every rank starts from the same seed, as the trainer does
    region = TPRegionRNG(nn.Dropout(0.5), dims.tp_rank).train()
    ones = torch.ones(64, 64)
    inside = region(ones)
    replicated = nn.functional.dropout(ones, 0.5)  # a replicated activation after the region
    return {"inside": inside, "replicated": replicated}


def test_dropout_rng_streams_under_tp():
    """Replicated activations get identical masks on every tp rank; split regions differ."""
    ranks = run_distributed(_dropout_masks, 2)
    assert (ranks[0]["replicated"] == ranks[1]["replicated"]).all()
    assert not (ranks[0]["inside"] == ranks[1]["inside"]).all()
