"""Communication accounting: the bytes each collective moves, by process group and kind.

`CommCounter` is a dispatch mode that sees every c10d collective issued while it is active —
ours (tp mappings, vocabulary-parallel cross-entropy, LAMB's norms, ZeRO-1's reduces and
broadcasts) and DDP's bucketed gradient all-reduce alike — so nothing has to be instrumented
by hand and nothing can be forgotten. It costs a Python call per operator, so the trainer turns
it on only with `train.comm_stats=true`.

Bytes are payload bytes: the tensor of an all-reduce, reduce or broadcast, the gathered result
of an all-gather, the input of a reduce-scatter. `wire_bytes` turns them into what crosses each
rank's link on average: 2(p-1)/p of an all-reduce's payload (a ring's reduce-scatter then
all-gather), (p-1)/p of the others' (each of the p-1 other ranks' shares, or the root's
tensor, crosses once). `analytic_bytes` is the minimum the configuration needs, which the
tests and the benchmark compare the measurement with.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.config import ModelShape

# c10d operator -> (kind, position of the process group, position of the counted tensor(s)).
_COLLECTIVES: dict[str, tuple[str, int, int]] = {
    "allreduce_": ("all_reduce", 1, 0),
    "allreduce_coalesced_": ("all_reduce", 1, 0),
    "broadcast_": ("broadcast", 1, 0),
    "reduce_": ("reduce", 1, 0),
    "allgather_": ("all_gather", 2, 0),
    "_allgather_base_": ("all_gather", 2, 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 2, 0),
    "reduce_scatter_": ("reduce_scatter", 2, 1),
    "_reduce_scatter_base_": ("reduce_scatter", 2, 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 2, 1),
}


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CommCounter(TorchDispatchMode):
    """Counts calls and payload bytes per "group.kind" (e.g. "tp.all_reduce") while active.

    `groups` names the process groups ({"tp": group, "dp": group}); the default world group is
    "world" and any other group "other".
    """

    minimum: Callable[..., dict[str, int]] | None = None
    """Set by the trainer: the analytic minimum for a step, given its encoded/scored positions."""

    def __init__(self, groups: dict[str, dist.ProcessGroup | None]) -> None:
        super().__init__()
        self.names = {g.group_name: name for name, g in groups.items() if g is not None}
        if dist.is_initialized():
            self.names.setdefault(dist.group.WORLD.group_name, "world")
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d" and func.__name__.split(".")[0] in _COLLECTIVES:
            kind, group_at, tensor_at = _COLLECTIVES[func.__name__.split(".")[0]]
            group = dist.ProcessGroup.unbox(args[group_at])
            key = f"{self.names.get(group.group_name, 'other')}.{kind}"
            self.bytes[key] += _nbytes(args[tensor_at])
            self.calls[key] += 1
        return func(*args, **kwargs)


def analytic_bytes(
    shape: ModelShape,
    *,
    encoded: int,
    scored: int,
    tp: int,
    dp: int,
    local_params: int,
    optimizer_tensors: int,
    zero: bool,
    reduce_bytes: int = 4,
    autocast_bytes: int = 4,
) -> dict[str, int]:
    """The minimum payload per optimizer step on one rank, by "group.kind".

    encoded: positions this rank runs through the encoder in the step (micro-batches × b × s);
    scored: positions whose logits it computes (every non-special position in dense MLM, the
    picked ones in sparse MLM); local_params: parameters this rank holds (its tp shard);
    optimizer_tensors: parameter tensors its LAMB updates (0 for AdamW; with ZeRO-1 only the
    ones it owns); reduce_bytes: bytes per gradient element on the dp wire
    (`parallel.grad_reduce_dtype`); autocast_bytes: 2 when matmuls run under bf16/fp16 autocast.

    TP, per layer: the row-parallel attention-out and MLP-out all-reduce [encoded, h] in
    forward (in the autocast dtype), and the column-parallel QKV and MLP-in inputs all-reduce
    their fp32 gradient in backward. The vocabulary-parallel embedding all-reduces its
    output; the vocabulary-parallel decoder all-reduces its input's gradient (the MLM
    transform's output, in the autocast dtype); the
    cross-entropy all-reduces three fp32 numbers per scored row (max, sum of exponentials,
    target logit) and all-gathers each rank's best logit (fp32) and its index (int64) for
    accuracy. LAMB all-reduces two fp32 norms per tensor (whole-parameter trust ratios) and
    the global gradient norm (logged, and clipped to) one fp32 square.
    DP without ZeRO: the gradients once (DDP's all-reduce). DP with ZeRO-1: the gradients once
    (reduced to their owners), the updated fp32 parameters once (broadcast by their owners) and
    the global gradient norm's one fp32 square (each rank holds only its owned gradients).
    World: one fp32 flag, so every rank skips the same non-finite steps.
    """
    h = shape.hidden
    out: dict[str, int] = {}
    if tp > 1:
        encoder = 2 * shape.layers * encoded * h * (autocast_bytes + 4)
        embedding = encoded * h * 4
        decoder = scored * h * autocast_bytes
        cross_entropy = 3 * scored * 4
        norms = 2 * optimizer_tensors * 4 + 4
        out["tp.all_reduce"] = encoder + embedding + decoder + cross_entropy + norms
        out["tp.all_gather"] = scored * (4 + 8) * tp
    if dp > 1 and zero:
        out["dp.reduce"] = local_params * reduce_bytes
        out["dp.broadcast"] = local_params * 4
        out["dp.all_reduce"] = 4
    elif dp > 1:
        out["dp.all_reduce"] = local_params * reduce_bytes
    if tp * dp > 1:
        out["world.all_reduce"] = 4
    return out


DDP_FIRST_BUCKET_BYTES = 1024**2  # torch DDP's first bucket (dist._DEFAULT_FIRST_BUCKET_BYTES)
DDP_BUCKET_BYTES = 25 * 1024**2  # and the others' cap, bucket_cap_mb=25


def analytic_calls(
    layers: int, *, micro_batches: int, tp: int, dp: int, zero: bool, gradient_bytes: int
) -> dict[str, int]:
    """Collective calls per optimizer step on one rank, by "group.kind" (what CommCounter
    counts; tests/distributed/test_comm_stats.py holds them equal). Each call pays a latency
    whatever its size, which on a CPU node is most of what a small collective costs.

    TP, per micro-batch: the four all-reduces of every layer, the embedding's, the decoder's and
    the cross-entropy's three, and its two all-gathers (the best logit and its index); per step
    three all-reduces (LAMB's norms and the gradient norm's square among them). DP: one
    all-reduce per DDP bucket of the `gradient_bytes` (a first bucket of 1 MiB, then 25 MiB
    each); ZeRO-1 a reduce to and a broadcast from each of the dp owners and the gradient
    norm's square. World: the skip flag.
    """
    out: dict[str, int] = {}
    if tp > 1:
        out["tp.all_reduce"] = micro_batches * (4 * layers + 5) + 3
        out["tp.all_gather"] = micro_batches * 2
    if dp > 1 and zero:
        out["dp.reduce"] = dp
        out["dp.broadcast"] = dp
        out["dp.all_reduce"] = 1
    elif dp > 1:
        rest = max(0, gradient_bytes - DDP_FIRST_BUCKET_BYTES)
        out["dp.all_reduce"] = 1 + -(-rest // DDP_BUCKET_BYTES)
    if tp * dp > 1:
        out["world.all_reduce"] = 1
    return out


def wire_bytes(payload: dict[str, int], sizes: dict[str, int]) -> dict[str, float]:
    """Bytes each rank's link carries for `payload` ("group.kind" -> bytes), on average, with
    `sizes` the ranks in each group ({"tp": 2, "dp": 2, "world": 4}): 2(p-1)/p of an
    all-reduce, (p-1)/p of any other collective (0 in a group of one)."""
    out = {}
    for key, value in payload.items():
        group, kind = key.split(".", 1)
        p = sizes[group]
        factor = (p - 1) / p * (2 if kind == "all_reduce" else 1)
        out[key] = value * factor
    return out
