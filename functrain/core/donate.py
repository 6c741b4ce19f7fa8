"""Donated steps: a compiled step that writes the new state into the input state's tensors.

A pure step keeps the old and the new params, buffers and optimizer state alive at once:
twice the memory of an in-place PyTorch loop. :func:`donate` compiles a step whose graph
ends with ``old.copy_(new)`` for every tensor of ``params``, ``buffers`` and
``opt_state``; inductor writes the results straight into the input buffers, so the peak
matches an in-place loop. The returned state holds those same tensors (now updated).

The caller gives the input state away ("donates" it, as in ``jax.jit(donate_argnums=0)``).
The donated state object is marked as consumed: its ``params``, ``buffers`` and
``opt_state`` are replaced by a :class:`Donated` marker that raises a clear error on any
use, so a stale reference fails loudly instead of silently reading the updated values.
(Tensors or dicts you took out of the state *before* the call still alias the new state.)

The values are bitwise equal to :func:`functrain.jit` of the same step; the default
(:func:`functrain.jit`) stays pure.

Example:
    >>> import torch, functrain as ft
    >>> from functrain.core.donate import donate
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = ft.optim.sgd(0.1)
    >>> step = donate(ft.make_train_step(model, lambda f, b: f(b).square().mean(), opt))
    >>> state = ft.TrainState.create(model, opt)
    >>> new = step(state, torch.ones(4, 2))           # doctest: +SKIP
    >>> state.params                                  # doctest: +SKIP
    Traceback (most recent call last):
    RuntimeError: this TrainState was donated to jit_donated(train_step) ...
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.utils._pytree as pytree

from functrain.core.state import TrainState
from functrain.core.step import Batch, Step

__all__ = ["donate", "Donated", "is_donated", "DONATED_FIELDS"]

DONATED_FIELDS = ("params", "buffers", "opt_state")
"""The fields of a :class:`TrainState` whose tensors a donated step overwrites in place."""


class Donated:
    """Marker left in a state that was given to a donated step; any use raises.

    ``bool(marker)``, indexing, iteration, attribute access and ``.values()`` all raise
    ``RuntimeError`` naming the step and the fix (use the state the step returned).
    """

    __slots__ = ("_by", "_field")

    def __init__(self, by: str, field: str) -> None:
        object.__setattr__(self, "_by", by)
        object.__setattr__(self, "_field", field)

    def _fail(self, *_: Any, **__: Any) -> Any:
        raise RuntimeError(
            f"this TrainState was donated to {self._by}: its {self._field} now live in the state that call "
            "returned. Use the returned state (state = step(state, batch)), or call functrain.jit(step) "
            "instead of donate(step) if you need to keep the old state."
        )

    def __getattr__(self, name: str) -> Any:
        self._fail()

    __getitem__ = __iter__ = __len__ = __bool__ = __contains__ = _fail

    def __repr__(self) -> str:
        return f"<donated to {self._by}>"


def is_donated(state: TrainState) -> bool:
    """True if ``state`` was given to a donated step and must not be used any more."""
    return any(isinstance(state.__dict__.get(f), Donated) for f in DONATED_FIELDS)


def _check_not_donated(state: Any, who: str) -> None:
    if not isinstance(state, TrainState):
        raise TypeError(f"{who}: expected a functrain.TrainState as first argument, got {type(state).__name__}")
    for f in DONATED_FIELDS:
        marker = state.__dict__.get(f)
        if isinstance(marker, Donated):
            marker._fail()


def _donated_leaves(state: TrainState) -> tuple[list[Any], list[Any]]:
    """The flat leaves and specs of the donated fields, in torch pytree order."""
    leaves, specs = [], []
    for f in DONATED_FIELDS:
        lv, spec = pytree.tree_flatten(getattr(state, f))
        leaves.append(lv)
        specs.append(spec)
    return leaves, specs


def _write_back(old: TrainState, new: TrainState, who: str) -> TrainState:
    """Inside the graph: copy the new donated tensors into the old ones; return the rest."""
    old_leaves, old_specs = _donated_leaves(old)
    new_leaves, new_specs = _donated_leaves(new)
    for f, so, sn, lo, ln in zip(DONATED_FIELDS, old_specs, new_specs, old_leaves, new_leaves):
        if so != sn:
            raise ValueError(f"{who}: the step changed the structure of state.{f}, so its results cannot be written "
                             "into the input's tensors; use functrain.jit(step) for this step")
        for i, (a, b) in enumerate(zip(lo, ln)):
            if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
                raise ValueError(f"{who}: state.{f} leaf {i} changed between a tensor and a non-tensor")
            if not isinstance(a, torch.Tensor) or a is b:
                continue
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                raise ValueError(
                    f"{who}: state.{f} leaf {i} changed from {a.dtype}{tuple(a.shape)} to {b.dtype}{tuple(b.shape)}; "
                    "a donated step must keep shapes, dtypes and devices; use functrain.jit(step) instead"
                )
            a.copy_(b)
    return new.replace(**{f: None for f in DONATED_FIELDS})


def donate(step: Step, *, fullgraph: bool = True, dynamic: bool | None = False, **compile_kwargs: Any) -> Step:
    """Compile ``step`` so that it overwrites the input state's params, buffers and opt_state.

    ``step`` is an uncompiled :class:`~functrain.Step` (as given to :func:`functrain.jit`;
    the keyword arguments are passed to ``torch.compile``). The returned step:

    - computes exactly what ``functrain.jit(step)`` computes (bitwise);
    - writes the new ``params``, ``buffers`` and ``opt_state`` into the input's tensors
      inside the compiled graph (no second copy of the state is ever alive), and returns a
      state holding those tensors, with the new counters, rng and metrics;
    - marks the input state as donated: using it afterwards (reading its params, passing
      it to a step, saving it) raises ``RuntimeError``.

    Only the three fields above are donated; counters, rng and metrics are small and new.
    A step that changes the structure, shape or dtype of any donated tensor is refused.
    """
    if not isinstance(step, Step):
        raise TypeError(f"donate takes a functrain Step, got {type(step).__name__}; wrap a plain (state, batch) -> "
                        "state function with functrain.Step(fn)")
    name = f"jit_donated({step.name})"
    body = step.fn

    def graph(state: TrainState, batch: Batch) -> TrainState:
        return _write_back(state, body(state, batch), name)

    compiled = torch.compile(graph, fullgraph=fullgraph, dynamic=dynamic, **compile_kwargs)

    def run(state: TrainState, batch: Batch) -> TrainState:
        _check_not_donated(state, name)
        rest = compiled(state, batch)
        new = rest.replace(**{f: _same_tensors(getattr(state, f)) for f in DONATED_FIELDS})
        for f in DONATED_FIELDS:
            object.__setattr__(state, f, Donated(name, f))
        return new

    return dataclasses.replace(step, fn=run, name=name)


def _same_tensors(tree: Any) -> Any:
    """A new container tree holding the same (now updated) tensor objects."""
    leaves, spec = pytree.tree_flatten(tree)
    return pytree.tree_unflatten(leaves, spec)


def jit_donated(step: Step, **compile_kwargs: Any) -> Step:
    """Alias of :func:`donate`, named like :func:`functrain.jit`."""
    return donate(step, **compile_kwargs)


__all__.append("jit_donated")
