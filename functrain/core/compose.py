"""Composing steps: one after another, several per call.

Example:
    >>> import torch, functrain as ft
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = ft.optim.sgd(0.1)
    >>> loss = lambda f, b: f(b).square().mean()
    >>> train = ft.make_train_step(model, loss, opt)
    >>> two = ft.repeat(train, 2)                    # batch has a leading dim of 2
    >>> state = two(ft.TrainState.create(model, opt), torch.ones(2, 4, 2))
    >>> int(state.step)
    2
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from functrain.core.state import TrainState
from functrain.core.step import Batch, Step
from functrain.core.struct import NAMESPACE

__all__ = ["compose", "repeat"]


def compose(*steps: Step) -> Step:
    """A step that runs ``steps`` in order on the same batch: ``compose(f, g)(s, b) == g(f(s, b), b)``.

    Randomness is drawn once for the whole composition from the input key, so the result
    is still a pure function of ``(state, batch)``; compile the composition with
    :func:`functrain.jit` to get one graph.
    """
    if not steps:
        raise ValueError("compose needs at least one step")
    for s in steps:
        if not isinstance(s, Step):
            raise TypeError(f"compose takes functrain Steps, got {type(s).__name__}; wrap a plain function with "
                            "functrain.Step(fn)")

    def body(state: TrainState, batch: Batch) -> TrainState:
        for s in steps:
            state = s.fn(state, batch)
        return state

    return Step(body, name="compose(" + ", ".join(s.name for s in steps) + ")",
                uses_rng=any(s.uses_rng for s in steps))


def _index(batch: Batch, i: int) -> Any:
    return optree.tree_map(lambda x: x[i] if isinstance(x, torch.Tensor) else x, batch, namespace=NAMESPACE)


def repeat(step: Step, k: int) -> Step:
    """A step that applies ``step`` ``k`` times per call, to ``batch[0]``, ..., ``batch[k-1]``.

    Every tensor of the batch has a leading dimension of ``k`` (stacked batches). With
    :func:`functrain.jit` the ``k`` steps become one graph and one Python call.
    """
    if k < 1:
        raise ValueError(f"repeat needs k >= 1, got {k}")

    def body(state: TrainState, batch: Batch) -> TrainState:
        for i in range(k):
            state = step.fn(state, _index(batch, i))
        return state

    return Step(body, name=f"repeat({step.name}, {k})", uses_rng=step.uses_rng)
