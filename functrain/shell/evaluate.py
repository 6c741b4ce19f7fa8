"""Evaluation and prediction over a whole dataset, as functions of a state.

Example:
    >>> import torch, functrain as ft
    >>> from functrain.shell.evaluate import evaluate, predict, make_predict_step
    >>> model = torch.nn.Linear(2, 1)
    >>> state = ft.TrainState.create(model, seed=0)
    >>> data = [(torch.ones(4, 2), torch.zeros(4, 1))] * 3
    >>> step = ft.make_eval_step(model, lambda f, b: {"mse": ((f(b[0]) - b[1]) ** 2).mean()})
    >>> sorted(evaluate(state, step, data))
    ['mse']
    >>> predict(state, make_predict_step(model, lambda f, b: f(b[0])), data).shape
    torch.Size([12, 1])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import optree
import torch
from torch import nn
from torch.func import functional_call

from functrain.core.sharding import is_sharded, unshard
from functrain.core.state import TrainState
from functrain.core.step import eval_results, reset_eval
from functrain.core.struct import NAMESPACE
from functrain.data.loader import Loader

__all__ = ["evaluate", "predict", "make_predict_step", "EvaluationStopped"]


class EvaluationStopped(Exception):
    """Raised by :func:`evaluate` when ``should_stop()`` turned true between two batches."""


def _batches(data: Any) -> Iterable[Any]:
    if hasattr(data, "iterate") and hasattr(data, "epoch"):  # functrain.data.Loader: epoch 0, in order
        return data.epoch(0)
    return data


def _split_over_ranks(data: Any) -> bool:
    """A functrain Loader over several ranks: each rank evaluates its share, the sums are added."""
    return isinstance(data, Loader) and data.world_size > 1


def _sum_over_ranks(acc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: [sum, count]}`` added across the ranks of the default group (a rank's share may be empty)."""
    dist = torch.distributed
    names: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(names, sorted(acc))
    keys = sorted({k for ks in names for k in ks})
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flat = torch.stack([acc[k].to(device, torch.float64) if k in acc else torch.zeros(2, dtype=torch.float64,
                                                                                       device=device)
                        for k in keys]) if keys else torch.zeros(0, 2, dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    return {k: flat[i].cpu() for i, k in enumerate(keys)}


def evaluate(
    state: TrainState,
    eval_step: Callable[[TrainState, Any], TrainState],
    data: Iterable[Any],
    *,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Run ``eval_step`` over every batch of ``data`` and return the mean of each metric.

    ``eval_step`` is made by :func:`functrain.make_eval_step`; ``data`` is a
    :class:`functrain.data.Loader` (its epoch 0 is read) or any iterable of batches.
    The state is not changed (its accumulators are used on a copy).

    Over several ranks, a Loader is split: each rank evaluates its own contiguous share
    (:meth:`functrain.data.Loader.shard`, no sample padded or repeated) and the sums and
    counts are added across ranks, so every rank returns the exact means over the whole
    dataset; every rank must call it. A sharded state's params are gathered once first.
    """
    if is_sharded(state.params):  # gather once, not on every batch (a rank's share may have fewer batches)
        state = state.replace(params=unshard(state.params))
    acc = reset_eval(state)
    split = _split_over_ranks(data)
    seen = 0
    for batch in (data.shard() if split else _batches(data)):
        if should_stop is not None and should_stop():
            raise EvaluationStopped
        acc = eval_step(acc, batch)
        seen += 1
    if split:
        acc = acc.replace(eval_metrics=_sum_over_ranks(acc.eval_metrics))
        seen = int(bool(acc.eval_metrics))
    if seen == 0:
        raise ValueError("evaluate: the evaluation data yielded no batch; check the loader (drop_last, batch_size)")
    return {k: float(v) for k, v in eval_results(acc).items()}


def make_predict_step(model: nn.Module, fn: Callable[[Callable[..., Any], Any], Any] | None = None) -> Callable:
    """A ``(state, batch) -> outputs`` function: ``fn(forward, batch)`` in eval mode, without gradients.

    ``forward`` calls ``model`` on the state's params and buffers; the default ``fn``
    calls ``forward(batch)`` (or ``forward(batch[0])`` for a tuple/list batch).
    """

    def default(forward: Callable[..., Any], batch: Any) -> Any:
        return forward(batch[0]) if isinstance(batch, (tuple, list)) else forward(batch)

    body = fn or default

    def predict_step(state: TrainState, batch: Any) -> Any:
        was_training = model.training
        model.train(False)
        try:
            with torch.no_grad():
                def forward(*args: Any, **kwargs: Any) -> Any:
                    return functional_call(model, (dict(state.params), dict(state.buffers)), args, kwargs,
                                           tie_weights=True)

                return body(forward, batch)
        finally:
            model.train(was_training)

    return predict_step


def predict(state: TrainState, predict_step: Callable[[TrainState, Any], Any], data: Iterable[Any]) -> Any:
    """The outputs of ``predict_step`` over ``data``, concatenated along dim 0 in dataset order.

    Outputs may be a tensor or a pytree of tensors. A :class:`functrain.data.Loader` must
    not shuffle or drop samples (``shuffle=False, drop_last=False``); over several ranks,
    each rank predicts its contiguous share (:meth:`functrain.data.Loader.shard`).
    """
    if hasattr(data, "shuffle") and hasattr(data, "iterate") and (data.shuffle or data.drop_last):
        raise ValueError("predict reads the dataset in order: build its Loader with shuffle=False, drop_last=False")
    if is_sharded(state.params):
        state = state.replace(params=unshard(state.params))
    outputs = [predict_step(state, batch) for batch in (data.shard() if _split_over_ranks(data) else _batches(data))]
    if not outputs:
        raise ValueError("predict: the data yielded no batch")
    return optree.tree_map(lambda *xs: torch.cat(xs), *outputs, namespace=NAMESPACE)
