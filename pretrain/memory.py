"""Per-rank memory of a training step, in closed form: does a config and layout fit a device?

`estimate_memory(shape, layout)` adds up what one rank holds at its peak, term by term, from the
code of this project (each term says where it comes from). It is arithmetic only (a few
microseconds), so a planner can call it for thousands of layouts. `bert-train --estimate-memory`
prints it; the trainer prints it at start-up and refuses a config that does not fit.

Peak = parameters + optimizer state
       + max(forward/backward: weight copies + live gradients + activations + head grads
               + the largest of (the head's chunk buffers: one fp32 logits chunk, under
               autocast also half GEMM copies; the head grads' scaled copies at the start
               of backward; one recomputed region),
             optimizer step: gradients + the step's temporaries)
       + allowance (CUDA context, caching allocator, NCCL buffers; 0 on the CPU)

Activations per layer and token (B·S tokens, e = bytes of an activation: 4 in fp32, 2 under
autocast; H_tp = H / tp, F_tp = F / tp, h_tp = heads / tp), read off a traced layer
(tests/unit/test_memory.py checks them against the tensors autograd really saves):

  fp32 residual stream: the two LayerNorm inputs 2·4H (+ their mean/rstd, 16 bytes)
  inputs of QKV and fc_in (autocast: their half copies)                 2·e·H
  the two residual dropout masks (CUDA: bool; CPU: the input's dtype)   2·m·H
  attention-out input (the re-laid-out context)                         e·H_tp
  fc_in output and GELU output                                          2·e·F_tp
  attention core, recompute none:
    CPU (math SDPA, fp32): q, k, v copies and three [h, S, S] maps      4·(3·H_tp + 3·h_tp·S)
    CUDA (flash / memory-efficient SDPA): q, k, v, output, logsumexp    4·e·H_tp + 4·h_tp
  attention core, recompute selective: q, k, v only (the core reruns)   3·e·H_tp
  recompute full: each layer keeps its fp32 input (4H) and one layer's activations at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.distributed as dist

from kernels.cross_entropy import _CHUNK_ELEMENTS
from pretrain.config import (
    Config,
    ConfigError,
    ModelShape,
    check_batch_layout,
    resolve_model_shape,
)
from pretrain.objectives import SCORED_ROW_MULTIPLE
from pretrain.parallel.parallelize import padded_vocab_size

GiB = 1024**3
# Allowance on a GPU, stated rather than measured (nothing here has a GPU):
# - CUDA context and the kernels the process loads (cuBLAS, cuDNN, NCCL, Triton modules): an
#   assumed 0.75 GiB; it is outside what PyTorch's allocator reports, so size it on a real GPU
#   as nvidia-smi's figure minus torch.cuda.memory_reserved().
CUDA_CONTEXT_BYTES = 3 * GiB // 4
# - NCCL: NCCL_BUFFSIZE defaults to 4 MiB per channel and peer (NCCL environment-variable docs);
#   up to 32 channels x 2 directions for a ring: 256 MiB for each communicator (tp and dp).
NCCL_BYTES_PER_GROUP = 256 * 1024**2
# - PyTorch's caching allocator rounds blocks and keeps freed ones split (CUDA semantics,
#   "memory management"): a 10% margin on what changes during a step (activations, gradients).
ALLOCATOR_FRACTION = 0.10


@dataclass(frozen=True)
class Layout:
    """How a model is trained: the inputs of the estimate besides the model's shape."""

    seq_len: int
    micro_batch: int
    tp: int = 1
    dp: int = 1
    zero: bool = False
    """ZeRO-1: the optimizer's two moments sharded over dp ranks by whole tensors."""
    recompute: Literal["none", "selective", "full"] = "none"
    precision: str = "bf16"
    """fp32, or bf16/fp16/auto (autocast: half activations and half weight copies)."""
    mlm_mode: Literal["dense", "sparse"] = "dense"
    mask_rate: float = 0.15
    accumulation: int = 1
    """Micro-batches per step; > 1 keeps gradients alive across forward passes."""
    device: Literal["cuda", "cpu"] = "cuda"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds, by kind; `total` is the estimated peak."""

    parameters: int
    gradients: int
    ddp_buckets: int
    optimizer: int
    optimizer_unsharded: int
    weight_copies: int
    activations: int
    recompute: int
    head_grads: int
    head_chunk: int
    step_temporaries: int
    allowance: int
    live_gradients: int
    """Gradient bytes alive during forward/backward (all of them under DDP or accumulation)."""

    @property
    def total(self) -> int:
        # The dynamic peak is the largest of three moments: the head's forward (its grads and
        # its chunk buffers), the start of backward (the head's grads and their scaled copies),
        # and a recomputed region in backward (the decoder's .grad exists by then).
        head = self.head_grads + max(self.head_chunk, self.head_grads, self.recompute)
        forward_backward = self.weight_copies + self.live_gradients + self.activations + head
        optimizer_step = self.gradients + self.ddp_buckets + self.step_temporaries
        return (
            self.parameters
            + self.optimizer
            + max(forward_backward, optimizer_step)
            + self.allowance
        )

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


# What each term is, for the printed table.
SOURCES = {
    "parameters": "fp32 weights of this rank's shard (model.py, parallelize.py)",
    "gradients": "fp32 .grad of every trained parameter (views into DDP's buckets when dp > 1)",
    "ddp_buckets": "0: DDP is built with gradient_as_bucket_view=True (trainer.py)",
    "optimizer": "LAMB/AdamW exp_avg + exp_avg_sq, fp32 (ZeRO-1: this rank's whole tensors)",
    "optimizer_unsharded": "the same without ZeRO-1 (for comparison, not in the total)",
    "weight_copies": "half copies of Linear weights cached by autocast for the forward",
    "activations": "tensors autograd keeps for backward, all layers + embeddings + MLM transform",
    "recompute": "one recomputed layer (full) or attention core (selective) during backward",
    "head_grads": "MLM head grads computed in forward, kept to backward (kernels/cross_entropy.py)",
    "head_chunk": "MLM head's forward: a [chunk, V_tp] fp32 logits buffer (+ half GEMM copies)",
    "step_temporaries": "optimizer step: LAMB's update and denominator (+ ZeRO's flat buffer)",
    "allowance": "CUDA context, NCCL buffers per group, caching-allocator margin (GPU only)",
    "live_gradients": "gradients alive during forward (DDP buckets or accumulation)",
}


def padded_vocab(vocab_size: int, tp: int) -> int:
    """Vocabulary rows of the whole decoder: unpadded at tp 1 (nothing is split), else padded
    as parallelize.py pads it."""
    return vocab_size if tp == 1 else padded_vocab_size(vocab_size, tp)


def parameter_counts(shape: ModelShape, tp: int) -> tuple[int, int, int, int]:
    """(all, trained, largest trained tensor, Linear weights) elements on one tp rank."""
    h, f, v = shape.hidden, shape.ffn_hidden, padded_vocab(shape.vocab_size, tp) // tp
    layer_linear = (3 * h * h + h * h + h * f + f * h) // tp
    layer = layer_linear + (3 * h + f) // tp + 2 * h + 4 * h  # split biases, out biases, norms
    embeddings = v * h + shape.max_seq_len * h + 2 * h + (2 * h if shape.norm == "post" else 0)
    final = 2 * h if shape.norm == "pre" else 0
    head = (h * h + h) + 2 * h + v  # transform dense + norm, decoder bias (decoder = word emb.)
    pooler = h * h + h
    pair = 2 * h + 2 if shape.pair_head else 0
    trained = embeddings + shape.layers * layer + final + head + pair
    trained += pooler if shape.pair_head else 0  # frozen (no grad, no state) without a pair task
    total = embeddings + shape.layers * layer + final + head + pooler + pair
    largest = max(v * h, shape.max_seq_len * h, 3 * h * h // tp, h * f // tp)
    linear_weights = shape.layers * layer_linear + h * h + (h * h if shape.pair_head else 0)
    return total, trained, largest, linear_weights


def layer_activation_bytes(shape: ModelShape, layout: Layout) -> int:
    """Bytes one transformer layer keeps for backward without recomputation (see module doc)."""
    tokens = layout.micro_batch * layout.seq_len
    h, tp, s = shape.hidden, layout.tp, layout.seq_len
    e = 4 if layout.precision == "fp32" else 2
    mask = 1 if layout.device == "cuda" else e
    per_token = 2 * 4 * h + 16 + 2 * e * h + 2 * mask * h + e * h // tp
    per_token += 2 * e * shape.ffn_hidden // tp
    heads = shape.heads // tp
    if layout.recompute == "selective":
        per_token += 3 * e * h // tp
    elif layout.device == "cpu":
        per_token += 4 * (3 * h // tp + 3 * heads * s)
    else:
        per_token += 4 * e * h // tp + 4 * heads
    return tokens * per_token


def saved_activation_bytes(shape: ModelShape, layout: Layout) -> int:
    """What autograd keeps at the end of forward: all layers, the embeddings, the final norm and
    the MLM transform (the head's own grads are `head_grad_bytes`)."""
    tokens = layout.micro_batch * layout.seq_len
    h = shape.hidden
    e = 4 if layout.precision == "fp32" else 2
    mask = 1 if layout.device == "cuda" else 4  # the embedding sum is fp32
    if layout.recompute == "full":
        layers = shape.layers * tokens * 4 * h  # each layer's fp32 input
    else:
        layers = shape.layers * layer_activation_bytes(shape, layout)
    # Embeddings: the ids (int64) and the dropout mask; post-LN also its LayerNorm input.
    embeddings = tokens * (16 + mask * h + (4 * h + 8 if shape.norm == "post" else 0))
    final = tokens * (4 * h + 8) if shape.norm == "pre" else 0
    # MLM transform on the N scored rows: dense input, GELU input, LayerNorm input (CUDA
    # autocast runs layer_norm in fp32, so its saved input is an fp32 copy; CPU autocast does not).
    norm_input = 4 if layout.device == "cuda" else e
    transform = scored_rows(layout) * (2 * e * h + norm_input * h + 8)
    return layers + embeddings + final + transform


def recompute_bytes(shape: ModelShape, layout: Layout) -> int:
    """Extra activations while backward reruns a region: one whole layer (full) or one
    attention core (selective)."""
    if layout.recompute == "none":
        return 0
    whole = layer_activation_bytes(shape, replace(layout, recompute="none"))
    if layout.recompute == "full":
        return whole
    return (
        whole
        - layer_activation_bytes(shape, layout)
        + layout.micro_batch
        * layout.seq_len
        * (3 * (4 if layout.precision == "fp32" else 2) * shape.hidden // layout.tp)
    )


def scored_rows(layout: Layout) -> int:
    """Rows the MLM head runs on: every position (dense; an upper bound, since [CLS], [SEP] and
    padding are not scored) or the picked ones (sparse), rounded up to the head's row multiple
    (pretrain/objectives.py)."""
    tokens = layout.micro_batch * layout.seq_len
    if layout.mlm_mode == "dense":
        rows = tokens
    else:
        rows = int(tokens * layout.mask_rate) + layout.micro_batch
    return -(-rows // SCORED_ROW_MULTIPLE) * SCORED_ROW_MULTIPLE


def head_grad_bytes(shape: ModelShape, layout: Layout) -> int:
    """kernels/cross_entropy.py computes grad_hidden [N, H], grad_weight [V_tp, H] and
    grad_bias [V_tp] in fp32 during forward and keeps them until backward."""
    vocab = padded_vocab(shape.vocab_size, layout.tp) // layout.tp
    return 4 * (scored_rows(layout) * shape.hidden + vocab * shape.hidden + vocab)


def head_chunk_bytes(shape: ModelShape, layout: Layout) -> int:
    """The MLM head's working buffers while its forward runs (kernels/cross_entropy.py,
    `_chunked_pass`), besides its grads: one [c, V_tp] fp32 logits chunk. Under autocast the
    GEMMs run in half precision, which adds the half copy of the decoder weight [V_tp, H] for
    the whole pass and, at the chunk's peak, either its half [c, V_tp] GEMM output beside the
    fp32 chunk (6 bytes per element in all) or the half gradient [c, V_tp] beside the chunk's
    half grad_weight product [V_tp, H]."""
    vocab = padded_vocab(shape.vocab_size, layout.tp) // layout.tp
    chunk = min(scored_rows(layout), max(1, _CHUNK_ELEMENTS // vocab)) * vocab
    if layout.precision == "fp32":
        return 4 * chunk
    weight = vocab * shape.hidden
    return 2 * weight + max(6 * chunk, 2 * chunk + 2 * weight)


def estimate_memory(shape: ModelShape, layout: Layout) -> MemoryEstimate:
    """Peak bytes on one rank for `shape` trained with `layout` (closed form, no tensors)."""
    if shape.heads % layout.tp or shape.ffn_hidden % layout.tp:
        raise ValueError(f"tp={layout.tp} does not divide the heads and the MLP width")
    total, trained, largest, linear_weights = parameter_counts(shape, layout.tp)
    half = layout.precision != "fp32"
    optimizer_unsharded = 2 * 4 * trained
    if layout.zero and layout.dp > 1:
        # Whole tensors in contiguous runs, balanced by bisection (parallel/zero.py): at least
        # the largest tensor; otherwise an even share plus at most one more layer tensor.
        layer_tensor = max(3 * shape.hidden * shape.hidden, shape.hidden * shape.ffn_hidden)
        even = -(-trained // layout.dp) + layer_tensor // layout.tp
        owned = min(trained, max(largest, even))
    else:
        owned = trained
    gradients = 4 * trained
    persistent = layout.dp > 1 or layout.accumulation > 1
    head_grads = head_grad_bytes(shape, layout)
    head_chunk = head_chunk_bytes(shape, layout)
    activations = saved_activation_bytes(shape, layout)
    rerun = recompute_bytes(shape, layout)
    weight_copies = 2 * linear_weights if half else 0
    # Without DDP or accumulation .grad is freed after every step.
    live = gradients if persistent else 0
    temporaries = 2 * 4 * owned + (4 * owned if layout.zero and layout.dp > 1 else 0)
    allowance = 0
    if layout.device == "cuda":
        groups = int(layout.tp > 1) + int(layout.dp > 1)
        dynamic = activations + rerun + 2 * head_grads + gradients
        allowance = (
            CUDA_CONTEXT_BYTES + groups * NCCL_BYTES_PER_GROUP + int(ALLOCATOR_FRACTION * dynamic)
        )
    return MemoryEstimate(
        parameters=4 * total,
        gradients=gradients,
        ddp_buckets=0,
        optimizer=2 * 4 * owned,
        optimizer_unsharded=optimizer_unsharded,
        weight_copies=weight_copies,
        activations=activations,
        recompute=rerun,
        head_grads=head_grads,
        head_chunk=head_chunk,
        step_temporaries=temporaries,
        allowance=allowance,
        live_gradients=live,
    )


def layout_for(config: Config, dp: int, device_type: str, accumulation: int = 1) -> Layout:
    """The Layout of a resolved config on `dp` data-parallel ranks of `device_type`."""
    return Layout(
        seq_len=config.data.seq_len,
        micro_batch=config.train.micro_batch,
        tp=config.parallel.tp,
        dp=dp,
        zero=bool(config.parallel.zero),
        recompute=config.train.recompute,
        precision=config.train.precision,
        mlm_mode=config.mlm.mode,
        mask_rate=config.mlm.mask_rate,
        accumulation=accumulation,
        device="cuda" if device_type == "cuda" else "cpu",
    )


def format_estimate(estimate: MemoryEstimate, limit: int | None = None) -> str:
    """The estimate as a table: one line per term with its source, then the total."""
    rows = [
        f"  {name:<20} {value / GiB:8.2f} GiB  {SOURCES[name]}"
        for name, value in estimate.as_dict().items()
        if name in SOURCES
    ]
    total = f"  {'total (peak)':<20} {estimate.total / GiB:8.2f} GiB"
    if limit:
        total += f"  of {limit / GiB:.1f} GiB ({estimate.total / limit:.0%})"
    return "\n".join(["estimated memory per rank:", *rows, total])


def device_memory_bytes(device: torch.device) -> int:
    """Memory of the device: the GPU's total, or the host's physical memory on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def layout_keys(layout: Layout) -> str:
    return (
        f"train.micro_batch={layout.micro_batch}, train.recompute={layout.recompute}, "
        f"parallel.tp={layout.tp}, parallel.zero={int(layout.zero)}"
    )


def check_fits(estimate: MemoryEstimate, layout: Layout, limit: int) -> None:
    """ConfigError (one line) when the estimated peak exceeds the device's memory."""
    if estimate.total <= limit:
        return
    raise ConfigError(
        f"estimated peak memory {estimate.total / GiB:.1f} GiB per rank exceeds the device's "
        f"{limit / GiB:.1f} GiB at {layout_keys(layout)}: lower train.micro_batch, set "
        "train.recompute=selective or full, parallel.zero=1 or a larger parallel.tp "
        "(bert-train --estimate-memory shows the terms); train.skip_memory_check=true overrides"
    )


def oom_message(estimate: MemoryEstimate, layout: Layout) -> str:
    """The one line a CUDA out-of-memory error becomes."""
    return (
        f"the device ran out of memory with {layout_keys(layout)} (estimated peak "
        f"{estimate.total / GiB:.1f} GiB per rank): lower train.micro_batch, set "
        "train.recompute=selective or full, parallel.zero=1 or a larger parallel.tp"
    )


class MemoryPlan:
    """The run's layout and estimate, kept so that an out-of-memory error can quote them."""

    def __init__(self) -> None:
        self.layout: Layout | None = None
        self.estimate: MemoryEstimate | None = None

    def estimate_for(self, shape: ModelShape, layout: Layout) -> MemoryEstimate:
        self.layout, self.estimate = layout, estimate_memory(shape, layout)
        return self.estimate

    def describe(self, device: torch.device) -> str:
        assert self.estimate is not None
        return format_estimate(self.estimate, device_memory_bytes(device))

    def check(self, device: torch.device) -> None:
        assert self.estimate is not None and self.layout is not None
        check_fits(self.estimate, self.layout, device_memory_bytes(device))

    def oom_message(self) -> str:
        if self.estimate is None or self.layout is None:
            return "out of memory while building the model or reading the data"
        return oom_message(self.estimate, self.layout)


def _rss_bytes() -> tuple[int, int]:
    """(resident, high-water resident) bytes of this process, from /proc (Linux)."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def memory_record(device: torch.device) -> dict[str, float]:
    """This interval's memory for the log, in GB (10^9 bytes), reduced over all ranks.

    GPU: allocated now and the allocator's peak since the last call (rank 0), and that peak's
    maximum over ranks. CPU: the process's resident memory and its high-water mark since start.
    """
    if device.type == "cuda":
        current = torch.cuda.memory_allocated(device)
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        current, peak = _rss_bytes()
    highest = torch.tensor([float(peak)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(highest, op=dist.ReduceOp.MAX)  # a small collective per log interval
    return {
        "mem_gb": current / 1e9,
        "mem_peak_gb": peak / 1e9,
        "mem_peak_max_gb": float(highest.item()) / 1e9,
    }


DEFAULT_VOCAB = 32768  # for a config that leaves model.vocab_size to the tokenizer


def print_estimate(config: Config, world_size: int, gpu_memory_gib: float | None) -> int:
    """`bert-train --estimate-memory`: print the GPU estimate; 1 if it exceeds `gpu_memory_gib`."""
    tp = config.parallel.tp
    if world_size < 1 or world_size % tp:
        raise ConfigError(f"--world-size {world_size} is not a multiple of parallel.tp={tp}")
    dp = world_size // tp
    accumulation = check_batch_layout(config, dp)
    shape = resolve_model_shape(config, config.model.vocab_size or DEFAULT_VOCAB)
    layout = layout_for(config, dp, "cuda", accumulation)
    try:
        estimate = estimate_memory(shape, layout)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    limit = int(gpu_memory_gib * GiB) if gpu_memory_gib else None
    print(
        f"{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab_size}; seq "
        f"{layout.seq_len}, dp {dp} x tp {tp}, {layout_keys(layout)}, {layout.precision}, "
        f"mlm {layout.mlm_mode}, {accumulation} micro-batch(es) per step"
    )
    print(format_estimate(estimate, limit))
    if limit is None:
        return 0
    if estimate.total > limit:
        print(f"does not fit in {gpu_memory_gib:g} GiB")
        return 1
    print(f"fits in {gpu_memory_gib:g} GiB with {1 - estimate.total / limit:.0%} headroom")
    return 0


HEADROOM = 0.10  # a fitted layout leaves at least this fraction of the GPU free
RECOMPUTE_COST = {"none": 0, "selective": 1, "full": 2}


@dataclass(frozen=True)
class FittedLayout:
    """The layout chosen for a model on a cluster, at the smallest node count where it fits."""

    nodes: int
    layout: Layout
    estimate: MemoryEstimate

    def overrides(self) -> dict[str, object]:
        """The config keys that select this layout."""
        return {
            "parallel.tp": self.layout.tp,
            "parallel.zero": int(self.layout.zero),
            "train.recompute": self.layout.recompute,
            "train.micro_batch": self.layout.micro_batch,
        }


def candidate_layouts(
    shape: ModelShape,
    base: Layout,
    world_size: int,
    gpus_per_node: int,
    global_batch: int,
    micro_batches: tuple[int, ...] = (64, 32, 16, 8, 4, 2, 1),
) -> list[Layout]:
    """Every layout on `world_size` ranks: tp dividing heads, MLP width and the node's GPUs (so a
    tp group stays inside a node), ZeRO-1 on/off, each recompute mode, and each of
    `micro_batches` whose product with dp divides the global batch. The one search space of
    `bert-train --estimate-memory`, `bert-launch`'s fit check and `bert-plan`."""
    layouts = []
    for tp in range(1, gpus_per_node + 1):
        if shape.heads % tp or shape.ffn_hidden % tp or world_size % tp or gpus_per_node % tp:
            continue
        dp = world_size // tp
        for micro_batch in micro_batches:
            if global_batch % (micro_batch * dp):
                continue
            accumulation = global_batch // (micro_batch * dp)
            for zero in (False, True) if dp > 1 else (False,):
                for recompute in RECOMPUTE_COST:
                    layouts.append(
                        replace(
                            base,
                            tp=tp,
                            dp=dp,
                            zero=zero,
                            recompute=recompute,
                            micro_batch=micro_batch,
                            accumulation=accumulation,
                        )
                    )
    return layouts


def preference(layout: Layout) -> tuple:
    """Cheapest first: least tensor parallelism, a micro-batch of at least 8 (efficient GEMMs),
    least recomputation, no ZeRO, then the largest micro-batch."""
    return (
        layout.tp,
        layout.micro_batch < 8,
        RECOMPUTE_COST[layout.recompute],
        layout.zero,
        -layout.micro_batch,
    )


def fit_layout(
    shape: ModelShape,
    base: Layout,
    gpus_per_node: int,
    memory_bytes: int,
    global_batch: int,
    max_nodes: int = 4096,
) -> FittedLayout | None:
    """The smallest node count at which some layout leaves HEADROOM of the GPU free, and the
    preferred such layout there; None if none fits up to `max_nodes`."""
    budget = (1 - HEADROOM) * memory_bytes
    for nodes in range(1, max_nodes + 1):
        world = nodes * gpus_per_node
        fitting = []
        for layout in candidate_layouts(shape, base, world, gpus_per_node, global_batch):
            estimate = estimate_memory(shape, layout)
            if estimate.total <= budget:
                fitting.append((preference(layout), layout, estimate))
        if fitting:
            _, layout, estimate = min(fitting, key=lambda item: item[0])
            return FittedLayout(nodes, layout, estimate)
    return None
