"""Pure optimizers in optax's design, bitwise equal to ``torch.optim`` (see docs/optimizers.md).

An optimizer is a :class:`GradientTransformation` ``(init, update, step)`` of pure functions
on trees (dicts keyed like a ``state_dict``) of tensors; :func:`apply_gradients` is the one
call a train step makes.

Example:
    >>> import torch
    >>> from functrain import optim
    >>> tx = optim.chain(optim.clip_by_global_norm(1.0),
    ...                  optim.adamw(optim.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100), mask=optim.decay_mask))
    >>> params = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    >>> state = tx.init(params)
    >>> params, state = optim.apply_gradients(tx, {"w": torch.ones(2, 2), "b": torch.ones(2)}, state, params)
    >>> sorted(optim.stats(state))
    ['grad_norm', 'learning_rate']
"""

from functrain.optim.base import STAT_FIELDS, GradientTransformation, apply_gradients, apply_updates, stats
from functrain.optim.combinators import (
    AccumulateState,
    ClipByGlobalNormState,
    EmaState,
    EmptyState,
    MaskedState,
    MultiTransformState,
    SkipNonfiniteState,
    accumulate,
    chain,
    clip_by_global_norm,
    clip_by_value,
    decay_mask,
    ema,
    ema_params,
    global_norm,
    masked,
    multi_transform,
    set_to_zero,
    skip_nonfinite,
)
from functrain.optim.optimizers import AdamState, SgdState, adam, adamw, sgd
from functrain.optim.schedules import (
    ScalarOrSchedule,
    Schedule,
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    join_schedules,
    linear_schedule,
    multistep_schedule,
    piecewise_constant_schedule,
    step_schedule,
    warmup_cosine_decay_schedule,
)

__all__ = [
    # contract
    "GradientTransformation",
    "STAT_FIELDS",
    "apply_gradients",
    "apply_updates",
    "stats",
    # optimizers
    "sgd",
    "adam",
    "adamw",
    "SgdState",
    "AdamState",
    # combinators
    "chain",
    "clip_by_global_norm",
    "clip_by_value",
    "global_norm",
    "skip_nonfinite",
    "accumulate",
    "masked",
    "multi_transform",
    "set_to_zero",
    "decay_mask",
    "ema",
    "ema_params",
    "EmptyState",
    "ClipByGlobalNormState",
    "SkipNonfiniteState",
    "AccumulateState",
    "MaskedState",
    "MultiTransformState",
    "EmaState",
    # schedules
    "Schedule",
    "ScalarOrSchedule",
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
