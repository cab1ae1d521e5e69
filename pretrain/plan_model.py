"""The step-time model of bert-plan: seconds per optimizer step of one layout on one cluster.

Arithmetic only (no tensors), so the planner can cost every layout of a search. All terms are
per rank and per optimizer step (`accumulation` micro-batches of `micro_batch` sequences):

    compute   = the matrix products of forward, backward (2 x forward) and recomputation's
                extra forward, each max(FLOPs / (peak x efficiency), bytes / memory bandwidth),
                + elementwise work as a memory-bound pass (3 x the activation bytes autograd
                saves: written in forward, read and their gradients written in backward), the
                MLM head's fp32 logit chunks (written, read, their gradient written) and autocast's
                half weight copies (made once per forward); on a CPU at a rate --measure fits,
                plus the CPU's operator dispatch per layer and per micro-batch (fitted too)
    tp comm   = ring all-reduce of the tensor-parallel messages (`comm_stats.analytic_bytes`
                and `analytic_calls`, which train.comm_stats proves equal to the real
                traffic) over NVLink: 2 (p-1)/p x bytes / bandwidth + 2 (p-1) x latency per
                call (on a CPU the latency is a small call's measured cost inside a step)
    dp comm   = ring all-reduce of the fp32 gradients over the dp group. Inside a node it runs at
                the NVLink bandwidth; across nodes every node sends 2 (p-1)/p of all tp groups'
                gradients through its network adapters. DDP overlaps it with the backward of the
                last micro-batch (the others run under no_sync); the last 25 MiB bucket
                (DDP's bucket_cap_mb) never hides; on a CPU nothing hides (the ranks' own
                cores run the backward). Every call (a bucket, ZeRO-1's reduces) pays its
                latency. ZeRO-1 then broadcasts the updated parameters (not overlapped).
    optimizer = a memory-bound pass: the loss scaler's check, the gradient norm and clipping
                read the fp32 gradients; LAMB reads parameter, gradient and two moments and
                writes the update, the moments and the parameter (~10 fp32 accesses per element
                it owns); on a CPU at the elementwise rate --measure fits.

`efficiency` is the fraction of the datasheet peak that large matrix products reach in this
trainer, all other overheads included: one constant per GPU kind, fitted on one published BERT
throughput (pretrain/plan_published.py), or measured on a CPU by `bert-plan --measure`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from pretrain.config import ModelShape
from pretrain.memory import Layout, padded_vocab, parameter_counts, saved_activation_bytes
from pretrain.memory import scored_rows as scored_rows_per_micro_batch
from pretrain.model import flops_per_step
from pretrain.parallel.comm_stats import DDP_BUCKET_BYTES, analytic_bytes, analytic_calls


@dataclass(frozen=True)
class Rates:
    """What one device and its links do per second; the inputs of the time model."""

    peak_flops: float
    """Matrix products in the run's half (or fp32) dtype, FLOP/s (pretrain/devices.py)."""
    efficiency: float
    """Fraction of peak reached by large matrix products, overheads included (fitted)."""
    memory_bytes_per_s: float
    link_bytes_per_s: float
    """NVLink (a CPU node: shared memory) bandwidth per device, one direction."""
    network_bytes_per_s: float
    """The node's network bandwidth, one direction, all adapters."""
    link_latency_s: float = 5e-6
    """Per ring step inside a node: an assumed NCCL-typical 5 us (gloo: measured)."""
    network_latency_s: float = 10e-6
    """Per ring step across nodes: an assumed 10 us for InfiniBand."""
    elementwise_bytes_per_s: float | None = None
    """Rate of the elementwise work; None = the memory bandwidth (GPUs). A CPU computes its
    elementwise kernels (GELU, softmax, LayerNorm, dropout, casts) far below its copy
    bandwidth: --measure fits this rate on real steps."""
    optimizer_bytes_per_s: float | None = None
    """Rate of the optimizer's pass; None = the elementwise rate. A CPU's LAMB streams large
    tensors far faster than a small model's elementwise kernels go: --measure times it."""
    dispatch_s_per_layer: float = 0.0
    dispatch_s_per_micro_batch: float = 0.0
    """A CPU's Python and operator dispatch, per layer and per micro-batch (forward + backward):
    a cost per operator, whatever its size, that --measure fits on real steps of two sizes and
    two depths. GPUs: 0 (kernel launches overlap the device's work at these sizes)."""


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step on one rank, by term; `total` is the step time."""

    compute: float
    tp_comm: float
    dp_comm: float
    """Data-parallel communication not hidden behind the backward pass (+ ZeRO's broadcast)."""
    optimizer: float
    dp_comm_total: float
    """The gradient all-reduce's whole duration, hidden or not (for the table's notes)."""

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.dp_comm + self.optimizer

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


def _gemm_seconds(m: int, k: int, n: int, elem: int, flops_rate: float, rates: Rates) -> float:
    """One [m, k] x [k, n] product: bound by arithmetic or by reading and writing its operands."""
    arithmetic = 2.0 * m * k * n / flops_rate
    traffic = elem * (m * k + k * n + m * n) / rates.memory_bytes_per_s
    return max(arithmetic, traffic)


def _forward_gemms(
    shape: ModelShape, layout: Layout, rates: Rates, half: bool
) -> tuple[float, float, float]:
    """(all layers' linear products, all layers' attention products, the MLM head) forward
    seconds for one micro-batch on one tp rank."""
    tp, b, s = layout.tp, layout.micro_batch, layout.seq_len
    h, f = shape.hidden, shape.ffn_hidden
    tokens = b * s
    elem = 2 if half else 4
    rate = rates.peak_flops * rates.efficiency
    linear = sum(
        _gemm_seconds(m, k, n, elem, rate, rates)
        for m, k, n in (
            (tokens, h, 3 * h // tp),  # QKV, column-parallel
            (tokens, h // tp, h),  # attention out, row-parallel
            (tokens, h, f // tp),  # MLP in, column-parallel
            (tokens, f // tp, h),  # MLP out, row-parallel
        )
    )
    # Attention core: Q K^T and softmax(.) V for each head. A fused (flash) kernel keeps the
    # [S, S] scores on chip, so only its arithmetic counts (the CPU's math path writes them:
    # its elementwise term below counts the maps memory.py says autograd keeps).
    attention = 4.0 * b * (shape.heads // tp) * s * s * (h // shape.heads) / rate
    rows = scored_rows_per_micro_batch(layout)
    vocab = padded_vocab(shape.vocab_size, tp) // tp
    # The head's transform and decoder run in the autocast dtype (kernels/cross_entropy.py).
    head = _gemm_seconds(rows, h, h, elem, rate, rates) + _gemm_seconds(
        rows, h, vocab, elem, rate, rates
    )
    return shape.layers * linear, shape.layers * attention, head


def elementwise_bytes(shape: ModelShape, layout: Layout) -> int:
    """Bytes the elementwise work of one micro-batch moves (see the module doc)."""
    elem = 2 if layout.precision != "fp32" else 4
    # The traffic of forward and backward is that of the whole activations, whatever
    # recomputation keeps of them; recomputation adds its rerun forward on top.
    saved = saved_activation_bytes(shape, replace(layout, recompute="none"))
    moved = 3 * saved
    if layout.recompute == "full":
        moved += saved  # the layers' forward runs again
    elif layout.recompute == "selective":  # the attention core's softmax and dropout again
        heads = layout.micro_batch * shape.heads // layout.tp
        moved += 3 * heads * layout.seq_len**2 * elem
    rows = scored_rows_per_micro_batch(layout)
    vocab = padded_vocab(shape.vocab_size, layout.tp) // layout.tp
    moved += 3 * 4 * rows * vocab  # the head's fp32 logits and their gradient
    if layout.precision != "fp32":  # autocast reads fp32 weights, writes half copies
        moved += 6 * parameter_counts(shape, layout.tp)[3]
    return moved


def gemm_seconds(shape: ModelShape, layout: Layout, rates: Rates) -> float:
    """The matrix products of one micro-batch: forward, backward and recomputation."""
    linear, attention, head = _forward_gemms(shape, layout, rates, layout.precision != "fp32")
    seconds = 3 * (linear + attention + head)  # forward + backward (data and weight gradients)
    if layout.recompute == "full":
        seconds += linear + attention
    elif layout.recompute == "selective":
        seconds += attention
    return seconds


def compute_seconds(shape: ModelShape, layout: Layout, rates: Rates) -> float:
    """Matrix products and memory-bound elementwise work of one step (all micro-batches)."""
    elementwise_rate = rates.elementwise_bytes_per_s or rates.memory_bytes_per_s
    dispatch = shape.layers * rates.dispatch_s_per_layer + rates.dispatch_s_per_micro_batch
    per_micro_batch = (
        gemm_seconds(shape, layout, rates)
        + elementwise_bytes(shape, layout) / elementwise_rate
        + dispatch
    )
    return layout.accumulation * per_micro_batch


def _ring_all_reduce(size: float, members: int, bandwidth: float, latency: float) -> float:
    if members <= 1 or size <= 0:
        return 0.0
    return 2 * (members - 1) / members * size / bandwidth + 2 * (members - 1) * latency


def tp_comm_seconds(shape: ModelShape, layout: Layout, rates: Rates) -> float:
    """Tensor-parallel all-reduces and all-gathers of one step (never overlapped), each call
    paying its latency (`comm_stats.analytic_calls`), plus the skip flag over all ranks."""
    flag = _calls(shape, layout).get("world.all_reduce", 0) * 2 * (layout.tp * layout.dp - 1)
    if layout.tp == 1:
        return flag * rates.link_latency_s
    elem = 4 if layout.precision == "fp32" else 2
    moved = _tp_bytes(shape, layout)
    calls = _calls(shape, layout)
    tp_calls = calls["tp.all_reduce"] + calls["tp.all_gather"]
    extra = 0
    if layout.recompute == "full":  # the rerun forward all-reduces again
        extra = 2 * shape.layers * layout.micro_batch * layout.seq_len * shape.hidden * elem
        tp_calls += layout.accumulation * 2 * shape.layers
    total_reduce = moved["tp.all_reduce"] + layout.accumulation * extra
    p = layout.tp
    reduce = 2 * (p - 1) / p * total_reduce / rates.link_bytes_per_s
    gather = (p - 1) / p * moved.get("tp.all_gather", 0) / rates.link_bytes_per_s
    return reduce + gather + (tp_calls * 2 * (p - 1) + flag) * rates.link_latency_s


def _calls(shape: ModelShape, layout: Layout) -> dict[str, int]:
    return analytic_calls(
        shape.layers,
        micro_batches=layout.accumulation,
        tp=layout.tp,
        dp=layout.dp,
        zero=layout.zero,
        gradient_bytes=4 * parameter_counts(shape, layout.tp)[1],
    )


def _tp_bytes(shape: ModelShape, layout: Layout) -> dict[str, int]:
    rows = scored_rows_per_micro_batch(layout) * layout.accumulation
    return analytic_bytes(
        shape,
        encoded=layout.accumulation * layout.micro_batch * layout.seq_len,
        scored=rows,
        tp=layout.tp,
        dp=layout.dp,
        local_params=parameter_counts(shape, layout.tp)[1],
        optimizer_tensors=_tensor_count(shape),
        zero=layout.zero,
        autocast_bytes=4 if layout.precision == "fp32" else 2,
    )


def _tensor_count(shape: ModelShape) -> int:
    """Parameter tensors LAMB updates: 16 per layer (4 linear weights and biases, 2 norms x 2)
    and about a dozen outside the layers (embeddings, norms, the MLM transform, decoder bias)."""
    return 16 * shape.layers + 12


def dp_comm_seconds(
    shape: ModelShape, layout: Layout, rates: Rates, gpus_per_node: int, backward_s: float
) -> tuple[float, float]:
    """(exposed, whole) seconds of the data-parallel traffic of one step."""
    p = layout.dp
    if p == 1:
        return 0.0, 0.0
    grads = 4 * parameter_counts(shape, layout.tp)[1]
    spans_nodes = layout.tp * p > gpus_per_node
    latency = rates.network_latency_s if spans_nodes else rates.link_latency_s
    calls = sum(v for k, v in _calls(shape, layout).items() if k.startswith("dp."))
    whole = _ring_all_reduce(grads, p, rates.link_bytes_per_s, 0.0)
    if spans_nodes:  # every node's adapters carry 2(p-1)/p of each of its tp groups' gradients
        whole = max(whole, layout.tp * 2 * (p - 1) / p * grads / rates.network_bytes_per_s)
    # Each call pays its latency: DDP's buckets, or ZeRO-1's reduces, broadcasts and norm.
    whole += calls * 2 * (p - 1) * latency
    broadcast = 0.0
    if layout.zero:  # each owner broadcasts its updated tensors: an all-gather's worth
        bandwidth = rates.network_bytes_per_s / layout.tp if spans_nodes else rates.link_bytes_per_s
        broadcast = (p - 1) / p * grads / min(bandwidth, rates.link_bytes_per_s)
    if layout.device == "cpu":  # the ranks' own cores run the backward: nothing hides
        return whole + broadcast, whole
    last_bucket = whole * min(1.0, DDP_BUCKET_BYTES / grads)
    return max(whole - backward_s, last_bucket) + broadcast, whole


def optimizer_seconds(shape: ModelShape, layout: Layout, rates: Rates) -> float:
    """The step after backward: gradient checks and clipping, then LAMB over the owned state."""
    trained = parameter_counts(shape, layout.tp)[1]
    owned = math.ceil(trained / layout.dp) if layout.zero and layout.dp > 1 else trained
    accesses = 3 * trained + 10 * owned + (2 * owned if layout.zero and layout.dp > 1 else 0)
    # On a GPU it streams at the memory bandwidth; on a CPU at the rate --measure times.
    rate = rates.optimizer_bytes_per_s or rates.elementwise_bytes_per_s or rates.memory_bytes_per_s
    return 4 * accesses / rate


def step_time(shape: ModelShape, layout: Layout, rates: Rates, gpus_per_node: int) -> StepTime:
    """The predicted seconds of one optimizer step of `layout`, term by term."""
    compute = compute_seconds(shape, layout, rates)
    # DDP's all-reduce starts with the last micro-batch's backward (2/3 of its compute).
    backward = 2 / 3 * compute / layout.accumulation
    exposed, whole = dp_comm_seconds(shape, layout, rates, gpus_per_node, backward)
    return StepTime(
        compute=compute,
        tp_comm=tp_comm_seconds(shape, layout, rates),
        dp_comm=exposed,
        optimizer=optimizer_seconds(shape, layout, rates),
        dp_comm_total=whole,
    )


def model_flops(shape: ModelShape, layout: Layout) -> float:
    """Model FLOPs of one step over all ranks (pretrain/model.py's count, as in the log's MFU)."""
    sequences = layout.micro_batch * layout.accumulation * layout.dp
    scored = scored_rows_per_micro_batch(layout) * layout.accumulation * layout.dp
    return flops_per_step(shape, layout.seq_len, sequences, scored)
