"""Mixed precision: which precision a run uses, its autocast context, and fp16 loss scaling.

`train.precision: auto` is resolved once at start-up by `choose_precision`: fp16 with loss
scaling on GPUs below compute capability 8.0 (V100 has fp16 tensor cores but no bf16 ones; torch
emulates bf16 there), bf16 from 8.0 on; on the CPU bf16 only where the CPU has native bf16
instructions (AVX512_BF16 or AMX), else fp32 — without them bf16 matrix products run 8-10x
slower than fp32.

bf16 keeps fp32's exponent range, so it needs autocast only. fp16 gradients underflow without
scaling: the loss is multiplied by a large power of two before backward, the gradients are
divided by it before clipping and the optimizer, and a step whose gradients overflowed is skipped
while the scale backs off. The scale grows again after `growth_interval` clean steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from pretrain.optim import per_tensor_norms

Precision = Literal["fp32", "bf16", "fp16"]

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# CPU flags (Linux /proc/cpuinfo names) that make bf16 matrix products faster than fp32.
FAST_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def choose_precision(
    device_type: str, capability: tuple[int, int] | None, cpu_flags: frozenset[str]
) -> Precision:
    """What `train.precision: auto` means on a device: the rule as a pure function of what
    `detect_capability` and `cpu_flags` observe, so it can be tested for any machine."""
    if device_type == "cuda":
        return "bf16" if capability is not None and capability >= (8, 0) else "fp16"
    if device_type == "cpu":
        return "bf16" if cpu_flags & FAST_BF16_CPU_FLAGS else "fp32"
    return "fp32"


def detect_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of `device`, or None for a non-CUDA device."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo does not exist)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def resolve_precision(setting: str, device: torch.device) -> tuple[Precision, str]:
    """The precision to run (`auto` resolved) and why, or ValueError for bf16 on a GPU below
    compute capability 8.0 (the message names the alternatives)."""
    capability = detect_capability(device)
    if setting == "auto":
        flags = cpu_flags()
        chosen = choose_precision(device.type, capability, flags)
        if capability is not None:
            reason = f"auto: compute capability {capability[0]}.{capability[1]}"
        elif device.type == "cpu":
            native = sorted(flags & FAST_BF16_CPU_FLAGS)
            reason = f"auto: CPU {'with ' + ', '.join(native) if native else 'without native bf16'}"
        else:
            reason = f"auto: device {device.type}"
        return chosen, reason
    if setting == "bf16" and capability is not None and capability < (8, 0):
        raise ValueError(
            f"bf16 on a GPU of compute capability {capability[0]}.{capability[1]} (below 8.0, "
            "e.g. V100) is emulated and slow: use precision auto or fp16"
        )
    if setting not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {setting!r}; use auto, fp32, bf16 or fp16")
    return setting, "as configured"  # type: ignore[return-value]


def dtype_summary(
    precision: Precision, device_type: str, dp_size: int, zero: bool, grad_reduce_dtype: str
) -> str:
    """One line saying what runs in which dtype (for the start-up log): autocast, master
    weights, optimizer state, the MLM head, and the dtype gradients are reduced in over dp
    (`parallel.grad_reduce_dtype`, resolved), to every rank (DDP) or to their ZeRO-1 owner."""
    compute = {"fp32": "fp32 (no autocast)", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}
    scaling = "dynamic loss scaling" if precision == "fp16" else "no loss scaling"
    if dp_size == 1:
        reduction = "no dp reduction"
    elif zero:
        reduction = f"reduced to their ZeRO-1 owner over dp {dp_size} in {grad_reduce_dtype}"
    else:
        reduction = f"all-reduced over dp {dp_size} in {grad_reduce_dtype}"
    return (
        f"precision {precision}: matmuls in {compute[precision]} on {device_type}; master "
        f"weights fp32; optimizer state fp32; MLM head (decoder + cross-entropy) GEMMs in "
        f"{precision}, softmax and loss fp32 in kernels.linear_cross_entropy; gradients fp32, "
        f"{reduction}; {scaling}"
    )


def autocast_context(
    precision: Precision, device_type: str
) -> contextlib.AbstractContextManager[Any]:
    """`torch.autocast` to bf16/fp16 on `device_type` ("cpu", "cuda"), or a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; use 'fp32', 'bf16' or 'fp16'")
    return torch.autocast(device_type=device_type, dtype=_AUTOCAST_DTYPES[precision])


def unscale_and_find_nonfinite(grads: list[Tensor], inv_scale: float) -> Tensor:
    """Multiply every gradient by `inv_scale` in place (skipped for 1.0) and return a float
    flag of shape [1] on the first gradient's device, > 0 if any gradient holds inf or NaN.

    The check is one fp32 L2 norm per tensor (`optim.per_tensor_norms`, the multi-tensor
    kernels clip_grad_norm_ uses; torch's fused `_amp_foreach_non_finite_check_and_unscale_` is
    private): an inf or NaN makes its tensor's norm non-finite, and so does a finite gradient so
    large (about 1e19) that its squares overflow, which no step should apply either. Per-tensor
    `isfinite(g).any()` wrote a bool copy of every gradient: 437 ms against 34 ms for base's
    110 M gradients on one core here. No CPU-GPU sync."""
    if not grads:
        return torch.zeros(1, dtype=torch.float32)
    if inv_scale != 1.0:
        torch._foreach_mul_(grads, inv_scale)
    return (~torch.isfinite(per_tensor_norms(grads))).any().to(torch.float32).reshape(1)


class DynamicLossScaler:
    """Dynamic loss scale for fp16; with `enabled=False` (fp32, bf16) the scale stays 1 and only
    the finiteness check of `unscale_and_check` remains.

    Use per optimizer step:
        scaler.scale_loss(loss).backward()
        found_inf = scaler.unscale_and_check(model.parameters())
        if not found_inf:
            optimizer.step()
        scaler.update(found_inf)

    The scale halves on every overflow (never below `min_scale`) and doubles after
    `growth_interval` steps in a row without one. `state_dict()` is plain floats/ints for
    train_state.json.
    """

    def __init__(
        self,
        enabled: bool = True,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        backoff_factor: float = 0.5,
        growth_factor: float = 2.0,
        min_scale: float = 1.0,
    ) -> None:
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        if not 0.0 < backoff_factor < 1.0 or growth_factor <= 1.0:
            raise ValueError("need 0 < backoff_factor < 1 < growth_factor")
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.backoff_factor = backoff_factor
        self.growth_factor = growth_factor
        self.min_scale = min_scale
        self.growth_tracker = 0  # clean steps since the last change of scale

    def scale_loss(self, loss: Tensor) -> Tensor:
        """The loss to call backward on."""
        return loss * self.scale if self.enabled else loss

    def unscale_and_check(
        self,
        params: Iterable[Tensor],
        reduce_found_inf: Callable[[Tensor], Tensor] | None = None,
    ) -> bool:
        """Divide every gradient by the scale in place; True if any was inf or NaN.

        The check runs in every precision (a disabled scaler only skips the division), so a
        non-finite step is never applied. `reduce_found_inf` receives the local flag (float
        tensor of shape [1], > 0 means found) and returns the flag agreed by all ranks (e.g.
        all-reduce MAX over the world), so every rank skips the same steps. Returning a bool is
        a CPU-GPU sync point (one per step).
        """
        grads = [p.grad for p in params if p.grad is not None]
        found_inf = unscale_and_find_nonfinite(grads, 1.0 / self.scale if self.enabled else 1.0)
        if reduce_found_inf is not None:
            found_inf = reduce_found_inf(found_inf)
        return bool(found_inf.item() > 0)

    @property
    def at_floor(self) -> bool:
        """Whether the scale cannot back off any further (an overflow now cannot be cured)."""
        return self.enabled and self.scale <= self.min_scale

    def update(self, found_inf: bool) -> None:
        """Back off after an overflow; grow after `growth_interval` clean steps."""
        if not self.enabled:
            return
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker >= self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, float | int]:
        """JSON-serialisable state: the scale and the clean-step counter."""
        return {"scale": self.scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore `state_dict()`; a disabled scaler keeps scale 1 whatever was saved."""
        if self.enabled:
            self.scale = float(state["scale"])
            self.growth_tracker = int(state["growth_tracker"])
