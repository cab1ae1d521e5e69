"""The memory estimator (pretrain/memory.py) against the real model code.

Oracles: the tensors autograd really keeps for backward (counted by storage through
`saved_tensors_hooks` while the real model and loss run forward on CPU), the parameter shapes of
real tensor-parallel shards, and ZeRO-1's own owner assignment.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml

import kernels
from bench.memory_estimate import TensorPeak
from pretrain.config import MLMConfig, ModelShape, load_config, resolve_model_shape
from pretrain.distributed import ParallelDims
from pretrain.memory import (
    HEADROOM,
    Layout,
    estimate_memory,
    fit_layout,
    head_chunk_bytes,
    head_grad_bytes,
    layout_for,
    parameter_counts,
    saved_activation_bytes,
)
from pretrain.model import apply_recompute, build_model
from pretrain.objectives import pretraining_loss
from pretrain.parallel.parallelize import apply_tensor_parallel
from pretrain.parallel.zero import assign_owners

REPO = Path(__file__).resolve().parents[2]
# Every shipped config of BERT-large or larger, found by its model size (a new one must get
# fitted layouts in every GPU cluster file, or the fit test below fails).
LARGE_CONFIGS = sorted(
    path.stem
    for path in (REPO / "configs").glob("*.yaml")
    if yaml.safe_load(path.read_text(encoding="utf-8"))["model"].get("size")
    in ("large", "xlarge", "3.9b")
)
# Every cluster file whose hardware section names a GPU (a generic site-style file such as
# gridengine.yaml cannot know its GPUs, and the CPU machine's cpu.yaml is for bert-plan).
CLUSTERS = [
    path
    for path in sorted((REPO / "configs" / "cluster").glob("*.yaml"))
    if yaml.safe_load(path.read_text(encoding="utf-8")).get("hardware", {}).get("gpu", "cpu")
    != "cpu"
]


def test_the_hardware_cluster_files_are_the_shipped_gpu_kinds():
    assert {p.stem for p in CLUSTERS} == {"abci2", "abci2-a", "abci3", "h100"}
    assert LARGE_CONFIGS == ["3.9b", "kasagi-dense", "large", "xlarge"]


def _shape(norm: str = "post", vocab: int = 131, pair: bool = False) -> ModelShape:
    # Odd sizes on purpose: 6 heads of width 16, an MLP width that is not 4 x hidden.
    return ModelShape(
        layers=3,
        hidden=96,
        heads=6,
        ffn_hidden=204,
        vocab_size=vocab,
        max_seq_len=64,
        norm=norm,
        dropout=0.1,
        pair_head=pair,
    )


def _saved_by_autograd(shape: ModelShape, layout: Layout) -> tuple[int, int]:
    """(bytes autograd keeps after the real forward + MLM loss, of which half weight copies)."""
    torch.manual_seed(0)
    model = build_model(shape)
    model.train()
    apply_recompute(model, layout.recompute)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, bool]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            widths = {shape.hidden, shape.ffn_hidden, 3 * shape.hidden}
            is_weight_copy = (
                tensor.dtype != torch.float32 and tensor.dim() == 2 and set(tensor.shape) <= widths
            )
            saved[storage.data_ptr()] = (storage.nbytes(), is_weight_copy)
        return tensor

    batch_size, seq_len = layout.micro_batch, layout.seq_len
    ids = torch.randint(5, shape.vocab_size, (batch_size, seq_len))
    picked = torch.rand(batch_size, seq_len) < layout.mask_rate
    labels = ids.clone()
    if layout.mlm_mode == "sparse":
        labels[~picked] = -100
    batch = {
        "input_ids": ids,
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "picked": picked,
    }
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=layout.precision != "fp32")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        pretraining_loss(model, batch, MLMConfig(mode=layout.mlm_mode))
    total = sum(n for n, _ in saved.values())
    copies = sum(n for n, is_copy in saved.values() if is_copy)
    return total, copies


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("mlm_mode", ["dense", "sparse"])
def test_saved_activations_match_autograd_fp32(norm: str, recompute: str, mlm_mode: str):
    """fp32 on the CPU: the closed form equals what autograd keeps to within 0.5% (the rest is
    a few scalars and the picked-row indices). Dense scores every position here, as assumed."""
    shape = _shape(norm)
    layout = Layout(
        seq_len=48,
        micro_batch=5,
        recompute=recompute,
        precision="fp32",
        mlm_mode=mlm_mode,
        device="cpu",
    )
    real, _ = _saved_by_autograd(shape, layout)
    estimate = saved_activation_bytes(shape, layout) + head_grad_bytes(shape, layout)
    if mlm_mode == "sparse":  # the number of picked rows is random: compare the dense part
        assert abs(estimate - real) / real < 0.05
    else:
        assert abs(estimate - real) / real < 0.005


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_saved_activations_bf16_autocast(recompute: str):
    """Under CPU bf16 autocast: activations within 8% and the half weight copies autocast
    caches (saved by each Linear) equal to `weight_copies` except under full recompute, where
    only the MLM transform's copy is saved (the layers' are recast in backward)."""
    shape = _shape("pre")
    layout = Layout(seq_len=48, micro_batch=5, recompute=recompute, precision="bf16", device="cpu")
    real, copies = _saved_by_autograd(shape, layout)
    estimate = estimate_memory(shape, layout)
    activations = saved_activation_bytes(shape, layout) + head_grad_bytes(shape, layout)
    assert abs(activations - (real - copies)) / (real - copies) < 0.08
    if recompute != "full":
        assert copies == estimate.weight_copies


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    ("rows", "vocab", "hidden"),
    [(4096, 8192, 256), (256, 8192, 1024)],  # two full chunks; one short chunk, wide weight
)
def test_head_forward_peak_matches_real_head(precision: str, rows: int, vocab: int, hidden: int):
    """The MLM head's forward (kernels.linear_cross_entropy, dense: every row scored) holds its
    grads and its chunk buffers at its peak: `head_grad_bytes + head_chunk_bytes` against the
    peak of live tensor storage while the real head runs forward on the CPU (fp32, and bf16
    autocast, whose half GEMMs add a half decoder copy and half [c, V] / [V, H] products).
    Within 5% (the estimate leaves out [c]-sized row statistics and [c, H] input and gradient
    chunks: 1-3% here)."""
    shape = ModelShape(1, hidden, 1, hidden, vocab, 64, "post", 0.0, False)
    layout = Layout(seq_len=rows, micro_batch=1, precision=precision, device="cpu")
    tracker = TensorPeak()
    with tracker:
        torch.manual_seed(0)
        # fp32 input, as the MLM transform's LayerNorm gives it under CUDA autocast
        states = torch.randn(rows, hidden, requires_grad=True)
        weight = torch.randn(vocab, hidden, requires_grad=True)
        bias = torch.zeros(vocab, requires_grad=True)
        target = torch.randint(0, vocab, (rows,))
        before = tracker.live
        tracker.peak = before
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = kernels.linear_cross_entropy(states, weight, target, bias=bias)
        peak = tracker.peak - before
    assert torch.isfinite(loss)
    estimate = head_grad_bytes(shape, layout) + head_chunk_bytes(shape, layout)
    assert abs(estimate - peak) / peak < 0.05


@pytest.mark.parametrize("tp", [1, 2, 3])
@pytest.mark.parametrize("pair", [False, True])
def test_parameter_counts_match_real_shards(tp: int, pair: bool):
    """Elements on tp rank 0 of the real sliced model (parallelize.py), trained ones (requires
    grad: the pooler is frozen without a pair task), and the largest trained tensor."""
    shape = _shape(vocab=131, pair=pair)
    model = build_model(shape)
    dims = ParallelDims(tp, 0, tp, 1, 0, 0, None, None, torch.device("cpu"))
    apply_tensor_parallel(model, dims)
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    total, n_trained, largest, _ = parameter_counts(shape, tp)
    assert total == sum(p.numel() for p in params)
    assert n_trained == sum(p.numel() for p in trained)
    assert largest == max(p.numel() for p in trained)


@pytest.mark.parametrize("size", LARGE_CONFIGS)
@pytest.mark.parametrize("dp", [2, 4, 16, 64])
def test_zero_share_matches_owner_assignment(size: str, dp: int):
    """ZeRO-1's optimizer share: the estimate against assign_owners' largest load, over the real
    parameter list (meta tensors): never below it (the fit must be safe), at most 20% above."""
    config = load_config(REPO / "configs" / f"{size}.yaml")
    shape = resolve_model_shape(config, 32768)
    with torch.device("meta"):
        model = build_model(shape, "meta")
    trained = [p for p in model.parameters() if p.requires_grad]
    owners = assign_owners(trained, dp)
    load = [0] * dp
    for p, owner in zip(trained, owners, strict=True):
        load[owner] += p.numel()
    layout = Layout(seq_len=128, micro_batch=8, dp=dp, zero=True)
    estimated = estimate_memory(shape, layout).optimizer / 8
    assert max(load) <= estimated <= 1.20 * max(load)


def test_estimate_is_fast():
    """The planner calls it thousands of times: well under a millisecond per layout (measured
    about 10 us here; the bound leaves 3x for a loaded machine)."""
    shape = resolve_model_shape(load_config(REPO / "configs" / "3.9b.yaml"), 32768)
    layout = Layout(seq_len=512, micro_batch=8, tp=4, dp=192, zero=True, recompute="full")
    start = time.perf_counter()
    for _ in range(1000):
        estimate_memory(shape, layout)
    assert (time.perf_counter() - start) / 1000 < 3e-4


def test_terms_move_the_right_way():
    """ZeRO-1 shrinks only the optimizer share; recompute shrinks activations; tp shrinks
    parameters about 1/tp; the CPU mode has no allowance."""
    shape = resolve_model_shape(load_config(REPO / "configs" / "xlarge.yaml"), 32768)
    base = Layout(seq_len=512, micro_batch=8, dp=8)
    plain = estimate_memory(shape, base)
    zero = estimate_memory(shape, Layout(seq_len=512, micro_batch=8, dp=8, zero=True))
    assert zero.optimizer < plain.optimizer / 7 and zero.parameters == plain.parameters
    assert zero.optimizer_unsharded == plain.optimizer
    acts = [
        estimate_memory(shape, Layout(seq_len=512, micro_batch=8, recompute=r)).activations
        for r in ("none", "selective", "full")
    ]
    assert acts[0] > acts[1] > acts[2]
    tp4 = estimate_memory(shape, Layout(seq_len=512, micro_batch=8, dp=8, tp=4))
    assert 0.25 < tp4.parameters / plain.parameters < 0.3
    cpu = estimate_memory(shape, Layout(seq_len=512, micro_batch=8, device="cpu"))
    assert cpu.allowance == 0 and plain.allowance > 0


@pytest.mark.parametrize("cluster", CLUSTERS, ids=lambda p: p.stem)
@pytest.mark.parametrize("size", LARGE_CONFIGS)
@pytest.mark.parametrize("seq_len", [128, 512])
def test_shipped_configs_fit_every_cluster(cluster: Path, size: str, seq_len: int):
    """Every shipped large config, with the layout its cluster file names, leaves >= 10% of the
    GPU free at the file's node count (through the estimator), no layout fits on fewer nodes,
    and the entry is the one `python -m bench.memory_estimate layouts` computes today (layout
    and estimate), so a change to a config or to the estimator cannot leave a stale file."""
    data = yaml.safe_load(cluster.read_text(encoding="utf-8"))
    hardware, entry = data["hardware"], data["layouts"][size][f"seq{seq_len}"]
    overrides = [f"{k}={entry[k]}" for k in entry if k not in ("min_nodes", "estimate_gib")]
    config = load_config(REPO / "configs" / f"{size}.yaml", [f"data.seq_len={seq_len}", *overrides])
    shape = resolve_model_shape(config, 32768)
    world = entry["min_nodes"] * hardware["gpus_per_node"]
    dp = world // config.parallel.tp
    accumulation = config.train.global_batch // (config.train.micro_batch * dp)
    assert accumulation * config.train.micro_batch * dp == config.train.global_batch
    estimate = estimate_memory(shape, layout_for(config, dp, "cuda", accumulation))
    memory = hardware["gpu_memory_gib"] * 1024**3
    assert estimate.total <= (1 - HEADROOM) * memory
    fitted = fit_layout(
        shape,
        layout_for(config, 1, "cuda"),
        hardware["gpus_per_node"],
        int(memory),
        config.train.global_batch,
    )
    assert fitted is not None and fitted.nodes == entry["min_nodes"]
    assert fitted.overrides() == {
        k: v for k, v in entry.items() if k.startswith(("parallel.", "train."))
    }
    assert entry["estimate_gib"] == round(fitted.estimate.total / 1024**3, 1)


def test_refusal_and_oom_lines_name_the_layout():
    """The refusal (ConfigError) and the out-of-memory line are one line each, with the layout
    keys to change, the estimate, and (refusal only) the override key."""
    from pretrain.config import ConfigError
    from pretrain.memory import check_fits, oom_message

    shape = resolve_model_shape(load_config(REPO / "configs" / "3.9b.yaml"), 32768)
    layout = Layout(seq_len=512, micro_batch=64, tp=1, recompute="none")
    estimate = estimate_memory(shape, layout)
    with pytest.raises(ConfigError) as refused:
        check_fits(estimate, layout, 16 * 1024**3)
    message = str(refused.value)
    assert "\n" not in message and "train.skip_memory_check=true" in message
    assert f"{estimate.total / 1024**3:.1f} GiB" in message
    line = oom_message(estimate, layout)
    assert "\n" not in line
    for key in ("train.micro_batch=64", "train.recompute=none", "parallel.tp=1", "parallel.zero=0"):
        assert key in line and key in message
    check_fits(estimate, layout, estimate.total)  # exactly enough memory: no error
