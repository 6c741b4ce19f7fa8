"""Transformations that wrap or compose others: chain, clipping, skipping, accumulation, masks, EMA.

Every combinator forwards ``step`` (the exact final update of :mod:`functrain.optim.optimizers`)
so that ``chain(clip_by_global_norm(1.0), adamw(...))`` stays bitwise equal to
``clip_grad_norm_`` + ``torch.optim.AdamW``. Conditional behaviour (skip a non-finite step,
apply every k-th call) is branch-free: both outcomes are computed and ``torch.where`` picks
one, so a compiled step is one graph.

Example:
    >>> import torch
    >>> from functrain import optim
    >>> tx = optim.skip_nonfinite(optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1)))
    >>> params = {"w": torch.ones(2)}
    >>> state = tx.init(params)
    >>> params, state = optim.apply_gradients(tx, {"w": torch.tensor([float("nan"), 0.0])}, state, params)
    >>> params["w"].tolist(), int(optim.stats(state)["skipped"])
    ([1.0, 1.0], 1)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional

import torch

from functrain.core.struct import find_first
from functrain.optim import _tree
from functrain.optim.base import GradientTransformation, apply_updates

__all__ = [
    "EmptyState",
    "ClipByGlobalNormState",
    "SkipNonfiniteState",
    "AccumulateState",
    "MaskedState",
    "MultiTransformState",
    "EmaState",
    "chain",
    "clip_by_global_norm",
    "clip_by_value",
    "skip_nonfinite",
    "accumulate",
    "masked",
    "multi_transform",
    "set_to_zero",
    "ema",
    "ema_params",
    "decay_mask",
    "global_norm",
]


class EmptyState(NamedTuple):
    """State of a stateless transformation."""


class ClipByGlobalNormState(NamedTuple):
    """``grad_norm``: the global norm of the last gradients, before clipping."""

    grad_norm: torch.Tensor


class SkipNonfiniteState(NamedTuple):
    """``inner`` state and ``skipped``: how many calls had a non-finite gradient (0-d int64)."""

    inner: Any
    skipped: torch.Tensor


class AccumulateState(NamedTuple):
    """``inner`` state, summed micro-gradients, calls since the last update, ``applied`` (1 if this call updated)."""

    inner: Any
    grad_sum: Any
    mini_step: torch.Tensor
    applied: torch.Tensor


class MaskedState(NamedTuple):
    """State of the inner transformation over the masked params only."""

    inner: Any


class MultiTransformState(NamedTuple):
    """``{label: state}`` for every label that has params."""

    inner: dict


class EmaState(NamedTuple):
    """``inner`` state and ``ema``: the exponential moving average of params after each update."""

    inner: Any
    ema: Any


def _apply(tx: GradientTransformation, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
    if tx.step is not None:
        return tx.step(grads, state, params)
    updates, state = tx.update(grads, state, params)
    return apply_updates(params, updates), state


def _where(cond: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``cond`` (a 0-d bool tensor) else ``old``, leaf by leaf (branch-free)."""
    return _tree.tree_map(lambda n, o: None if n is None else torch.where(cond, n, o), new, old)


# ----------------------------------------------------------------------------- chain


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the last one's ``step`` makes the new params.

    The state is a tuple of the inner states.
    """
    if not transforms:
        raise ValueError("chain() needs at least one transformation")

    def init(params: Any) -> tuple:
        return tuple(tx.init(params) for tx in transforms)

    def update(grads: Any, state: tuple, params: Any = None) -> tuple[Any, tuple]:
        new_states = []
        for tx, s in zip(transforms, state):
            grads, s = tx.update(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)

    def step(grads: Any, state: tuple, params: Any) -> tuple[Any, tuple]:
        new_states = []
        for tx, s in zip(transforms[:-1], state[:-1]):
            grads, s = tx.update(grads, s, params)
            new_states.append(s)
        params, s = _apply(transforms[-1], grads, state[-1], params)
        return params, tuple(new_states) + (s,)

    return GradientTransformation(init, update, step)


# ----------------------------------------------------------------------------- clipping


def global_norm(tree: Any) -> torch.Tensor:
    """The 2-norm of all leaves, as ``torch.nn.utils.get_total_norm`` computes it (foreach)."""
    grads = _tree.leaves(tree)
    by_dtype: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.device, g.dtype), []).append(g)
    norms: list[torch.Tensor] = []
    for group in by_dtype.values():
        norms.extend(torch._foreach_norm(group, 2.0))
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), 2.0)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale gradients by ``min(max_norm / (norm + 1e-6), 1)``: ``torch.nn.utils.clip_grad_norm_``.

    The state's ``grad_norm`` holds the norm before clipping (for logging via ``stats``).
    """
    max_norm = float(max_norm)

    def init(params: Any) -> ClipByGlobalNormState:
        first = _tree.leaves(params)[0]
        return ClipByGlobalNormState(torch.zeros((), dtype=first.dtype, device=first.device))

    def update(grads: Any, state: ClipByGlobalNormState, params: Any = None) -> tuple[Any, ClipByGlobalNormState]:
        total = global_norm(grads)
        coef = _tree.computed_once(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return _tree.tree_map(lambda g: g * coef.to(g.device), grads), ClipByGlobalNormState(total)

    return GradientTransformation(init, update)


def clip_by_value(max_delta: float) -> GradientTransformation:
    """Clamp each gradient element to ``[-max_delta, max_delta]``: ``clip_grad_value_``."""

    def update(grads: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        return _tree.tree_map(lambda g: g.clamp(min=-max_delta, max=max_delta), grads), state

    return GradientTransformation(lambda params: EmptyState(), update)


# ----------------------------------------------------------------------------- conditional


def _all_finite(tree: Any) -> torch.Tensor:
    return torch.stack([torch.isfinite(g).all() for g in _tree.leaves(tree)]).all()


def skip_nonfinite(inner: GradientTransformation) -> GradientTransformation:
    """Skip a call whose gradients contain inf or NaN: params and ``inner`` state stay unchanged.

    Branch-free (``torch.where``); the state counts ``skipped`` calls. Put it outermost so a
    skipped call also leaves clipping and accumulation state unchanged.
    """

    def init(params: Any) -> SkipNonfiniteState:
        first = _tree.leaves(params)[0]
        return SkipNonfiniteState(inner.init(params), torch.zeros((), dtype=torch.int64, device=first.device))

    def skipped(finite: torch.Tensor, state: SkipNonfiniteState) -> torch.Tensor:
        return state.skipped + (~finite).to(torch.int64)

    def update(grads: Any, state: SkipNonfiniteState, params: Any = None) -> tuple[Any, SkipNonfiniteState]:
        finite = _all_finite(grads)
        updates, new_inner = inner.update(grads, state.inner, params)
        updates = _tree.tree_map(lambda u: torch.where(finite, u, torch.zeros_like(u)), updates)
        return updates, SkipNonfiniteState(_where(finite, new_inner, state.inner), skipped(finite, state))

    def step(grads: Any, state: SkipNonfiniteState, params: Any) -> tuple[Any, SkipNonfiniteState]:
        finite = _all_finite(grads)
        new_params, new_inner = _apply(inner, grads, state.inner, params)
        new_params, new_inner = _where(finite, (new_params, new_inner), (params, state.inner))
        return new_params, SkipNonfiniteState(new_inner, skipped(finite, state))

    return GradientTransformation(init, update, step)


def accumulate(inner: GradientTransformation, every: int) -> GradientTransformation:
    """Average ``every`` micro-gradients and apply ``inner`` on every ``every``-th call (optax ``MultiSteps``).

    The mean is ``sum(micro_grads) / every``. Other calls leave params and the ``inner``
    state unchanged. ``state.applied`` is 1 on calls that updated, else 0 (add it to the
    optimizer-step counter). Branch-free: ``inner`` is evaluated on every call and its
    result selected with ``torch.where``.
    """
    if every < 1:
        raise ValueError(f"accumulate: every must be >= 1, got {every}")

    def init(params: Any) -> AccumulateState:
        first = _tree.leaves(params)[0]
        zero = torch.zeros((), dtype=torch.int64, device=first.device)
        return AccumulateState(inner.init(params), _tree.zeros_like(params), zero, zero)

    def advance(grads: Any, state: AccumulateState) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
        grad_sum = _tree.tree_map(torch.add, state.grad_sum, grads)
        mini_step = state.mini_step + 1
        apply = mini_step >= every
        mean = _tree.tree_map(lambda s: s / every, grad_sum)
        return grad_sum, mean, mini_step, apply

    def finish(apply: torch.Tensor, grad_sum: Any, mini_step: torch.Tensor, inner_state: Any) -> AccumulateState:
        return AccumulateState(
            inner_state,
            _tree.tree_map(lambda s: torch.where(apply, torch.zeros_like(s), s), grad_sum),
            torch.where(apply, torch.zeros_like(mini_step), mini_step),
            apply.to(torch.int64),
        )

    def update(grads: Any, state: AccumulateState, params: Any = None) -> tuple[Any, AccumulateState]:
        grad_sum, mean, mini_step, apply = advance(grads, state)
        updates, new_inner = inner.update(mean, state.inner, params)
        updates = _tree.tree_map(lambda u: torch.where(apply, u, torch.zeros_like(u)), updates)
        return updates, finish(apply, grad_sum, mini_step, _where(apply, new_inner, state.inner))

    def step(grads: Any, state: AccumulateState, params: Any) -> tuple[Any, AccumulateState]:
        grad_sum, mean, mini_step, apply = advance(grads, state)
        new_params, new_inner = _apply(inner, mean, state.inner, params)
        new_params, new_inner = _where(apply, (new_params, new_inner), (params, state.inner))
        return new_params, finish(apply, grad_sum, mini_step, new_inner)

    return GradientTransformation(init, update, step)


# ----------------------------------------------------------------------------- masks and groups


def decay_mask(params: Any, min_ndim: int = 2) -> Any:
    """True for params with at least ``min_ndim`` dims: the usual "no weight decay on biases and norms".

    Use as ``adamw(..., mask=decay_mask)``: matrices and conv kernels decay; biases,
    LayerNorm/BatchNorm weights (all 1-d) and scalars do not.
    """
    return _tree.tree_map(lambda p: p.dim() >= min_ndim, params)


def _split(named: dict[str, Any], labels: dict[str, Any], label: Any) -> dict[str, Any]:
    return {k: v for k, v in named.items() if labels[k] == label}


def multi_transform(transforms: Mapping[Any, GradientTransformation], param_labels: Any) -> GradientTransformation:
    """A different transformation per group of params: ``transforms[label]`` for params labelled ``label``.

    ``param_labels`` is a tree of labels like params, or a function of params returning one.
    Each inner transformation sees a flat dict ``{name: tensor}`` of its params (names are
    the dict keys for a flat params dict), like a ``torch.optim`` param group.

    Example: ``multi_transform({"decay": adamw(1e-3), "frozen": set_to_zero()}, labels)``.
    """

    def labels_of(params: Any) -> dict[str, Any]:
        labels = _tree.resolve(param_labels, params, "multi_transform param_labels")
        unknown = sorted({str(v) for v in labels.values() if v not in transforms})
        if unknown:
            raise ValueError(f"multi_transform: labels {unknown} have no transformation; known: {list(transforms)}")
        return labels

    def groups(tree: Any, labels: dict[str, Any]) -> dict[Any, dict[str, Any]]:
        named = _tree.named_leaves(tree)[0]
        present = dict.fromkeys(labels.values())
        return {label: _split(named, labels, label) for label in transforms if label in present}

    def init(params: Any) -> MultiTransformState:
        parts = groups(params, labels_of(params))
        return MultiTransformState({label: transforms[label].init(p) for label, p in parts.items()})

    def run(grads: Any, state: MultiTransformState, params: Any, fn: Callable) -> tuple[Any, MultiTransformState]:
        named, spec = _tree.named_leaves(grads)
        labels = labels_of(params if params is not None else grads)
        g_parts = groups(grads, labels)
        p_parts = groups(params, labels) if params is not None else dict.fromkeys(g_parts)
        out: dict[str, Any] = {}
        new_states = {}
        for label, g in g_parts.items():
            out_part, new_states[label] = fn(transforms[label], g, state.inner[label], p_parts[label])
            out.update(out_part)
        return _tree.unflatten_named({k: out[k] for k in named}, spec), MultiTransformState(new_states)

    def update(grads: Any, state: MultiTransformState, params: Any = None) -> tuple[Any, MultiTransformState]:
        return run(grads, state, params, lambda tx, g, s, p: tx.update(g, s, p))

    def step(grads: Any, state: MultiTransformState, params: Any) -> tuple[Any, MultiTransformState]:
        return run(grads, state, params, _apply)

    return GradientTransformation(init, update, step)


def set_to_zero() -> GradientTransformation:
    """Zero updates: the params it sees stay frozen (use inside :func:`multi_transform`)."""

    def update(grads: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        return _tree.tree_map(torch.zeros_like, grads), state

    def step(grads: Any, state: EmptyState, params: Any) -> tuple[Any, EmptyState]:
        return params, state

    return GradientTransformation(lambda params: EmptyState(), update, step)


def masked(inner: GradientTransformation, mask: Any) -> GradientTransformation:
    """``inner`` on params where ``mask`` is True; elsewhere gradients pass through unchanged (optax).

    As the final transformation, unmasked params therefore get ``params + grads``, as with
    optax's ``masked`` + ``apply_updates``. To freeze params instead, use
    ``multi_transform({True: inner, False: set_to_zero()}, mask)``.
    """
    passthrough = GradientTransformation(lambda params: EmptyState(), lambda g, s, p=None: (g, s))
    tx = multi_transform({True: inner, False: passthrough}, lambda params: _bool_labels(mask, params))

    def init(params: Any) -> MaskedState:
        return MaskedState(tx.init(params))

    def update(grads: Any, state: MaskedState, params: Any = None) -> tuple[Any, MaskedState]:
        updates, s = tx.update(grads, state.inner, params)
        return updates, MaskedState(s)

    def step(grads: Any, state: MaskedState, params: Any) -> tuple[Any, MaskedState]:
        new_params, s = tx.step(grads, state.inner, params)
        return new_params, MaskedState(s)

    return GradientTransformation(init, update, step)


def _bool_labels(mask: Any, params: Any) -> Any:
    named = _tree.resolve(mask, params, "masked mask")
    _, spec = _tree.named_leaves(params)
    return _tree.unflatten_named({k: bool(v) for k, v in named.items()}, spec)


# ----------------------------------------------------------------------------- EMA


def ema(inner: GradientTransformation, decay: float = 0.999) -> GradientTransformation:
    """Keep ``ema = decay * ema + (1 - decay) * params`` of the params after each update.

    Computed as ``ema.lerp(new_params, 1 - decay)``; starts at the initial params. Read it
    with :func:`ema_params`. Under :func:`accumulate` or :func:`skip_nonfinite`, wrap
    ``inner`` with ``ema`` inside them so the average moves only on applied updates.
    """

    def init(params: Any) -> EmaState:
        return EmaState(inner.init(params), _tree.tree_map(torch.clone, params))

    def update(grads: Any, state: EmaState, params: Any = None) -> tuple[Any, EmaState]:
        if params is None:
            raise ValueError("ema needs params: call update(grads, state, params)")
        updates, new_inner = inner.update(grads, state.inner, params)
        new_params = apply_updates(params, updates)
        return updates, EmaState(new_inner, _tree.tree_map(lambda e, p: e.lerp(p, 1 - decay), state.ema, new_params))

    def step(grads: Any, state: EmaState, params: Any) -> tuple[Any, EmaState]:
        new_params, new_inner = _apply(inner, grads, state.inner, params)
        new_ema = _tree.tree_map(lambda e, p: e.lerp(p, 1 - decay), state.ema, new_params)
        return new_params, EmaState(new_inner, new_ema)

    return GradientTransformation(init, update, step)


def ema_params(opt_state: Any) -> Optional[Any]:
    """The EMA params held by the first :func:`ema` state inside ``opt_state``, or None."""
    found = find_first(opt_state, lambda node: isinstance(node, EmaState))
    return None if found is None else found.ema
