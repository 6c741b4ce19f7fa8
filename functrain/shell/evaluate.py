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

from functrain.core.state import TrainState
from functrain.core.step import eval_results, reset_eval
from functrain.core.struct import NAMESPACE

__all__ = ["evaluate", "predict", "make_predict_step", "EvaluationStopped"]


class EvaluationStopped(Exception):
    """Raised by :func:`evaluate` when ``should_stop()`` turned true between two batches."""


def _batches(data: Any) -> Iterable[Any]:
    if hasattr(data, "iterate") and hasattr(data, "epoch"):  # functrain.data.Loader: epoch 0, in order
        return data.epoch(0)
    return data


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
    """
    acc = reset_eval(state)
    seen = 0
    for batch in _batches(data):
        if should_stop is not None and should_stop():
            raise EvaluationStopped
        acc = eval_step(acc, batch)
        seen += 1
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
    not shuffle or drop samples (``shuffle=False, drop_last=False``).
    """
    if hasattr(data, "shuffle") and hasattr(data, "iterate") and (data.shuffle or data.drop_last):
        raise ValueError("predict reads the dataset in order: build its Loader with shuffle=False, drop_last=False")
    outputs = [predict_step(state, batch) for batch in _batches(data)]
    if not outputs:
        raise ValueError("predict: the data yielded no batch")
    return optree.tree_map(lambda *xs: torch.cat(xs), *outputs, namespace=NAMESPACE)
