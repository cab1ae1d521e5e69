"""Mixed precision: the autocast context for a `train.precision`, and fp16 dynamic loss scaling.

bf16 keeps fp32's exponent range, so it needs autocast only. fp16 gradients underflow without
scaling: the loss is multiplied by a large power of two before backward, the gradients are
divided by it before clipping and the optimizer, and a step whose gradients overflowed is skipped
while the scale backs off. The scale grows again after `growth_interval` clean steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

Precision = Literal["fp32", "bf16", "fp16"]

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(
    precision: Precision, device_type: str
) -> contextlib.AbstractContextManager[Any]:
    """`torch.autocast` to bf16/fp16 on `device_type` ("cpu", "cuda"), or a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; use 'fp32', 'bf16' or 'fp16'")
    return torch.autocast(device_type=device_type, dtype=_AUTOCAST_DTYPES[precision])


class DynamicLossScaler:
    """Dynamic loss scale for fp16; with `enabled=False` (fp32, bf16) every method is a no-op
    and the scale stays 1.

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

        `reduce_found_inf` receives the local flag (float tensor of shape [1], > 0 means found)
        and returns the flag agreed by all ranks (e.g. all-reduce MAX over the world), so every
        rank skips the same steps. Returning a bool is a CPU-GPU sync point (one per step).
        """
        if not self.enabled:
            return False
        grads = [p.grad for p in params if p.grad is not None]
        by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for g in grads:
            by_key.setdefault((g.device, g.dtype), []).append(g)
        device = grads[0].device if grads else torch.device("cpu")
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        for (dev, _), group in by_key.items():
            found_here = torch.zeros(1, dtype=torch.float32, device=dev)
            inv_scale = torch.full((1,), 1.0 / self.scale, dtype=torch.float32, device=dev)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_here, inv_scale)
            found_inf += found_here.to(device)
        if reduce_found_inf is not None:
            found_inf = reduce_found_inf(found_inf)
        return bool(found_inf.item() > 0)

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
