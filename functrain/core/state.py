"""The train state: one immutable pytree that holds everything a run needs to continue.

Example:
    >>> import torch, functrain as ft
    >>> model = torch.nn.Linear(3, 2)
    >>> state = ft.TrainState.create(model, ft.optim.sgd(0.1), seed=0)
    >>> sorted(state.params)
    ['bias', 'weight']
    >>> int(state.step)
    0
    >>> _ = model.load_state_dict(ft.state_dict(state))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from functrain.core import rng as _rng
from functrain.core import struct

__all__ = ["TrainState", "Tracker", "LossScale", "state_dict", "counter", "params_of_module"]


def counter(value: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """A 0-d int64 tensor: how functrain stores counters, so compiled steps never recompile."""
    return torch.tensor(int(value), dtype=torch.int64, device=device)


@struct.dataclass
class Tracker:
    """Best-result and early-stopping bookkeeping, kept in the state so a resume loses nothing.

    ``best_score`` is NaN until the first evaluation; ``best_step`` is -1 until then;
    ``bad_evals`` counts evaluations since the last improvement.
    """

    best_score: torch.Tensor
    best_step: torch.Tensor
    bad_evals: torch.Tensor

    @classmethod
    def create(cls, device: torch.device | str | None = None) -> Tracker:
        return cls(
            best_score=torch.tensor(math.nan, dtype=torch.float64, device=device),
            best_step=counter(-1, device),
            bad_evals=counter(0, device),
        )


@struct.dataclass
class LossScale:
    """Dynamic loss-scaling state for float16 training."""

    scale: torch.Tensor  # float32 0-d
    good_steps: torch.Tensor  # int64 0-d: finite steps since the last change
    skipped: torch.Tensor  # int64 0-d: steps skipped for non-finite gradients

    @classmethod
    def create(cls, init_scale: float = 2.0**16, device: torch.device | str | None = None) -> LossScale:
        return cls(
            scale=torch.tensor(float(init_scale), dtype=torch.float32, device=device),
            good_steps=counter(0, device),
            skipped=counter(0, device),
        )


@struct.dataclass
class TrainState:
    """Everything a training run needs to continue, as one immutable pytree.

    Fields:
        step: optimizer steps taken (0-d int64).
        micro_step: micro-batches consumed by train steps (0-d int64); differs from
            ``step`` under gradient accumulation.
        epoch: the current epoch of the data (0-d int64).
        data_index: global samples consumed in the current epoch (0-d int64): with
            ``epoch`` and the loader's seed, this is the data position.
        params: trainable tensors, keyed like ``module.state_dict()``.
        buffers: non-trainable tensors (BatchNorm statistics...), keyed likewise.
        opt_state: the optimizer's own pytree (see :mod:`functrain.optim`).
        rng: the random key, ``int64`` of shape ``(2,)`` (see :mod:`functrain.random`).
        metrics: the last train step's scalars (``loss``, ``grad_norm``...), 0-d tensors.
        eval_metrics: accumulators of the current evaluation (sums and counts).
        tracker: best score, its step, evaluations since improvement.
        loss_scale: dynamic loss scale for float16 training, or None.
    """

    step: torch.Tensor
    micro_step: torch.Tensor
    epoch: torch.Tensor
    data_index: torch.Tensor
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt_state: Any
    rng: torch.Tensor
    metrics: dict[str, torch.Tensor]
    eval_metrics: dict[str, torch.Tensor]
    tracker: Tracker
    loss_scale: LossScale | None = None

    @classmethod
    def create(
        cls,
        model: nn.Module | Mapping[str, torch.Tensor],
        optimizer: Any = None,
        *,
        seed: int = 0,
        buffers: Mapping[str, torch.Tensor] | None = None,
        loss_scale: LossScale | None = None,
        device: torch.device | str | None = None,
    ) -> TrainState:
        """A fresh state from a module (or a dict of params) and an optimizer.

        Params and buffers are detached copies, keyed like ``model.state_dict()``; the
        module itself is not changed and is not part of the state. ``optimizer`` is a
        :class:`functrain.optim.GradientTransformation` (or None for evaluation only).
        """
        if isinstance(model, nn.Module):
            params, module_buffers = params_of_module(model)
            if buffers is not None:
                raise TypeError("pass buffers only with a dict of params, not with an nn.Module")
            buffers = module_buffers
        elif isinstance(model, Mapping):
            params = {str(k): v.detach().clone() for k, v in model.items()}
            buffers = {str(k): v.detach().clone() for k, v in (buffers or {}).items()}
        else:
            raise TypeError(f"TrainState.create takes an nn.Module or a dict of tensors, got {type(model).__name__}")
        if device is not None:
            params = {k: v.to(device) for k, v in params.items()}
            buffers = {k: v.to(device) for k, v in buffers.items()}
        for name, v in params.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"params/{name}: expected a tensor, got {type(v).__name__}")
        opt_state = optimizer.init(params) if optimizer is not None else None
        dev = device
        return cls(
            step=counter(0, dev),
            micro_step=counter(0, dev),
            epoch=counter(0, dev),
            data_index=counter(0, dev),
            params=params,
            buffers=buffers,
            opt_state=opt_state,
            rng=_rng.key(seed).to(dev) if dev is not None else _rng.key(seed),
            metrics={},
            eval_metrics={},
            tracker=Tracker.create(dev),
            loss_scale=loss_scale,
        )


def params_of_module(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Detached copies of a module's parameters and persistent buffers, state_dict keys.

    A tied parameter appears once, under its first name (``functional_call`` ties the
    aliases back); :func:`state_dict` with ``model=`` restores the alias keys.
    """
    sd_keys = set(model.state_dict().keys())
    params = {k: v.detach().clone() for k, v in model.named_parameters() if k in sd_keys}
    buffers = {
        k: v.detach().clone()
        for k, v in model.named_buffers()
        if k in sd_keys and k not in params
    }
    return params, buffers


def state_dict(
    state: TrainState,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    model: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` (params and buffers) from a state, for ``load_state_dict``.

    Pass ``params=`` to export other weights (the EMA params, for instance) with the
    state's buffers, and ``model=`` to add the alias keys of tied parameters.
    """
    out: dict[str, torch.Tensor] = {}
    out.update(state.params if params is None else params)
    out.update(state.buffers)
    if model is not None:
        by_id = {id(p): n for n, p in model.named_parameters()}
        for name, p in model.named_parameters(remove_duplicate=False):
            if name not in out and by_id.get(id(p)) in out:
                out[name] = out[by_id[id(p)]]
    return out
