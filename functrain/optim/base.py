"""The optimizer contract: optax's ``GradientTransformation``, plus an exact final step.

An optimizer is a pair of pure functions on pytrees (dicts) of tensors::

    init(params) -> opt_state
    update(updates, opt_state, params) -> (updates, opt_state)      # optax's contract

and, for optimizers whose last operation must follow ``torch.optim``'s op order to be
bitwise equal to it, an optional third one::

    step(grads, opt_state, params) -> (new_params, opt_state)

``apply_gradients`` uses ``step`` when the transformation has one, else ``update``
followed by ``params + updates``. Combinators (``chain``, masks, wrappers) forward ``step``
so that exactness survives composition.

Every state is a NamedTuple (or a functrain struct) of tensors: no Python numbers that
change, so compiled steps never recompile. Fields named in :data:`STAT_FIELDS` are
collected by :func:`stats` for logging.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch

__all__ = ["GradientTransformation", "apply_gradients", "apply_updates", "stats", "STAT_FIELDS"]

Params = dict[str, torch.Tensor]
Updates = dict[str, torch.Tensor]
OptState = Any


class GradientTransformation(NamedTuple):
    """``init``/``update`` as in optax; ``step`` computes new params exactly (optional)."""

    init: Callable[[Params], OptState]
    update: Callable[[Updates, OptState, Optional[Params]], tuple[Updates, OptState]]
    step: Optional[Callable[[Updates, OptState, Params], tuple[Params, OptState]]] = None


STAT_FIELDS = ("learning_rate", "grad_norm", "skipped", "applied")
"""State fields that :func:`stats` reports (the first one found of each name)."""


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates``, leaf by leaf, keeping each param's dtype."""
    return {k: (p + updates[k]).to(p.dtype) for k, p in params.items()}


def apply_gradients(
    tx: GradientTransformation, grads: Updates, opt_state: OptState, params: Params
) -> tuple[Params, OptState]:
    """New params and optimizer state from gradients: the one call a train step makes."""
    if tx.step is not None:
        return tx.step(grads, opt_state, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return apply_updates(params, updates), opt_state


def stats(opt_state: OptState) -> dict[str, torch.Tensor]:
    """Loggable scalars found in an optimizer state (``learning_rate``, ``grad_norm``...)."""
    found: dict[str, torch.Tensor] = {}

    def visit(x: Any) -> None:
        fields = getattr(x, "_fields", None)
        if fields is None and hasattr(x, "__functrain_struct__"):
            fields = x.__functrain_struct__[0]
        if fields is not None:
            for name in fields:
                value = getattr(x, name)
                if name in STAT_FIELDS and isinstance(value, torch.Tensor) and value.dim() == 0:
                    found.setdefault(name, value)
                else:
                    visit(value)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(opt_state)
    return found
