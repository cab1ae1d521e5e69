"""Linear + cross-entropy without the full logits: the public function, the chunk loop and the
PyTorch reference of the per-chunk maths.

The MLM head's logits are [N, V] (N scored positions, V ~ 30k): for dense MLM at N = 64k that is
8 GB in fp32, far more than the activations of the rest of the model. The loop computes the
logits of `chunk_rows` rows at a time, turns each chunk into its loss AND its gradients right
away (softmax - onehot is all backward needs), and keeps only grad_hidden [N, H], grad_weight
[V, H] and grad_bias [V]. Peak extra memory is one [chunk_rows, V] fp32 buffer (in half
precision also a half copy of the weight and, at a time, one half [chunk_rows, V] or [V, H]
GEMM output on its way into fp32).

Precision. The three GEMMs per chunk (logits = h W^T, grad_h = G W, grad_W += G^T h) run in the
autocast dtype when autocast is on for the device (bf16 or fp16: tensor cores on a GPU; the
GEMMs accumulate in fp32), in fp32 otherwise. The logits come out of their GEMM rounded to that
dtype, as in Megatron, and are upcast to the fp32 chunk buffer: softmax, log-sum-exp, the loss,
the statistics, grad_bias and the grad_weight accumulator are fp32. The gradients are computed
in the forward pass, before backward's loss scale exists, and d loss / d logits = w_i / sum(w) *
(softmax - onehot) is ~1e-8 at dense micro-batches: below fp16's smallest subnormal. So the
chunk maths scales row i by w_i / max(w) instead (entries in [-1, 1], fine in fp16 and bf16),
and the remaining factor max(w) / sum(w) is applied in fp32 in backward, together with the
incoming gradient (the loss scale), before the grads are cast to their inputs' dtypes.

Tensor parallelism splits V across ranks: each rank holds weight[V_tp, H]. The row max, the row
sums (sum-exp, target logit, logit sum), the argmax and grad_hidden are then partial per rank and
need a reduction over the tp group; each is computed in one small helper below (`_row_max`,
`_row_sum`, `_target_logit`, `_row_argmax`), through the caller's `kernels.collectives.
TensorParallel` object. grad_hidden stays partial here: the caller's tp region sums it.

The GPU path (kernels/cross_entropy_triton.py) runs in the same chunk loop and replaces only the
per-chunk maths on the [c, V] logits (`chunk_math_reference`, about ten passes over the chunk)
by two Triton kernels that read it twice and write the gradient in place, with the same tp
reductions between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kernels.collectives import TensorParallel, VocabShard
from kernels.dispatch import use_triton

# One chunk's fp32 logits are at most 2**24 elements = 64 MB.
_CHUNK_ELEMENTS = 2**24


@dataclass(frozen=True)
class CrossEntropyOptions:
    """The non-tensor arguments of `linear_cross_entropy`, checked once."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    chunk_rows: int | None = None  # default: 2**24 // V rows (64 MB of fp32 logits)
    return_stats: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    position_weight: Tensor | None = None,
    tp: TensorParallel | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_rows: int | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy of `hidden @ weight.T (+ bias)` vs `target`, never holding all logits.

    hidden [..., H] (any float dtype), weight [V, H], bias [V], target [...] int (positions equal
    to `ignore_index` are not scored), position_weight [...] (optional, not differentiated).
    Returns the fp32 scalar loss sum(w_i CE_i) / sum(w_i) over scored positions (w_i = 1 without
    `position_weight`), 0 with zero gradients when nothing is scored. With `return_stats`, also
    (per-row CE [N] fp32 without label smoothing and 0 on ignored rows, argmax [N] int64) for the
    N = prod(leading dims) rows, from the same pass. `label_smoothing` is as in F.cross_entropy.
    With `tp` (a group of size > 1), `weight` (and `bias`) are this rank's equal vocabulary
    shard, in rank order; label smoothing is then not supported. Under autocast the three GEMMs
    run in autocast's dtype, everything else in fp32 (see the module docstring).
    """
    options = CrossEntropyOptions(ignore_index, label_smoothing, chunk_rows, return_stats)
    chunk_math = _pick_chunk_math(hidden)
    return run_chunked(chunk_math, hidden, weight, target, bias, position_weight, tp, options)


def gemm_dtype(device_type: str) -> torch.dtype:
    """The dtype of the head's GEMMs: autocast's (bf16/fp16) where autocast is on for
    `device_type` ("cuda", "cpu"), fp32 otherwise."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32


def _pick_chunk_math(hidden: Tensor) -> ChunkMath:
    """The Triton kernels where kernels.dispatch selects them (compute capability >= 8.0, and
    V100 under a checked Triton version); the PyTorch reference everywhere else."""
    if use_triton(hidden):
        from kernels.cross_entropy_triton import chunk_math_triton

        return chunk_math_triton
    return chunk_math_reference


def run_chunked(
    chunk_math: ChunkMath,
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    position_weight: Tensor | None,
    tp: TensorParallel | None,
    options: CrossEntropyOptions,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """`linear_cross_entropy` around a given per-chunk maths (the reference's or Triton's): the
    checks, then the chunk loop (under autograd when a grad is needed)."""
    shard = VocabShard.of(tp, weight.shape[0])
    if shard.size > 1 and options.label_smoothing > 0:
        raise ValueError("label_smoothing is not supported with a vocabulary split over tp ranks")
    h_dim = hidden.shape[-1]
    if weight.ndim != 2 or weight.shape[1] != h_dim:
        raise ValueError(f"weight must be [V, {h_dim}], got {list(weight.shape)}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"target shape {list(target.shape)} must match hidden's leading dims "
            f"{list(hidden.shape[:-1])}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {list(bias.shape)}")
    if position_weight is not None and position_weight.shape != target.shape:
        raise ValueError(
            f"position_weight shape {list(position_weight.shape)} must equal target's "
            f"{list(target.shape)}"
        )
    chunk_rows = options.chunk_rows or max(1, _CHUNK_ELEMENTS // weight.shape[0])

    hidden_2d = hidden.reshape(-1, h_dim)  # [N, H]
    target_1d = target.reshape(-1)  # [N]
    # [N] w_i / max(w) and the 0-dim max(w) / sum(w): their product is each row's share.
    row_scale, norm = _row_scale(target_1d, position_weight, options.ignore_index)
    plan = _ChunkPlan(
        options.ignore_index,
        options.label_smoothing,
        chunk_rows,
        shard,
        chunk_math,
        gemm_dtype(hidden.device.type),
    )
    inputs = (hidden_2d, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        loss, row_loss, argmax = _LinearCrossEntropy.apply(
            hidden_2d, weight, bias, target_1d, row_scale, norm, plan
        )
    else:  # evaluation: same pass, no gradient work
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            loss, row_loss, argmax, _ = _chunked_pass(
                hidden_2d, weight, bias, target_1d, row_scale, plan, (False, False, False)
            )
        loss = loss * norm
    if options.return_stats:
        return loss, row_loss, argmax
    return loss


def _row_scale(
    target: Tensor, position_weight: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """([N] w_i / max|w| (0 on ignored rows), 0-dim max|w| / sum(w)): the loss is
    sum(row_scale_i CE_i) * norm. Both are zero when nothing is scored (loss 0, zero grads)."""
    scored = target != ignore_index
    if position_weight is None:
        w = scored.to(torch.float32)
    else:
        w = torch.where(scored, position_weight.detach().reshape(-1).to(torch.float32), 0.0)
    # No host sync: zero denominators are replaced by 1 on the device.
    largest = w.abs().amax() if w.numel() else torch.zeros((), device=w.device)
    largest = torch.where(largest != 0, largest, torch.ones_like(largest))
    total = w.sum()
    norm = torch.where(total != 0, largest / torch.where(total != 0, total, 1.0), 0.0)
    return w / largest, norm


# Per-chunk reductions over the vocabulary. With the vocabulary split over tp ranks each returns
# a partial result, and the all-reduce (MAX or SUM over the tp group) goes inside these helpers.


def _row_max(logits: Tensor, shard: VocabShard) -> Tensor:
    """[c, V] -> [c] max over the vocabulary (tp: all-reduce MAX)."""
    result = logits.amax(dim=1)
    if shard.tp is not None:
        shard.tp.all_reduce_max(result)
    return result


def _row_sum(x: Tensor, shard: VocabShard) -> Tensor:
    """[c, V] -> [c] sum over the vocabulary (tp: all-reduce SUM)."""
    result = x.sum(dim=1)
    if shard.tp is not None:
        shard.tp.all_reduce_sum(result)
    return result


def _local_target(target: Tensor, scored: Tensor, shard: VocabShard, local_vocab: int) -> Tensor:
    """[c] bool: the row's target lies in this rank's vocabulary rows."""
    return scored & (target >= shard.start) & (target < shard.start + local_vocab)


def _target_logit(logits: Tensor, target: Tensor, scored: Tensor, shard: VocabShard) -> Tensor:
    """[c] logit of each row's target, 0 where not scored (tp: targets outside this rank's shard
    count 0, then all-reduce SUM)."""
    here = _local_target(target, scored, shard, logits.shape[1])
    safe = torch.where(here, target - shard.start, 0)
    picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
    result = torch.where(here, picked, 0.0)
    if shard.tp is not None:
        shard.tp.all_reduce_sum(result)
    return result


def _row_argmax(logits: Tensor, shard: VocabShard) -> Tensor:
    """[c] global index of the largest logit (tp: the first rank holding the max wins, which
    matches torch.argmax's first occurrence on the full row)."""
    values, index = logits.max(dim=1)
    return shard.global_argmax(values, index + shard.start)


# The per-chunk maths: (logits [c, V] fp32, which it may overwrite, target [c], row_scale [c]
# fp32, ignore_index, label_smoothing, want_grad, shard) -> (row CE [c] fp32, plain CE and 0 on
# ignored rows; the chunk's loss sum(row_scale * CE) (label-smoothed CE if asked), 0-dim fp32;
# argmax [c] int64 over the whole vocabulary; d loss / d logits [c, V] fp32, possibly the
# `logits` buffer itself, or None unless `want_grad`).
ChunkMath = Callable[
    [Tensor, Tensor, Tensor, int, float, bool, VocabShard],
    tuple[Tensor, Tensor, Tensor, "Tensor | None"],
]


@dataclass(frozen=True)
class _ChunkPlan:
    """Everything the chunk loop needs besides the tensors (travels through autograd)."""

    ignore_index: int
    smoothing: float
    chunk_rows: int
    shard: VocabShard
    chunk_math: ChunkMath
    gemm_dtype: torch.dtype  # fp32, or autocast's bf16/fp16 (see the module docstring)


def _chunked_pass(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    row_scale: Tensor,
    plan: _ChunkPlan,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """sum(row_scale_i loss_i), per-row CE, argmax and (if asked) the grads of that sum with
    respect to hidden, weight and bias, chunk by chunk.

    hidden [N, H], weight [V, H], bias [V], target [N], row_scale [N] fp32 = w_i / max|w|.
    GEMMs in `plan.gemm_dtype`, everything else in fp32. grad_hidden comes back in hidden's
    dtype, grad_weight and grad_bias in fp32; the caller multiplies all by max|w| / sum(w).
    """
    need_h, need_w, need_b = needs_grad
    want_grad = need_h or need_w or need_b
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    dtype = plan.gemm_dtype
    weight_g = weight.to(dtype)  # cast once (a no-op for fp32 weights in an fp32 pass)
    bias_f = bias.float() if bias is not None else None

    loss = torch.zeros((), dtype=torch.float32, device=device)
    row_loss = torch.zeros(n_rows, dtype=torch.float32, device=device)
    argmax = torch.zeros(n_rows, dtype=torch.int64, device=device)
    grad_hidden = torch.empty_like(hidden) if need_h else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_w else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None

    for start in range(0, n_rows, plan.chunk_rows):
        end = min(start + plan.chunk_rows, n_rows)
        h = hidden[start:end].to(dtype)  # [c, H]
        # [c, V]: the half GEMM's output rounded to its dtype, then the fp32 chunk buffer.
        logits = (h @ weight_g.T).float()
        if bias_f is not None:
            logits += bias_f
        ce, chunk_loss, chunk_argmax, grad_logits = plan.chunk_math(
            logits,
            target[start:end],
            row_scale[start:end],
            plan.ignore_index,
            plan.smoothing,
            want_grad,
            plan.shard,
        )
        del logits  # now grad_logits (or garbage): nothing else may hold the chunk buffer
        row_loss[start:end] = ce
        argmax[start:end] = chunk_argmax
        loss += chunk_loss
        if grad_logits is None:
            continue
        if grad_bias is not None:
            grad_bias += grad_logits.sum(dim=0)
        grad_logits = grad_logits.to(dtype)  # entries in [-1, 1]: no fp16 underflow to speak of
        if grad_hidden is not None:
            # tp: partial over this rank's vocabulary; the caller's tp region sums it.
            grad_hidden[start:end] = grad_logits @ weight_g
        if grad_weight is not None:
            if dtype == torch.float32:
                grad_weight.addmm_(grad_logits.T, h)
            else:  # the chunk's [V, H] product in the GEMM dtype, summed over chunks in fp32
                grad_weight += grad_logits.T @ h
        del grad_logits  # before the next chunk allocates its own

    return loss, row_loss, argmax, (grad_hidden, grad_weight, grad_bias)


def chunk_math_reference(
    logits: Tensor,
    target: Tensor,
    row_scale: Tensor,
    ignore_index: int,
    smoothing: float,
    want_grad: bool,
    shard: VocabShard,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One chunk's maths in PyTorch, in place on `logits` (see ChunkMath)."""
    vocab = logits.shape[1]
    scored = target != ignore_index
    argmax = _row_argmax(logits, shard)
    logits -= _row_max(logits, shard).unsqueeze(1)  # shifted: every entry <= 0
    target_shifted = _target_logit(logits, target, scored, shard)
    mean_shifted = _row_sum(logits, shard) / vocab if smoothing > 0 else None
    logits.exp_()
    sum_exp = _row_sum(logits, shard)
    log_sum_exp = sum_exp.log()  # lse - max

    ce = torch.where(scored, log_sum_exp - target_shifted, 0.0)
    smoothed = ce
    if mean_shifted is not None:
        # (1 - s) CE + s * (lse - mean logit), the label-smoothed loss of F.cross_entropy
        smoothed = (1.0 - smoothing) * ce + smoothing * (log_sum_exp - mean_shifted)
    loss = (row_scale * smoothed).sum()
    if not want_grad:
        return ce, loss, argmax, None
    # d loss / d logits = scale_i * (softmax - (1 - s) onehot - s / V), built in place.
    probs = logits.div_(sum_exp.unsqueeze(1))
    if smoothing > 0:
        probs -= smoothing / vocab
    here = _local_target(target, scored, shard, vocab)
    safe_t = torch.where(here, target - shard.start, 0)
    on_target = torch.where(here, 1.0 - smoothing, 0.0).unsqueeze(1)
    probs.scatter_add_(1, safe_t.unsqueeze(1), -on_target)
    grad_logits = probs.mul_(row_scale.unsqueeze(1))  # ignored rows: scale 0 -> all zero
    return ce, loss, argmax, grad_logits


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward does all the work (see `_chunked_pass`); backward only scales the saved grads."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        row_scale: Tensor,
        norm: Tensor,
        plan: _ChunkPlan,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # The pass picks its GEMM dtype itself (plan.gemm_dtype); autocast must not recast.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            loss, row_loss, argmax, grads = _chunked_pass(
                hidden, weight, bias, target, row_scale, plan, ctx.needs_input_grad[:3]
            )
        ctx.save_for_backward(norm, *(g if g is not None else torch.empty(0) for g in grads))
        ctx.has_grad = tuple(g is not None for g in grads)
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (hidden, weight, bias))
        ctx.mark_non_differentiable(row_loss, argmax)
        return loss * norm, row_loss, argmax

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad_loss: Tensor, _grad_row_loss: Tensor, _grad_argmax: Tensor
    ) -> tuple[Tensor | None, ...]:
        norm, *saved = ctx.saved_tensors
        # fp32: the loss scale (in grad_loss) meets max|w| / sum(w) before any cast to half.
        coefficient = grad_loss.float() * norm
        grads = tuple(
            (g.float() * coefficient).to(dtype) if has else None
            for g, has, dtype in zip(saved, ctx.has_grad, ctx.dtypes, strict=True)
        )
        return (*grads, None, None, None, None)
