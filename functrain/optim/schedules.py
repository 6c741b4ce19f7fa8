"""Learning-rate schedules: pure tensor functions of the step, with optax's names.

A schedule maps a 0-d ``int64`` step tensor (the number of optimizer updates already
applied; the first update sees step 0) to a 0-d ``float64`` tensor on the same device.
Schedules use no ``.item()`` and no Python branching on tensor values, so a compiled train
step traces them once and never recompiles as the step advances.

Example:
    >>> import torch
    >>> from functrain.optim import schedules
    >>> s = schedules.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=110)
    >>> [round(float(s(torch.tensor(t))), 3) for t in (0, 5, 10, 60, 110, 500)]
    [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Union

import torch

__all__ = [
    "Schedule",
    "ScalarOrSchedule",
    "as_schedule",
    "constant_schedule",
    "linear_schedule",
    "cosine_decay_schedule",
    "warmup_cosine_decay_schedule",
    "exponential_decay",
    "step_schedule",
    "piecewise_constant_schedule",
    "multistep_schedule",
    "join_schedules",
]

Schedule = Callable[[torch.Tensor], torch.Tensor]
ScalarOrSchedule = Union[float, Schedule]

_F64 = torch.float64


def _steps(step: torch.Tensor) -> torch.Tensor:
    return step.to(_F64)


def _full(value: float, step: torch.Tensor) -> torch.Tensor:
    return torch.full((), float(value), dtype=_F64, device=step.device)


def as_schedule(value: ScalarOrSchedule) -> Schedule:
    """A schedule from a float (constant) or a schedule (returned as is)."""
    return value if callable(value) else constant_schedule(float(value))


def constant_schedule(value: float) -> Schedule:
    """``value`` at every step."""

    def schedule(step: torch.Tensor) -> torch.Tensor:
        return _full(value, step)

    return schedule


def linear_schedule(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """Linear from ``init_value`` to ``end_value`` over ``transition_steps``, then constant.

    Linear warmup is ``linear_schedule(0.0, peak, warmup_steps)``; linear decay is
    ``linear_schedule(peak, 0.0, steps)``. Matches ``torch.optim.lr_scheduler.LinearLR``
    with ``start_factor=init/base``, ``end_factor=end/base``, ``total_iters=transition_steps``.
    """
    if transition_steps <= 0:
        return constant_schedule(init_value)

    def schedule(step: torch.Tensor) -> torch.Tensor:
        t = (_steps(step) - transition_begin).clamp(0, transition_steps)
        return init_value + (end_value - init_value) * (t / transition_steps)

    return schedule


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps``, then constant.

    Matches ``CosineAnnealingLR(T_max=decay_steps, eta_min=alpha * init_value)`` up to rounding.
    """
    if decay_steps <= 0:
        raise ValueError(f"cosine_decay_schedule: decay_steps must be positive, got {decay_steps}")

    def schedule(step: torch.Tensor) -> torch.Tensor:
        t = _steps(step).clamp(0, decay_steps)
        cosine = 0.5 * (1 + torch.cos(math.pi * t / decay_steps))
        return init_value * ((1 - alpha) * cosine**exponent + alpha)

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``.

    ``decay_steps`` counts the warmup too (as in optax): the cosine lasts
    ``decay_steps - warmup_steps`` steps. Matches ``SequentialLR([LinearLR, CosineAnnealingLR],
    milestones=[warmup_steps])`` up to rounding.
    """
    alpha = 0.0 if peak_value == 0 else end_value / peak_value
    cosine = cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha, exponent)
    if warmup_steps <= 0:
        return cosine
    return join_schedules([linear_schedule(init_value, peak_value, warmup_steps), cosine], [warmup_steps])


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """``init_value * decay_rate ** ((step - transition_begin) / transition_steps)``.

    With ``staircase=True`` the exponent is floored: ``StepLR(step_size=transition_steps,
    gamma=decay_rate)``. ``end_value`` bounds the value (a floor when decaying).
    """
    if transition_steps <= 0:
        raise ValueError(f"exponential_decay: transition_steps must be positive, got {transition_steps}")

    def schedule(step: torch.Tensor) -> torch.Tensor:
        p = (_steps(step) - transition_begin).clamp(min=0) / transition_steps
        if staircase:
            p = torch.floor(p)
        value = init_value * torch.pow(_full(decay_rate, step), p)
        if end_value is not None:
            value = value.clamp(min=end_value) if decay_rate < 1 else value.clamp(max=end_value)
        return value

    return schedule


def step_schedule(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``init_value * gamma ** (step // step_size)``: ``torch.optim.lr_scheduler.StepLR``."""
    return exponential_decay(init_value, step_size, gamma, staircase=True)


def piecewise_constant_schedule(
    init_value: float, boundaries_and_scales: Mapping[int, float] | None = None
) -> Schedule:
    """``init_value`` times the product of the scales of all boundaries already reached.

    ``{100: 0.1, 200: 0.1}`` multiplies the value by 0.1 from step 100 and again from step 200.
    """
    items = sorted((boundaries_and_scales or {}).items())

    def schedule(step: torch.Tensor) -> torch.Tensor:
        value = _full(init_value, step)
        for boundary, scale in items:
            value = torch.where(step >= boundary, value * scale, value)
        return value

    return schedule


def multistep_schedule(init_value: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """``init_value * gamma ** (number of milestones reached)``: ``MultiStepLR``."""
    scales: dict[int, float] = {}
    for m in milestones:
        scales[m] = scales.get(m, 1.0) * gamma
    return piecewise_constant_schedule(init_value, scales)


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """``schedules[i + 1](step - boundaries[i])`` from ``boundaries[i]`` on, ``schedules[0]`` before.

    Every schedule is evaluated and the right one selected with ``torch.where`` (branch-free).
    """
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"join_schedules: need len(boundaries) + 1 schedules, got {len(schedules)} and {len(boundaries)} boundaries"
        )

    def schedule(step: torch.Tensor) -> torch.Tensor:
        value = schedules[0](step)
        for boundary, next_schedule in zip(boundaries, schedules[1:]):
            value = torch.where(step >= boundary, next_schedule(step - boundary), value)
        return value

    return schedule
