"""`apply_tensor_parallel(model, dims)`: Megatron's plan for BERT, applied from outside.

| module                      | split                                   |
|-----------------------------|-----------------------------------------|
| layers.*.attention.qkv      | column (whole heads per rank)           |
| layers.*.attention.core     | runs on local heads; per-rank dropout RNG |
| layers.*.attention.out      | row (+ all-reduce)                      |
| layers.*.mlp.fc_in          | column                                  |
| layers.*.mlp.fc_out         | row (+ all-reduce)                      |
| embeddings.word (= decoder) | vocabulary rows, padded to 128 x tp     |
| mlm_head.bias               | vocabulary, like the decoder            |
| everything else             | replicated (LayerNorms, positions, pooler, heads' transform) |

Every rank builds the full model from the same seed first (on the host; the trainer moves the
shards to the GPU) and keeps its shard, so a tp run starts from exactly the weights of a tp = 1
run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.config import Config, ConfigError, ModelShape
from pretrain.distributed import ParallelDims
from pretrain.model import Bert, apply_recompute
from pretrain.objectives import PretrainingLoss
from pretrain.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    mark_split,
    split_of,
)
from pretrain.parallel.rng import TPRegionRNG

VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    multiple = VOCAB_MULTIPLE * tp_size
    return (vocab_size + multiple - 1) // multiple * multiple


def check_tp_shapes(shape: ModelShape, tp_size: int) -> None:
    """Every split must be even: heads (hence QKV rows and attention-out columns), the MLP width
    and the padded vocabulary. Raises ValueError naming the key to change."""
    if shape.heads % tp_size:
        raise ValueError(f"model.heads={shape.heads} is not divisible by parallel.tp={tp_size}")
    if shape.ffn_hidden % tp_size:
        raise ValueError(
            f"model.ffn_hidden={shape.ffn_hidden} is not divisible by parallel.tp={tp_size}"
        )
    if padded_vocab_size(shape.vocab_size, tp_size) % tp_size:
        raise ValueError("the padded vocabulary does not split evenly")


def apply_tensor_parallel(model: Bert, dims: ParallelDims) -> None:
    """Replace the model's layers by their tensor-parallel versions (no-op at tp = 1)."""
    p, rank, group = dims.tp_size, dims.tp_rank, dims.tp_group
    if p == 1:
        return
    check_tp_shapes(model.shape, p)
    for layer in model.layers:
        attention = layer.attention
        attention.qkv = ColumnParallelLinear(attention.qkv, group, rank, p)
        attention.core = TPRegionRNG(attention.core, rank)
        attention.out = RowParallelLinear(attention.out, group, rank, p)
        layer.mlp.fc_in = ColumnParallelLinear(layer.mlp.fc_in, group, rank, p)
        layer.mlp.fc_out = RowParallelLinear(layer.mlp.fc_out, group, rank, p)

    vocab = model.shape.vocab_size
    padded = padded_vocab_size(vocab, p)
    per_rank = padded // p
    model.embeddings.word = VocabParallelEmbedding(model.embeddings.word, padded, group, rank, p)
    head = model.mlm_head
    bias = torch.zeros(padded, dtype=head.bias.dtype, device=head.bias.device)
    bias[:vocab] = head.bias.detach()
    mask = torch.zeros(padded, dtype=torch.float32, device=head.bias.device)
    mask[vocab:] = float("-inf")
    shard = slice(rank * per_rank, (rank + 1) * per_rank)
    head.bias = mark_split(nn.Parameter(bias[shard].clone()), 0, vocab)
    head.vocab_mask = mask[shard].clone()


def parallelize_bert(model: Bert, dims: ParallelDims, config: Config) -> nn.Module:
    """Make a built model (whole, on the host) ready to train, in this order, which matters:

    1. recompute (`train.recompute`): flags on the model's own modules; tensor parallelism
       wraps the attention core, so flags set after it would not reach the core
    2. tensor parallelism (`parallel.tp`): each rank keeps its shard
    3. device: only the shard moves to this rank's GPU
    4. compile (`train.compile`): the model's forward, in place
    5. data parallelism: DDP over the dp group, around the model and its loss (not with
       `parallel.zero=1`: ZeRO-1 reduces the gradients itself, `pretrain/parallel/zero.py`)

    Returns the module a training step calls: the model and its objective (`PretrainingLoss`),
    wrapped in DDP when dp > 1 without ZeRO. The model itself stays reachable as `model` for
    evaluation, checkpoints and the optimizer.
    """
    apply_recompute(model, config.train.recompute)
    try:
        apply_tensor_parallel(model, dims)
    except ValueError as error:
        raise ConfigError(f"parallel.tp={dims.tp_size}: {error}") from None
    model.to(dims.device)
    if config.train.compile:
        model.compile()  # the first steps pay the compile time
    loss_step: nn.Module = PretrainingLoss(model, config.mlm, dims.tp_group)
    if dims.dp_size > 1 and not config.parallel.zero:
        dtype = REDUCE_DTYPES[config.parallel.grad_reduce_dtype]
        loss_step = apply_data_parallel(loss_step, dims, dtype)
    return loss_step


REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_grad_reduce_dtype(setting: str, precision: str) -> str:
    """What `parallel.grad_reduce_dtype` means for a resolved `train.precision`, or ValueError.

    auto: fp16 when training in fp16 (the loss scale keeps gradients in fp16's range, and an
    overflow is caught and skipped like any other), else fp32. bf16 has fp32's range, so any
    precision may choose it (it rounds each gradient to 8 significant bits). fp16 without
    loss scaling would flush small gradients to zero and could overflow with nothing to back
    off, so it is refused.
    """
    if setting == "auto":
        return "fp16" if precision == "fp16" else "fp32"
    if setting == "fp16" and precision != "fp16":
        raise ValueError(
            f"fp16 gradients need loss scaling, which train.precision={precision} does not "
            "have: use fp32 or bf16"
        )
    return setting


# The one buffer, the vocabulary mask, is built alike on every rank: DDP need not broadcast it
# before each forward. torch 2.13 renamed the switch and warns on the old name on every rank.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def apply_data_parallel(
    module: nn.Module, dims: ParallelDims, reduce_dtype: torch.dtype = torch.float32
) -> nn.Module:
    """DDP over the dp group: gradients averaged in buckets while backward runs, in
    `reduce_dtype` on the wire.

    With `gradient_as_bucket_view` each .grad is a view into its all-reduce bucket instead of a
    second fp32 copy of all gradients (pretrain/memory.py counts no extra bucket memory).
    """
    ddp = DistributedDataParallel(
        module,
        process_group=dims.dp_group,
        device_ids=[dims.device] if dims.device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        **_NO_BUFFER_SYNC,
    )
    if reduce_dtype != torch.float32:
        ddp.register_comm_hook(dims.dp_group, _all_reduce_in(reduce_dtype))
    return ddp


def _all_reduce_in(dtype: torch.dtype) -> Callable:
    """A DDP comm hook averaging each bucket in `dtype`: divided by the group size in fp32
    first, so the sum of the shares stays within fp16's range where each share was."""

    # No annotations: DDP inspects them and would compare this module's string annotations.
    def hook(group, bucket):
        buffer = bucket.buffer()
        wire = buffer.div(group.size()).to(dtype)
        future = dist.all_reduce(wire, group=group, async_op=True).get_future()

        def back(done: torch.futures.Future) -> torch.Tensor:
            return buffer.copy_(done.value()[0])

        return future.then(back)

    return hook


def tp_sharded_names(model: nn.Module) -> set[str]:
    """Parameters split across tp ranks (the others are replicated), from their tags."""
    return {name for name, param in model.named_parameters() if split_of(param) is not None}


def tp_grad_norm_fn(
    model: nn.Module, params: list[nn.Parameter], dims: ParallelDims
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For clip_grad_norm_: the global squared norm counting every parameter exactly once.

    Shards are summed over the tp group; replicated tensors (identical on every tp rank) are
    counted once. dp replicas hold identical (averaged) gradients, so dp needs no reduction.
    """
    if dims.tp_size == 1:
        return None
    sharded = tp_sharded_names(model)
    by_id = {id(p): name for name, p in model.named_parameters()}
    mask = torch.tensor([by_id[id(p)] in sharded for p in params])

    def global_square(squares: torch.Tensor) -> torch.Tensor:
        if len(squares) != len(mask):
            raise RuntimeError("every trained parameter must have a gradient under tp")
        local = mask.to(squares.device)
        shard_part = squares[local].sum()
        dist.all_reduce(shard_part, group=dims.tp_group)
        return shard_part + squares[~local].sum()

    return global_square


def shard_layout(model: nn.Module) -> dict[str, dict[str, int]]:
    """{name: {"dim": split dim, "size": whole unpadded size}} of every tp-split parameter,
    from the tags the parallel layers put on them ({} at tp = 1).

    Stored in checkpoints so that they load at any tp: shards are concatenated along `dim`,
    cut to `size` (dropping vocabulary padding) and re-split for the new layout.
    """
    return {
        name: dict(split)
        for name, param in model.named_parameters()
        if (split := split_of(param)) is not None
    }
