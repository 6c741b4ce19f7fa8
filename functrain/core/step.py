"""Pure step functions ``(state, batch) -> state`` and the ``Step`` wrapper that runs them.

A :class:`Step` holds a body that may draw random numbers from torch's generators (dropout,
say). Calling the step seeds those generators from ``state.rng`` (and the rank) with
:func:`functrain.random.seeded`, which restores them afterwards, so the call is a pure
function of ``(state, batch)`` and the caller's global RNG is left as it was. The body
itself is plain tensor code that ``torch.compile(fullgraph=True)`` turns into one graph
(see :func:`functrain.jit`).

Example:
    >>> import torch, functrain as ft
    >>> model = torch.nn.Linear(3, 1)
    >>> def loss_fn(forward, batch):
    ...     x, y = batch
    ...     return torch.nn.functional.mse_loss(forward(x), y)
    >>> opt = ft.optim.sgd(0.1)
    >>> state = ft.TrainState.create(model, opt, seed=0)
    >>> step = ft.make_train_step(model, loss_fn, opt)
    >>> state = step(state, (torch.ones(4, 3), torch.zeros(4, 1)))
    >>> int(state.step), sorted(state.metrics)
    (1, ['grad_norm', 'loss'])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
from torch import nn
from torch.func import functional_call, grad_and_value

from functrain.core import parallel as _parallel
from functrain.core import rng as _rng
from functrain.core import sharding as _sharding
from functrain.core.precision import autocast_context, check_precision, scale_loss, unscale_and_update
from functrain.core.state import TrainState
from functrain.core.struct import NAMESPACE
from functrain.optim import base as optim_base

__all__ = [
    "Step",
    "make_train_step",
    "make_eval_step",
    "eval_results",
    "reset_eval",
    "batch_size",
    "global_norm",
]

Batch = Any
Forward = Callable[..., Any]
LossFn = Callable[[Forward, Batch], Any]


def _current_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _state_device(state: TrainState) -> torch.device:
    for t in state.params.values():
        return t.device
    return state.rng.device


@dataclasses.dataclass(frozen=True)
class Step:
    """A pure ``(state, batch) -> state`` function.

    ``fn`` is the body: tensor code only (no ``.item()``, no Python branches on tensor
    values), so that it compiles to one graph. ``__call__`` seeds torch's generators from
    ``state.rng`` (and the process rank) around the body, restoring them afterwards.
    """

    fn: Callable[[TrainState, Batch], TrainState]
    name: str = "step"
    uses_rng: bool = True

    def __call__(self, state: TrainState, batch: Batch) -> TrainState:
        if not isinstance(state, TrainState):
            raise TypeError(
                f"{self.name}: expected a functrain.TrainState as first argument, got {type(state).__name__}"
            )
        if not self.uses_rng:
            return self.fn(state, batch)
        with _rng.seeded(state.rng, _current_rank(), _state_device(state)):
            return self.fn(state, batch)


def _as_loss_and_aux(out: Any, where: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, aux = (out if isinstance(out, tuple) and len(out) == 2 else (out, {}))
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(
            f"{where} must return a 0-d loss tensor (or (loss, metrics_dict)), got {shape}; "
            "reduce the loss with .mean() or .sum()"
        )
    if not isinstance(aux, Mapping):
        raise TypeError(f"{where}: the second value returned must be a dict of metrics, got {type(aux).__name__}")
    return loss, dict(aux)


def _bind(module: nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]) -> Forward:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return functional_call(module, (dict(params), dict(buffers)), args, kwargs, tie_weights=True)

    return forward


def batch_size(batch: Batch) -> int:
    """The leading dimension of the first tensor in ``batch``."""
    for leaf in optree.tree_leaves(batch, namespace=NAMESPACE):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise ValueError("the batch holds no tensor with a batch dimension")


def _split_micro(batch: Batch, k: int) -> list[Batch]:
    n = batch_size(batch)
    if n % k:
        raise ValueError(f"a batch of {n} samples does not split into micro_batches={k} equal parts; "
                         f"use a batch size divisible by {k}")
    leaves, spec = optree.tree_flatten(batch, namespace=NAMESPACE)
    parts = [x.chunk(k) if isinstance(x, torch.Tensor) and x.dim() > 0 else (x,) * k for x in leaves]
    return [optree.tree_unflatten(spec, [p[i] for p in parts]) for i in range(k)]


def global_norm(tree: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all tensors in a dict, as a float32 0-d tensor."""
    norms = [t.detach().float().norm() for t in tree.values()]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


def _sharded_mean(grads: dict, loss: torch.Tensor, aux: dict, batch: Batch, like: dict, group: Any) -> tuple:
    """Sample-weighted means across ranks: gradients reduce-scattered to shards, metrics all-reduced."""
    count = torch.tensor(float(batch_size(batch)), dtype=torch.float64, device=loss.device)
    mean, total = _parallel.weighted_mean({"loss": loss, **{"m/" + k: v for k, v in aux.items()}}, count, group)
    share = count / total
    grads = _sharding.reduce_scatter({k: g * share.to(g.dtype) for k, g in grads.items()}, like)
    return grads, mean["loss"], {k: mean["m/" + k] for k in aux}


def make_train_step(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: optim_base.GradientTransformation,
    *,
    micro_batches: int = 1,
    precision: str | None = None,
    data_parallel: bool | None = None,
    group: Any = None,
) -> Step:
    """A pure train step: gradients of ``loss_fn`` over ``state.params``, then ``optimizer``.

    ``loss_fn(forward, batch)`` returns a 0-d loss or ``(loss, {name: 0-d tensor})``;
    ``forward(*args, **kwargs)`` runs ``model`` (in train mode) on the state's params and
    buffers with :func:`torch.func.functional_call`. Buffers that the model changes
    (BatchNorm statistics) are copied first and returned in the new state: the input state
    is never changed.

    The new state has ``micro_step + 1``, ``step + 1`` (``+ 0`` on calls where an
    ``accumulate`` optimizer only accumulated), a new ``rng`` key and
    ``metrics = {"loss", "grad_norm", "learning_rate" (when the optimizer has one), ...aux}``.

    ``micro_batches=k`` splits each batch into ``k`` equal parts along dim 0 and averages
    their gradients inside the one step (memory of one part, result of the whole batch).
    ``precision`` is None, ``"bf16"`` (autocast) or ``"fp16"`` (autocast with dynamic loss
    scaling; needs ``TrainState.create(..., loss_scale=LossScale.create())``).

    ``data_parallel`` (default: on when a ``torch.distributed`` process group of more
    than one rank exists when the step runs) averages gradients and metrics across the
    ranks of ``group`` inside the step, weighted by each rank's number of samples, with
    functional collectives that compile into the step's graph. Each rank's dropout draws
    differ: the seed is derived from the key and the rank.

    A sharded state (:func:`functrain.shard_state`: params and optimizer state as
    ``Shard(0)`` DTensors) is detected from its params: the step all-gathers the params,
    differentiates over the full plain tensors, and reduce-scatters the sample-weighted
    gradients back to shards before the optimizer (see :mod:`functrain.core.sharding`).
    """
    check_precision(precision)
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")

    def loss_and_buffers(params: dict, buffers: dict, batch: Batch, scale: torch.Tensor | None) -> Any:
        new_buffers = {k: v.clone() for k, v in buffers.items()}
        with autocast_context(precision, params):
            out = loss_fn(_bind(model, params, new_buffers), batch)
        loss, aux = _as_loss_and_aux(out, "loss_fn")
        loss = loss.float()
        scaled = scale_loss(loss, scale)
        return scaled, (loss.detach(), {k: v.detach() for k, v in aux.items()}, new_buffers)

    grad_fn = grad_and_value(loss_and_buffers, has_aux=True)

    def body(state: TrainState, batch: Batch) -> TrainState:
        model.train(True)
        scale = state.loss_scale.scale if (precision == "fp16" and state.loss_scale is not None) else None
        if precision == "fp16" and state.loss_scale is None:
            raise ValueError("precision='fp16' needs a loss scale in the state: "
                             "TrainState.create(..., loss_scale=functrain.LossScale.create())")
        buffers = state.buffers
        sharded = _sharding.is_sharded(state.params)
        params = _sharding.gather(state.params) if sharded else state.params  # full tensors, plain
        if micro_batches == 1:
            grads, (_, (loss, aux, buffers)) = grad_fn(params, buffers, batch, scale)
        else:
            grads, loss, aux = None, None, {}
            for part in _split_micro(batch, micro_batches):
                g, (_, (lp, ap, buffers)) = grad_fn(params, buffers, part, scale)
                grads = g if grads is None else {k: grads[k] + g[k] for k in grads}
                loss = lp if loss is None else loss + lp
                aux = ap if not aux else {k: aux[k] + ap[k] for k in aux}
            grads = {k: v / micro_batches for k, v in grads.items()}
            loss = loss / micro_batches
            aux = {k: v / micro_batches for k, v in aux.items()}
        if sharded:
            grads, loss, aux = _sharded_mean(grads, loss, aux, batch, state.params, group)
        elif data_parallel or (data_parallel is None and _parallel.is_data_parallel(group)):
            count = torch.tensor(float(batch_size(batch)), dtype=torch.float64, device=loss.device)
            tagged = {"g/" + k: v for k, v in grads.items()}
            tagged.update({"m/loss": loss, **{"m/" + k: v for k, v in aux.items()}})
            mean, _ = _parallel.weighted_mean(tagged, count, group)
            grads = {k: mean["g/" + k] for k in grads}
            loss = mean["m/loss"]
            aux = {k: mean["m/" + k] for k in aux}
        loss_scale = state.loss_scale
        finite = None
        if scale is not None:
            grads, finite, loss_scale = unscale_and_update(grads, state.loss_scale)
        params, opt_state = optim_base.apply_gradients(optimizer, grads, state.opt_state, state.params)
        if finite is not None:
            params = {k: torch.where(finite, v, state.params[k]) for k, v in params.items()}
            opt_state = optree.tree_map(
                lambda new, old: torch.where(finite, new, old) if isinstance(new, torch.Tensor) else new,
                opt_state, state.opt_state, namespace=NAMESPACE,
            )
            buffers = {k: torch.where(finite, v, state.buffers[k]) for k, v in buffers.items()}
        stats = optim_base.stats(opt_state)
        metrics = {"loss": loss}
        metrics["grad_norm"] = stats["grad_norm"] if "grad_norm" in stats else global_norm(grads)
        if "learning_rate" in stats:
            metrics["learning_rate"] = stats["learning_rate"]
        if "skipped" in stats:
            metrics["skipped"] = stats["skipped"]
        if loss_scale is not None and precision == "fp16":
            metrics["loss_scale"] = loss_scale.scale
        metrics.update(aux)
        if sharded:  # the same layout as the input state: a compiled step never recompiles
            metrics = _sharding.replicated(metrics)
            opt_state = _sharding.like_layout(opt_state, state.opt_state)
        applied = stats["applied"] if "applied" in stats else 1
        return state.replace(
            step=state.step + applied,
            micro_step=state.micro_step + 1,
            params=params,
            buffers=buffers,
            opt_state=opt_state,
            rng=_rng.next_key(state.rng),
            metrics=metrics,
            loss_scale=loss_scale,
        )

    return Step(body, name="train_step")


MetricFn = Callable[[Forward, Batch], Mapping[str, torch.Tensor]]


def make_eval_step(model: nn.Module, metric_fn: MetricFn) -> Step:
    """A pure evaluation step that adds the batch's metrics to ``state.eval_metrics``.

    ``metric_fn(forward, batch)`` returns ``{name: value}`` where a 0-d value is the mean
    over the batch (weighted by the batch size) and a 1-d value holds one number per
    sample. Each ``state.eval_metrics[name]`` is a float64 tensor ``[sum, count]``; read
    the means with :func:`eval_results` and start afresh with :func:`reset_eval`. The
    model runs in eval mode, without gradients; params, buffers and rng are unchanged.
    """

    def body(state: TrainState, batch: Batch) -> TrainState:
        model.train(False)
        with torch.no_grad():
            out = metric_fn(_bind(model, _sharding.gather(state.params), state.buffers), batch)
        if not isinstance(out, Mapping):
            raise TypeError(f"metric_fn must return a dict of tensors, got {type(out).__name__}")
        n = batch_size(batch)
        acc = dict(state.eval_metrics)
        for name, value in out.items():
            value = value.detach().double()
            if value.dim() == 0:
                add = torch.stack([value * n, torch.tensor(float(n), dtype=torch.float64, device=value.device)])
            elif value.dim() == 1:
                add = torch.stack([value.sum(), torch.tensor(float(value.numel()), dtype=torch.float64,
                                                             device=value.device)])
            else:
                raise ValueError(f"metric {name!r}: expected a 0-d mean or a 1-d per-sample tensor, "
                                 f"got shape {tuple(value.shape)}")
            acc[name] = acc[name] + add if name in acc else add
        return state.replace(eval_metrics=acc)

    return Step(body, name="eval_step", uses_rng=False)


def eval_results(state: TrainState) -> dict[str, torch.Tensor]:
    """The means accumulated by eval steps: ``{name: sum / count}`` (float64 0-d tensors)."""
    return {k: v[0] / v[1] for k, v in state.eval_metrics.items()}


def reset_eval(state: TrainState) -> TrainState:
    """The state with empty evaluation accumulators."""
    return state.replace(eval_metrics={})
