"""Model structure: parameter counts against docs/design.md's table and a closed form."""

import pytest
import torch

from pretrain.config import load_config, resolve_model_shape
from pretrain.model import build_model, count_parameters, param_count_formula

# docs/design.md: base 110M, large 340M, xlarge 1.3B, 3.9b 3.9B (BERT's 30522 WordPiece vocabulary).
EXPECTED = {"base": 110e6, "large": 340e6, "xlarge": 1.3e9, "3.9b": 3.9e9}


@pytest.mark.parametrize("size", sorted(EXPECTED))
def test_sizes_on_meta_device(size):
    """Built on the meta device (no memory); counts within 5% of the published sizes."""
    shape = resolve_model_shape(load_config(None, [f"model.size={size}"]), vocab_size=30522)
    model = build_model(shape, device="meta")
    count = count_parameters(model)
    assert count == param_count_formula(shape)
    assert abs(count - EXPECTED[size]) / EXPECTED[size] < 0.05, count


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_forward_shapes_and_padding_invariance(norm):
    """Padding tokens must not change the states of real tokens (attention mask works)."""
    torch.manual_seed(0)
    config = load_config(
        None,
        [
            "model.hidden=48",
            "model.heads=3",
            "model.layers=2",
            f"model.norm={norm}",
            "model.dropout=0.0",
        ],
    )
    model = build_model(resolve_model_shape(config, vocab_size=131)).eval()
    ids = torch.randint(5, 131, (1, 10))
    types = torch.zeros_like(ids)
    short = model(ids, types, torch.ones_like(ids))
    padded_ids = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    padded = model(padded_ids, torch.zeros_like(padded_ids), mask)
    assert padded.shape == (1, 16, 48)
    torch.testing.assert_close(padded[:, :10], short, rtol=1e-5, atol=1e-5)
    assert (model.final_norm is not None) == (norm == "pre")
    assert (model.embeddings.norm is not None) == (norm == "post")


def test_model_code_never_imports_torch_distributed():
    """The model knows nothing of process groups (docs/design.md)."""
    import pretrain.model as module

    source = open(module.__file__, encoding="utf-8").read()
    assert "torch.distributed" not in source


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_gradients(mode):
    """Oracle: the same model without recomputation; dropout is on, so the replayed RNG state
    must reproduce the masks exactly."""
    from pretrain.model import apply_recompute

    config = load_config(None, ["model.hidden=32", "model.heads=2", "model.layers=2"])
    shape = resolve_model_shape(config, vocab_size=97)
    ids = torch.randint(5, 97, (2, 12))
    grads = []
    for recompute in ("none", mode):
        torch.manual_seed(0)
        model = build_model(shape).train()
        apply_recompute(model, recompute)
        torch.manual_seed(1)
        model(ids, torch.zeros_like(ids), torch.ones_like(ids)).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("size", ["xlarge", "3.9b"])
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_large_sizes_split_evenly_at_tp(size, tp):
    """Every tensor-parallel split of xlarge and 3.9B divides at tp = 2, 4, 8; the local shard
    shapes multiply back to the whole (checked on the meta device: no memory)."""
    from pretrain.parallel.parallelize import check_tp_shapes, padded_vocab_size

    shape = resolve_model_shape(load_config(None, [f"model.size={size}"]), vocab_size=30522)
    check_tp_shapes(shape, tp)
    model = build_model(shape, device="meta")
    qkv = model.layers[0].attention.qkv.weight
    assert qkv.shape[0] % tp == 0 and (qkv.shape[0] // tp) % (3 * shape.hidden // shape.heads) == 0
    assert model.layers[0].mlp.fc_in.weight.shape[0] % tp == 0
    assert padded_vocab_size(30522, tp) % (128 * tp) == 0


def test_indivisible_heads_are_refused():
    from pretrain.parallel.parallelize import check_tp_shapes

    shape = resolve_model_shape(load_config(None, ["model.size=base"]), vocab_size=30522)
    with pytest.raises(ValueError, match="model.heads=12 is not divisible by parallel.tp=8"):
        check_tp_shapes(shape, 8)


def test_split_model_moves_whole_with_its_vocabulary_mask():
    """The trainer splits the model on the host and then moves it to the GPU; everything the
    forward pass reads must follow, the vocabulary-padding mask included (and stay out of the
    checkpoint). Moving to float64 stands in for the device move here."""
    from pretrain.distributed import ParallelDims
    from pretrain.parallel.parallelize import apply_tensor_parallel

    shape = resolve_model_shape(load_config(None, ["model.hidden=32", "model.heads=2"]), 131)
    model = build_model(shape)
    dims = ParallelDims(
        world_size=2,
        rank=1,
        tp_size=2,
        dp_size=1,
        tp_rank=1,
        dp_rank=0,
        dp_group=None,
        tp_group=None,
        device=torch.device("cpu"),
    )
    apply_tensor_parallel(model, dims)  # builds the shards only; no collective runs here
    mask = model.mlm_head.vocab_mask
    assert mask is not None and mask.shape == (128,)  # 131 padded to 256, half of it
    assert torch.isinf(mask[3:]).all() and not mask[:3].any()  # rank 1 holds ids 128-255
    model.to(torch.float64)
    assert model.mlm_head.vocab_mask.dtype == torch.float64
    assert model.mlm_head.logit_bias().dtype == torch.float64
    assert not any("vocab_mask" in name for name in model.state_dict())


def test_split_parameters_carry_their_layout_through_a_move():
    """Oracle: the plan in pretrain/parallel/parallelize.py's docstring. QKV and MLP-in split by
    output rows (dim 0, weight and bias), attention-out and MLP-out by input columns (dim 1,
    weight only), the word embedding and the MLM bias by vocabulary (unpadded size); nothing
    else is split. The tags survive the device/dtype move the trainer makes after splitting."""
    from pretrain.distributed import ParallelDims
    from pretrain.parallel.parallelize import apply_tensor_parallel, shard_layout

    shape = resolve_model_shape(load_config(None, ["model.hidden=32", "model.heads=2"]), 131)
    model = build_model(shape)
    dims = ParallelDims(
        world_size=2,
        rank=0,
        tp_size=2,
        dp_size=1,
        tp_rank=0,
        dp_rank=0,
        dp_group=None,
        tp_group=None,
        device=torch.device("cpu"),
    )
    apply_tensor_parallel(model, dims)
    model.to(torch.float64)
    h, ffn = shape.hidden, shape.ffn_hidden
    want = {"embeddings.word.weight": {"dim": 0, "size": 131}}
    want["mlm_head.bias"] = {"dim": 0, "size": 131}
    for i in range(shape.layers):
        prefix = f"layers.{i}."
        for name, size in (("attention.qkv", 3 * h), ("mlp.fc_in", ffn)):
            want[f"{prefix}{name}.weight"] = {"dim": 0, "size": size}
            want[f"{prefix}{name}.bias"] = {"dim": 0, "size": size}
        want[f"{prefix}attention.out.weight"] = {"dim": 1, "size": h}
        want[f"{prefix}mlp.fc_out.weight"] = {"dim": 1, "size": ffn}
    assert shard_layout(model) == want
    assert shard_layout(build_model(shape)) == {}  # tp = 1: nothing is split


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_layer_fuses_residual_adds_into_layer_norm(norm, monkeypatch):
    """Each residual add in front of a LayerNorm reaches kernels.layer_norm as its `residual`
    (post-LN: both per layer; pre-LN: the one before the MLP norm, whose sum carries on), and the
    layer's output equals the unfused formula computed with F.layer_norm (1e-6)."""
    import torch.nn.functional as F

    import kernels
    from pretrain import model as model_module

    torch.manual_seed(0)
    config = load_config(
        None,
        [
            "model.hidden=48",
            "model.heads=3",
            "model.layers=1",
            f"model.norm={norm}",
            "model.dropout=0.0",
        ],
    )
    layer = build_model(resolve_model_shape(config, vocab_size=131)).layers[0]
    fused = []
    real = kernels.layer_norm

    def recording_layer_norm(x, weight, bias, eps=1e-5, **kwargs):
        fused.append((kwargs.get("residual") is not None, kwargs.get("return_sum", False)))
        return real(x, weight, bias, eps, **kwargs)

    monkeypatch.setattr(model_module.kernels, "layer_norm", recording_layer_norm)
    x = torch.randn(2, 7, 48)
    got = layer(x, None)

    def ln(t, norm_module):
        return F.layer_norm(t, (48,), norm_module.weight, norm_module.bias, norm_module.eps)

    if norm == "post":
        assert fused == [(True, False), (True, False)]
        h = ln(x + layer.attention(x, None), layer.attention_norm)
        want = ln(h + layer.mlp(h), layer.mlp_norm)
    else:
        assert fused == [(False, False), (True, True)]
        h = x + layer.attention(ln(x, layer.attention_norm), None)
        want = h + layer.mlp(ln(h, layer.mlp_norm))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
