"""ZeRO-1: optimizer state sharded across data-parallel ranks, at plain DDP's wire volume.

Each dp rank owns whole parameter tensors (so LAMB's per-tensor trust ratio, over the whole
tp-reduced tensor, stays exact) and keeps optimizer state for those only. A step moves each
gradient once towards its owner and each updated parameter once back:

1. Gradients are **reduced to their owner** while backward runs. Ownership is a contiguous run
   of tensors in backward order (`assign_owners`), so the tensors are cut into buckets of one
   owner each (at most `BUCKET_ELEMENTS`), in the order their gradients appear. A
   post-accumulate-grad hook on every parameter counts the bucket's ready tensors; a full
   bucket is flattened, divided by dp, cast to `parallel.grad_reduce_dtype` and sent with one
   asynchronous `reduce` to its owner. Buckets are issued in a fixed order (bucket i only after
   buckets 0..i-1), so every rank issues the same collectives in the same order, as DDP does.
   Micro-steps under `no_sync()` only accumulate locally.
2. `finish_gradient_reduction()` (after the last backward) waits for the reductions. The owner's
   `.grad` becomes the dp average (fp32 views into the bucket); other ranks drop their `.grad`,
   so the loss-scale check, clipping (`grad_norm_fn`: squares summed over tp and dp) and
   the optimizer see each gradient on exactly one dp rank.
3. `step()` runs the wrapped optimizer over the owned tensors, then each owner **broadcasts** its
   updated buckets; all broadcasts are issued at once and waited for together.

Payload per step: the gradients once (`reduce`) plus the fp32 parameters once (`broadcast`).
On the wire each is (p-1)/p of its payload, together 2(p-1)/p of the fp32 gradients: what
DDP's all-reduce moves. tp ranks hold tensors of the same shapes, so they own the same tensors
and LAMB's tp norm reduction pairs up tensor by tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pretrain.config import ConfigError
from pretrain.distributed import ParallelDims
from pretrain.optim import tensors_with_tp_norms

BUCKET_ELEMENTS = 25 * 2**20 // 4
"""Largest bucket: 25 MiB of fp32 gradients, DDP's default `bucket_cap_mb`."""


def assign_owners(params: list[Tensor], dp_size: int) -> list[int]:
    """dp rank owning each tensor: contiguous runs in the given order, ranks 0, 1, ... in turn,
    with the largest run as small as whole tensors allow (every rank owns at least one tensor
    when there are enough).

    The bound is found by bisection (the smallest load for which filling ranks in order fits
    in dp ranks); it is at least the largest tensor and at most an even share plus one tensor.
    """
    sizes = [p.numel() for p in params]

    def ranks_needed(cap: int) -> int:
        ranks, load = 1, 0
        for n in sizes:
            if load + n > cap:
                ranks, load = ranks + 1, 0
            load += n
        return ranks

    low, high = max(sizes, default=0), max(sum(sizes), 1)
    while low < high:
        middle = (low + high) // 2
        if ranks_needed(middle) <= dp_size:
            high = middle
        else:
            low = middle + 1
    owners, rank, load = [], 0, 0
    for index, n in enumerate(sizes):
        left = len(sizes) - index  # tensors still to place, this one included
        if load and (load + n > low or left <= dp_size - 1 - rank):
            rank, load = rank + 1, 0
        owners.append(rank)
        load += n
    return owners


@dataclass
class _Bucket:
    """Tensors of one owner whose gradients travel in one collective."""

    params: list[Tensor]
    owner: int  # dp rank
    root: int  # its global rank (collectives name roots by global rank)
    numel: int
    ready: int = 0
    flat: Tensor | None = None
    work: Any = None
    offsets: list[int] = field(default_factory=list)


class ZeroRedundancy:
    """Gradient reduction to owners, an optimizer over this rank's tensors and the gather.

    `params`: every trained parameter in model order (their gradients arrive in about the
    reverse order); `param_groups`: the same parameters in optimizer groups; `build` makes the
    wrapped optimizer from this rank's share of the groups; `reduce_dtype`: the dtype in which
    gradients cross the network.
    """

    def __init__(
        self,
        params: list[Tensor],
        param_groups: list[dict[str, Any]],
        build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        dims: ParallelDims,
        reduce_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.dims = dims
        self.reduce_dtype = reduce_dtype
        self.all_params = list(params)
        order = self.all_params[::-1]  # backward order, roughly
        if len(order) < dims.dp_size:
            raise ConfigError(
                f"parallel.zero=1 at dp={dims.dp_size} needs at least {dims.dp_size} parameter "
                f"tensors; the model has {len(order)}: use parallel.zero=0"
            )
        owners = assign_owners(order, dims.dp_size)
        self.owner = {id(p): o for p, o in zip(order, owners, strict=True)}
        self.owned = [p for p in self.all_params if self.owner[id(p)] == dims.dp_rank]
        local = [
            dict(group, params=[p for p in group["params"] if self.owner[id(p)] == dims.dp_rank])
            for group in param_groups
        ]
        self.optimizer = build([g for g in local if g["params"]])
        self.buckets = self._make_buckets(order)
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.reducing = True
        self.next_bucket = 0  # buckets are issued strictly in order
        if dims.dp_size > 1:
            for param in self.all_params:
                param.register_post_accumulate_grad_hook(self._gradient_ready)

    def _make_buckets(self, order: list[Tensor]) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        for param in order:
            owner = self.owner[id(param)]
            last = buckets[-1] if buckets else None
            if last is None or last.owner != owner or last.numel + param.numel() > BUCKET_ELEMENTS:
                root = owner * self.dims.tp_size + self.dims.tp_rank
                last = _Bucket(params=[], owner=owner, root=root, numel=0)
                buckets.append(last)
            last.offsets.append(last.numel)
            last.params.append(param)
            last.numel += param.numel()
        return buckets

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> dict:
        return self.optimizer.state

    def tensors_with_tp_norms(self) -> int:
        """Those of the wrapped optimizer (this rank's share); 0 when it reduces none."""
        return tensors_with_tp_norms(self.optimizer)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate gradients locally (gradient accumulation)."""
        self.reducing = False
        try:
            yield
        finally:
            self.reducing = True

    def _gradient_ready(self, param: Tensor) -> None:
        if not self.reducing:
            return
        self.bucket_of[id(param)].ready += 1
        while self.next_bucket < len(self.buckets) and (
            bucket := self.buckets[self.next_bucket]
        ).ready == len(bucket.params):
            self._reduce(bucket)
            self.next_bucket += 1

    @torch.no_grad()
    def _reduce(self, bucket: _Bucket) -> None:
        """Average the bucket's gradients on its owner: divided by dp in fp32 first, so the sum
        of the dp shares cannot overflow fp16 where each share did not."""
        grads = [
            p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel())
            for p in bucket.params
        ]
        flat = torch.cat(grads).div_(self.dims.dp_size).to(self.reduce_dtype)
        bucket.flat = flat
        bucket.work = dist.reduce(flat, dst=bucket.root, group=self.dims.dp_group, async_op=True)
        if bucket.owner != self.dims.dp_rank:
            for param in bucket.params:
                param.grad = None

    @torch.no_grad()
    def finish_gradient_reduction(self) -> None:
        """Wait for every bucket (issuing those whose tensors got no gradient); afterwards only
        the owner of a tensor holds its (dp-averaged, fp32) gradient."""
        if self.dims.dp_size == 1:
            return
        for bucket in self.buckets[self.next_bucket :]:
            self._reduce(bucket)
        for bucket in self.buckets:
            bucket.work.wait()
            if bucket.owner == self.dims.dp_rank:
                flat = bucket.flat.float()
                for param, offset in zip(bucket.params, bucket.offsets, strict=True):
                    param.grad = flat[offset : offset + param.numel()].view_as(param)
            bucket.flat, bucket.work, bucket.ready = None, None, 0
        self.next_bucket = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.all_params:
            if set_to_none or param.grad is None:
                param.grad = None
            else:
                param.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """Update the owned tensors, then every owner broadcasts its buckets, all at once."""
        self.optimizer.step()
        if self.dims.dp_size == 1:
            return
        sends = []
        for bucket in self.buckets:
            if bucket.owner == self.dims.dp_rank:
                flat = torch.cat([p.reshape(-1) for p in bucket.params])
            else:
                flat = bucket.params[0].new_empty(bucket.numel)
            work = dist.broadcast(flat, src=bucket.root, group=self.dims.dp_group, async_op=True)
            sends.append((bucket, flat, work))
        for bucket, flat, work in sends:
            work.wait()
            if bucket.owner != self.dims.dp_rank:
                for param, offset in zip(bucket.params, bucket.offsets, strict=True):
                    param.copy_(flat[offset : offset + param.numel()].view_as(param))

    def grad_norm_fn(self, sharded: set[int]) -> Callable[[Tensor], Tensor]:
        """For clip_grad_norm_ over `self.all_params`: only owned tensors have gradients, so the
        squares are summed over dp; tp shards (ids in `sharded`) are summed over tp, replicated
        tensors counted once."""
        mask = torch.tensor([id(p) in sharded for p in self.owned], dtype=torch.bool)
        dims = self.dims

        def global_square(squares: Tensor) -> Tensor:
            if len(squares) != len(mask):
                raise RuntimeError("every owned parameter must have a gradient under ZeRO")
            local = mask.to(squares.device)
            shard_part = squares[local].sum()
            if dims.tp_size > 1:
                dist.all_reduce(shard_part, group=dims.tp_group)
            total = shard_part + squares[~local].sum()
            if dims.dp_size > 1:
                dist.all_reduce(total, group=dims.dp_group)
            return total

        return global_square

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
