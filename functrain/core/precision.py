"""Mixed precision for train steps: bf16 autocast, and fp16 with dynamic loss scaling.

The loss scale is state (:class:`functrain.LossScale`), updated branch-free inside the
step like ``torch.amp.GradScaler``: a step whose gradients are not finite is skipped
(params and optimizer state unchanged), the scale is halved and ``skipped`` counts it;
after ``growth_interval`` finite steps in a row the scale doubles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

from functrain.core.state import LossScale

__all__ = ["PRECISIONS", "check_precision", "autocast_context", "scale_loss", "unscale_and_update"]

PRECISIONS = (None, "bf16", "fp16")
GROWTH_INTERVAL = 2000


def check_precision(precision: str | None) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def autocast_context(precision: str | None, params: Mapping[str, torch.Tensor]) -> Any:
    """``torch.autocast`` on the params' device for ``"bf16"``/``"fp16"``; a no-op for None."""
    if precision is None:
        return contextlib.nullcontext()
    device_type = next(iter(params.values())).device.type if params else "cpu"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


def scale_loss(loss: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return loss if scale is None else loss * scale


def unscale_and_update(
    grads: dict[str, torch.Tensor], loss_scale: LossScale, growth_interval: int = GROWTH_INTERVAL
) -> tuple[dict[str, torch.Tensor], torch.Tensor, LossScale]:
    """Unscaled gradients, whether they are all finite (0-d bool), and the next loss scale."""
    inv = 1.0 / loss_scale.scale
    grads = {k: g * inv.to(g.dtype) for k, g in grads.items()}
    finite = torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()
    good = torch.where(finite, loss_scale.good_steps + 1, torch.zeros_like(loss_scale.good_steps))
    grow = good >= growth_interval
    scale = torch.where(finite, torch.where(grow, loss_scale.scale * 2.0, loss_scale.scale), loss_scale.scale * 0.5)
    good = torch.where(grow, torch.zeros_like(good), good)
    skipped = loss_scale.skipped + (~finite).to(loss_scale.skipped.dtype)
    return grads, finite, LossScale(scale=scale, good_steps=good, skipped=skipped)
