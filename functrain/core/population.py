"""Populations: N training runs in one step with :func:`torch.func.vmap` over a stacked state.

Stack N states (different seeds, initialisations or learning-rate scales) into one state
whose every tensor has a leading dimension N, and run one vmapped step on it: one Python
call, one compiled graph, N runs. Each member computes what the same step computes on
that member alone (up to floating-point reassociation in batched kernels).

A hyperparameter that differs between members must be a tensor in the state, not a Python
float closed over by the optimizer: wrap the optimizer with :func:`lr_scale` and set each
member's scale with :func:`set_lr_scale` before stacking.

Randomness (dropout): torch has one generator per device, not one per member, so
``randomness="different"`` gives each member independent random numbers and ``"same"``
gives all members the same ones; neither reproduces the numbers a member would draw when
trained alone. Members are exactly comparable with solo runs only for steps that draw no
random numbers.

Example:
    >>> import torch, functrain as ft
    >>> from functrain.core import population as pop
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = pop.lr_scale(ft.optim.sgd(0.1))
    >>> members = [pop.set_lr_scale(ft.TrainState.create(model, opt, seed=i), s) for i, s in enumerate([1.0, 0.5])]
    >>> step = pop.population_step(ft.make_train_step(model, lambda f, b: f(b).square().mean(), opt))
    >>> state = step(pop.stack_states(members), torch.ones(4, 2))
    >>> [int(s.step) for s in pop.unstack_state(state)]
    [1, 1]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch.func import vmap

from functrain.core import rng as _rng
from functrain.core.state import TrainState
from functrain.core.step import Batch, Step
from functrain.optim.base import GradientTransformation, apply_updates

__all__ = [
    "stack_states",
    "unstack_state",
    "population_size",
    "population_step",
    "PopulationStep",
    "LrScaleState",
    "lr_scale",
    "set_lr_scale",
]


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """One state whose tensors stack the members' tensors along a new leading dimension.

    All members must have the same tree structure, shapes and dtypes (the same model and
    optimizer); counters, rng keys, metrics are stacked like the params.
    """
    if not states:
        raise ValueError("stack_states needs at least one state")
    flat = [pytree.tree_flatten(s) for s in states]
    spec = flat[0][1]
    for i, (_, sp) in enumerate(flat[1:], start=1):
        if sp != spec:
            raise ValueError(f"stack_states: member {i} has a different tree structure from member 0 "
                             "(different model, optimizer or metrics); build all members the same way")
    stacked = []
    for j, leaf in enumerate(flat[0][0]):
        column = [f[0][j] for f in flat]
        if isinstance(leaf, torch.Tensor):
            shapes = {(tuple(t.shape), t.dtype) for t in column}
            if len(shapes) != 1:
                raise ValueError(f"stack_states: leaf {j} differs in shape/dtype between members: "
                                 f"{sorted(map(str, shapes))}")
            stacked.append(torch.stack(column))
        else:
            stacked.append(leaf)
    return pytree.tree_unflatten(stacked, spec)


def population_size(state: TrainState) -> int:
    """N, the leading dimension of a stacked state."""
    if state.rng.dim() != 2:
        raise ValueError(f"not a stacked state: rng has shape {tuple(state.rng.shape)}, expected (N, 2); "
                         "make one with stack_states")
    return int(state.rng.shape[0])


def unstack_state(state: TrainState) -> list[TrainState]:
    """The N member states of a stacked state (views into it; clone to keep them apart)."""
    n = population_size(state)
    leaves, spec = pytree.tree_flatten(state)
    return [pytree.tree_unflatten([x[i] if isinstance(x, torch.Tensor) else x for x in leaves], spec)
            for i in range(n)]


def population_step(step: Step, *, batch_axis: int | None = None, randomness: str = "different") -> Step:
    """``step`` applied to every member of a stacked state, with :func:`torch.func.vmap`.

    Args:
        step: an uncompiled :class:`~functrain.Step` (compile the result with
            :func:`functrain.jit`: one graph for the whole population).
        batch_axis: ``None`` to give every member the same batch, ``0`` when every tensor of
            the batch has a leading member dimension N (one batch per member).
        randomness: ``"different"`` (independent random numbers per member) or ``"same"``;
            see the module docs. ``"error"`` refuses steps that draw random numbers.

    The call seeds torch's generators from all the members' keys, so the population step
    is a pure function of ``(stacked_state, batch)`` too.
    """
    if not isinstance(step, Step):
        raise TypeError(f"population_step takes a functrain Step, got {type(step).__name__}")
    if randomness not in ("different", "same", "error"):
        raise ValueError(f"randomness must be 'different', 'same' or 'error', got {randomness!r}")
    body = _VmappedBody(step.fn, batch_axis, randomness)
    return PopulationStep(body, name=f"population({step.name})", uses_rng=step.uses_rng)


class _VmappedBody:
    """``vmap`` of a step body over the tensor leaves of the state (non-tensor leaves, such as
    ``None`` fields, are passed through unbatched)."""

    def __init__(self, fn: Any, batch_axis: int | None, randomness: str) -> None:
        self.fn, self.batch_axis, self.randomness = fn, batch_axis, randomness

    def __call__(self, state: TrainState, batch: Batch) -> TrainState:
        leaves, spec = pytree.tree_flatten(state)
        is_t = [isinstance(x, torch.Tensor) for x in leaves]
        tensors = [x for x, t in zip(leaves, is_t) if t]
        out_meta: dict[str, Any] = {}

        def flat_fn(tensors: list[torch.Tensor], batch: Batch) -> list[torch.Tensor]:
            it = iter(tensors)
            member = pytree.tree_unflatten([next(it) if t else x for x, t in zip(leaves, is_t)], spec)
            out_leaves, out_spec = pytree.tree_flatten(self.fn(member, batch))
            out_meta["spec"] = out_spec
            out_meta["leaves"] = out_leaves
            return [x for x in out_leaves if isinstance(x, torch.Tensor)]

        out = vmap(flat_fn, in_dims=(0, self.batch_axis), randomness=self.randomness)(tensors, batch)
        it = iter(out)
        merged = [next(it) if isinstance(x, torch.Tensor) else x for x in out_meta["leaves"]]
        return pytree.tree_unflatten(merged, out_meta["spec"])


@dataclasses.dataclass(frozen=True)
class PopulationStep(Step):
    """A :class:`~functrain.Step` over a stacked state; seeds torch from all the members' keys."""

    def __call__(self, state: TrainState, batch: Batch) -> TrainState:
        if not isinstance(state, TrainState):
            raise TypeError(f"{self.name}: expected a stacked functrain.TrainState, got {type(state).__name__}")
        population_size(state)
        if not self.uses_rng:
            return self.fn(state, batch)
        with _rng.seeded(_population_key(state.rng), 0, state.rng.device):
            return self.fn(state, batch)


def _population_key(keys: torch.Tensor) -> torch.Tensor:
    """One key standing for all the members' keys (folds them in one after another)."""
    k = keys[0].cpu()
    for row in keys[1:].cpu():
        k = _rng.fold_in(k, int(_rng.seed_of(row)))
    return k


# ---------------------------------------------------------------------------------------------
# A learning rate that is state, so that it can differ between members.


class LrScaleState(NamedTuple):
    """State of :func:`lr_scale`: the inner optimizer's state and the learning-rate factor."""

    inner: Any
    scale: torch.Tensor


def lr_scale(inner: GradientTransformation, init_scale: float = 1.0) -> GradientTransformation:
    """``inner`` with its updates multiplied by a per-run factor kept in the optimizer state.

    For SGD, Adam and AdamW (decoupled weight decay included) the update is linear in the
    learning rate, so a factor ``s`` trains exactly like learning rate ``s * lr``
    (up to rounding: the updates are added to the params, optax-style). The factor is a
    0-d float64 tensor: set it with :func:`set_lr_scale`; stacking members with different
    factors gives a population over learning rates.
    """

    def init(params: Any) -> LrScaleState:
        inner_state = inner.init(params)
        leaves = pytree.tree_leaves(params)
        device = leaves[0].device if leaves else None
        return LrScaleState(inner_state, torch.tensor(float(init_scale), dtype=torch.float64, device=device))

    def update(grads: Any, state: LrScaleState, params: Any = None) -> tuple[Any, LrScaleState]:
        updates, inner_state = inner.update(grads, state.inner, params)
        updates = pytree.tree_map(lambda u: u * state.scale.to(u.dtype), updates)
        return updates, LrScaleState(inner_state, state.scale)

    def step(grads: Any, state: LrScaleState, params: Any) -> tuple[Any, LrScaleState]:
        updates, new_state = update(grads, state, params)
        return apply_updates(params, updates), new_state

    return GradientTransformation(init, update, step)


def set_lr_scale(state: TrainState, scale: float) -> TrainState:
    """The state with the learning-rate factor of its :func:`lr_scale` optimizer set to ``scale``."""
    opt = state.opt_state
    if not isinstance(opt, LrScaleState):
        raise TypeError(f"set_lr_scale: the state's optimizer state is {type(opt).__name__}, not LrScaleState; "
                        "wrap the optimizer with functrain.core.population.lr_scale(...)")
    return state.replace(opt_state=opt._replace(scale=torch.full_like(opt.scale, float(scale))))
