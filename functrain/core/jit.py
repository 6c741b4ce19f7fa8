"""Compiling a whole step into one graph.

Example:
    >>> import torch, functrain as ft
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = ft.optim.sgd(0.1)
    >>> step = ft.jit(ft.make_train_step(model, lambda f, b: f(b).square().mean(), opt))
    >>> state = step(ft.TrainState.create(model, opt), torch.ones(4, 2))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from functrain.core.step import Step

__all__ = ["jit"]


def jit(step: Step, *, fullgraph: bool = True, dynamic: bool | None = False, **compile_kwargs: Any) -> Step:
    """``torch.compile`` of the step's body, ``fullgraph=True``: one graph, or an error.

    Counters and changing hyperparameters in the state are 0-d tensors, so calling the
    compiled step again never recompiles as long as the batch keeps its shapes and
    dtypes. ``dynamic=False`` by default: a batch of a new shape (a last, smaller batch)
    compiles a second graph for that shape rather than a slower dynamic-shape graph.
    The RNG wrapper stays outside the graph: the compiled body draws from torch's
    generators, which the call seeds from ``state.rng``. Compiled and eager runs draw
    different random numbers (inductor generates its own), so their trajectories with
    dropout differ; each is reproducible on its own.
    """
    if not isinstance(step, Step):
        raise TypeError(f"jit takes a functrain Step, got {type(step).__name__}; wrap a plain (state, batch) -> state "
                        "function with functrain.Step(fn)")
    compiled = torch.compile(step.fn, fullgraph=fullgraph, dynamic=dynamic, **compile_kwargs)
    return dataclasses.replace(step, fn=compiled, name=f"jit({step.name})")
