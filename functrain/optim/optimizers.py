"""SGD, Adam and AdamW: pure functions whose ``step`` is bitwise equal to ``torch.optim``.

Each optimizer is a :class:`~functrain.optim.base.GradientTransformation`. Its ``step``
follows the op order of ``torch.optim``'s single-tensor and foreach implementations
(``torch/optim/sgd.py``, ``adam.py``) so that, on CPU in float32/float64 with constant
hyperparameters, the params after any number of steps are bitwise equal to theirs.
How that is achieved without Python numbers that change:

- the step count is a 0-d ``int64`` tensor; the learning rate is a 0-d ``float64`` tensor
  (constant or scheduled); bias corrections and Adam's ``step_size`` are computed in
  ``float64`` 0-d tensors, which is the IEEE double arithmetic torch does in Python;
- each scalar is cast to the param's dtype exactly where torch's CPU kernel casts its
  ``Scalar`` argument, and ``param.addcdiv_(m, d, value=s)`` becomes ``p + (s * m) / d``,
  ``param.add_(g, alpha=-lr)`` becomes ``torch.addcmul(p, g, -lr)`` (the same rounding);
- SGD's first momentum step (``buf = grad``) is selected with ``torch.where(count == 0, ...)``.

``update`` gives optax's additive updates (``new_params = params + updates``); adding
them rounds once more than torch does, so :func:`apply_gradients` uses ``step``.

Example:
    >>> import torch
    >>> from functrain.optim import adamw, apply_gradients
    >>> params = {"w": torch.ones(3)}
    >>> tx = adamw(learning_rate=1e-2)
    >>> state = tx.init(params)
    >>> params, state = apply_gradients(tx, {"w": torch.ones(3)}, state, params)
    >>> int(state.count), params["w"][0].item() < 1.0
    (1, True)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from functrain.optim import _tree
from functrain.optim.base import GradientTransformation
from functrain.optim.schedules import ScalarOrSchedule, as_schedule

__all__ = ["SgdState", "AdamState", "sgd", "adam", "adamw"]

_F64 = torch.float64


class SgdState(NamedTuple):
    """State of :func:`sgd`: update count, the last learning rate, the momentum buffers (or None)."""

    count: torch.Tensor
    learning_rate: torch.Tensor
    momentum_buffer: Any


class AdamState(NamedTuple):
    """State of :func:`adam`/:func:`adamw`: count, last learning rate, moments (``max_exp_avg_sq`` or None)."""

    count: torch.Tensor
    learning_rate: torch.Tensor
    exp_avg: Any
    exp_avg_sq: Any
    max_exp_avg_sq: Any


def _first(params: Any) -> torch.Tensor:
    leaves = _tree.leaves(params)
    if not leaves:
        raise ValueError("optimizer init: params has no tensors; pass a dict of tensors keyed like a state_dict")
    return leaves[0]


def _count0(params: Any) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=_first(params).device)


def _decay_flags(mask: Any, params: Any, weight_decay: float) -> dict[str, bool]:
    """``{name: apply weight decay here?}`` (everywhere without a mask, nowhere if it is 0)."""
    names = _tree.named_leaves(params)[0]
    if weight_decay == 0:
        return dict.fromkeys(names, False)
    if mask is None:
        return dict.fromkeys(names, True)
    return {k: bool(v) for k, v in _tree.resolve(mask, params, "weight decay mask").items()}


def _cast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float64 0-d scalar rounded to ``like``'s dtype, as a CPU kernel rounds its Scalar."""
    return x.to(dtype=like.dtype, device=like.device)


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    mask: Optional[Any] = None,
) -> GradientTransformation:
    """Stochastic gradient descent, bitwise equal to ``torch.optim.SGD``.

    Args:
        learning_rate: a float or a schedule (function of the step tensor).
        momentum, dampening, nesterov, weight_decay: as in ``torch.optim.SGD``.
        mask: optional tree of bools (or function of params returning one): weight decay
            applies only where True (e.g. :func:`~functrain.optim.decay_mask`).
    """
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("sgd: nesterov=True needs momentum > 0 and dampening == 0 (as torch.optim.SGD)")
    lr_fn = as_schedule(learning_rate)

    def init(params: Any) -> SgdState:
        count = _count0(params)
        buf = _tree.zeros_like(params) if momentum != 0 else None
        return SgdState(count, lr_fn(count), buf)

    def directions(grads: Any, state: SgdState, params: Any) -> tuple[dict, dict, Any]:
        """torch.optim.SGD's ``grad`` after weight decay and momentum, and the new buffers."""
        g_named, spec = _tree.named_leaves(grads)
        p_named = _tree.named_leaves(params)[0]
        decay = _decay_flags(mask, params, weight_decay)
        bufs = _tree.named_leaves(state.momentum_buffer)[0] if momentum != 0 else {}
        dirs, new_bufs = {}, {}
        for name, g in g_named.items():
            if decay[name]:
                g = g.add(p_named[name], alpha=weight_decay)
            if momentum != 0:
                # torch: buf = grad.clone() on the first step, else buf.mul_(m).add_(grad, alpha=1 - d)
                buf = torch.where(state.count == 0, g, bufs[name].mul(momentum).add(g, alpha=1 - dampening))
                new_bufs[name] = buf
                g = g.add(buf, alpha=momentum) if nesterov else buf
            dirs[name] = g
        return dirs, p_named, (_tree.unflatten_named(new_bufs, spec) if momentum != 0 else None), spec

    def step(grads: Any, state: SgdState, params: Any) -> tuple[Any, SgdState]:
        lr = lr_fn(state.count)
        neg_lr = _tree.computed_once(-lr)
        dirs, p_named, bufs, spec = directions(grads, state, params)
        # torch: param.add_(grad, alpha=-lr); addcmul with a 0-d tensor rounds identically.
        new = {k: torch.addcmul(p_named[k], d, _cast(neg_lr, d)) for k, d in dirs.items()}
        return _tree.unflatten_named(new, spec), SgdState(state.count + 1, lr, bufs)

    def update(grads: Any, state: SgdState, params: Any = None) -> tuple[Any, SgdState]:
        lr = lr_fn(state.count)
        neg_lr = _tree.computed_once(-lr)
        dirs, _, bufs, spec = directions(grads, state, _need_params(params, grads, weight_decay, "sgd"))
        updates = {k: d * _cast(neg_lr, d) for k, d in dirs.items()}
        return _tree.unflatten_named(updates, spec), SgdState(state.count + 1, lr, bufs)

    return GradientTransformation(init, update, step)


def _need_params(params: Any, grads: Any, weight_decay: float, who: str) -> Any:
    if params is None:
        if weight_decay != 0:
            raise ValueError(f"{who} with weight_decay needs params: call update(grads, state, params)")
        return grads
    return params


def _adam(
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    mask: Optional[Any],
    decoupled: bool,
    who: str,
) -> GradientTransformation:
    lr_fn = as_schedule(learning_rate)

    def init(params: Any) -> AdamState:
        count = _count0(params)
        zeros = _tree.zeros_like
        return AdamState(count, lr_fn(count), zeros(params), zeros(params), zeros(params) if amsgrad else None)

    def moments(grads: Any, state: AdamState, params: Any, lr: torch.Tensor):
        """Decayed params (AdamW), new moments, ``-step_size`` and the denominators, per name."""
        g_named, spec = _tree.named_leaves(grads)
        p_named = _tree.named_leaves(params)[0]
        m_named = _tree.named_leaves(state.exp_avg)[0]
        v_named = _tree.named_leaves(state.exp_avg_sq)[0]
        vmax_named = _tree.named_leaves(state.max_exp_avg_sq)[0] if amsgrad else {}
        decay = _decay_flags(mask, params, weight_decay)
        # Python-double arithmetic of torch, in float64 0-d tensors (step is exact below 2**24).
        t = (state.count + 1).to(_F64)
        bias_correction1 = 1 - torch.pow(_tree.scalar(b1, t), t)
        bias_correction2 = 1 - torch.pow(_tree.scalar(b2, t), t)
        # computed_once: the scalars are computed once per call, not in every element's loop
        neg_step_size = _tree.computed_once(-(lr / bias_correction1))
        bias_correction2_sqrt = _tree.computed_once(torch.pow(bias_correction2, _tree.scalar(0.5, t)))
        keep = _tree.computed_once(1 - lr * weight_decay) if decoupled and any(decay.values()) else None
        decayed, new_m, new_v, new_vmax, denoms = {}, {}, {}, {}, {}
        for name, g in g_named.items():
            p = p_named[name]
            if decay[name]:
                if decoupled:
                    p = p.mul(_cast(keep, p))  # param.mul_(1 - lr * weight_decay)
                else:
                    g = g.add(p, alpha=weight_decay)
            decayed[name] = p
            m = m_named[name].lerp(g, 1 - b1)
            v = v_named[name].mul(b2).addcmul(g, g, value=1 - b2)
            new_m[name], new_v[name] = m, v
            if amsgrad:
                v = new_vmax[name] = torch.maximum(vmax_named[name], v)
            denoms[name] = (v.sqrt() / _cast(bias_correction2_sqrt, v)).add(eps)
        unflat = _tree.unflatten_named
        new_state = AdamState(
            state.count + 1, lr, unflat(new_m, spec), unflat(new_v, spec), unflat(new_vmax, spec) if amsgrad else None
        )
        return decayed, new_m, denoms, neg_step_size, new_state, spec

    def step(grads: Any, state: AdamState, params: Any) -> tuple[Any, AdamState]:
        lr = lr_fn(state.count)
        decayed, m, denoms, neg_step_size, new_state, spec = moments(grads, state, params, lr)
        # torch: param.addcdiv_(exp_avg, denom, value=-step_size) computes p + (value * m) / d.
        new = {k: p + (_cast(neg_step_size, p) * m[k]) / denoms[k] for k, p in decayed.items()}
        return _tree.unflatten_named(new, spec), new_state

    def update(grads: Any, state: AdamState, params: Any = None) -> tuple[Any, AdamState]:
        params = _need_params(params, grads, weight_decay, who)
        lr = lr_fn(state.count)
        decayed, m, denoms, neg_step_size, new_state, spec = moments(grads, state, params, lr)
        p_named = _tree.named_leaves(params)[0]
        decay = _decay_flags(mask, params, weight_decay)
        lr_wd = _tree.computed_once(lr * weight_decay)
        updates = {}
        for k, p in p_named.items():
            u = (_cast(neg_step_size, p) * m[k]) / denoms[k]
            if decoupled and decay[k]:
                u = u - _cast(lr_wd, p) * p
            updates[k] = u
        return _tree.unflatten_named(updates, spec), new_state

    return GradientTransformation(init, update, step)


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    mask: Optional[Any] = None,
) -> GradientTransformation:
    """Adam, bitwise equal to ``torch.optim.Adam`` (``betas=(b1, b2)``; L2 weight decay added to the gradient).

    ``mask`` (a tree of bools or a function of params) limits weight decay to where it is True.
    """
    return _adam(learning_rate, b1, b2, eps, weight_decay, amsgrad, mask, decoupled=False, who="adam")


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    amsgrad: bool = False,
    mask: Optional[Any] = None,
) -> GradientTransformation:
    """AdamW, bitwise equal to ``torch.optim.AdamW`` (decoupled decay ``p *= 1 - lr * weight_decay``).

    ``mask`` (a tree of bools or a function of params, e.g. :func:`~functrain.optim.decay_mask`)
    limits weight decay to where it is True, like a torch param group with ``weight_decay=0``.
    """
    return _adam(learning_rate, b1, b2, eps, weight_decay, amsgrad, mask, decoupled=True, who="adamw")
