"""Sharded states: params and optimizer state held as DTensors, one shard per rank.

A replicated data-parallel state keeps a full copy of the params and of the optimizer
state (twice the params for Adam) on every rank. :func:`shard_state` splits every
tensor of ``params`` and ``opt_state`` along dim 0 over a 1-D
:class:`~torch.distributed.device_mesh.DeviceMesh` (``Shard(0)`` DTensors, torch's
uneven ``chunk`` layout), so each rank holds ``1/world`` of them at rest. The state stays
one pytree; the train step (:func:`functrain.make_train_step`) notices the DTensors and

1. all-gathers the full params (:func:`gather`) before the forward pass,
2. differentiates the loss with :func:`torch.func.grad` over those plain full tensors,
3. reduce-scatters the gradients, weighted by each rank's share of the samples
   (:func:`reduce_scatter`), back to ``Shard(0)`` DTensors, and
4. runs the optimizer on the DTensors: element-wise math stays local, reductions (the
   global norm of ``clip_by_global_norm``) become all-reduces by DTensor's rules.

All collectives are functional (``torch.distributed._functional_collectives``), so
``functrain.jit`` still compiles the step into one graph.

Why not differentiate through the DTensors themselves: on torch 2.13, ``torch.func.grad``
over DTensor params fails (its wrappers hide the DTensor, so the first matmul mixes a
plain tensor and a DTensor), and the autograd rules of the functional all-gather are an
``autograd.Function`` without ``setup_context``, which ``torch.func`` refuses. Gathering
outside the differentiated function and reduce-scattering its gradients afterwards is the
same arithmetic as FSDP's all-gather / reduce-scatter pair. The limit of this design: the
full params and full gradients exist for the duration of a step (ZeRO-2-like peak), while
FSDP2 gathers one layer at a time; what is saved is the optimizer state and the params at
rest (see ``docs/distributed.md``).

Example (under ``torchrun --nproc_per_node=2``)::

    state = ft.TrainState.create(model, opt, seed=0)
    state = ft.shard_state(state)                 # params, opt_state -> Shard(0) DTensors
    step = ft.jit(ft.make_train_step(model, loss_fn, opt))
    state = step(state, batch)                    # each rank: its own batch, its own shards
    full = ft.unshard(state)                      # plain tensors again (every rank)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optree
import torch
import torch.distributed as dist

from functrain.core.struct import NAMESPACE

__all__ = [
    "shard_state", "shard_tree", "unshard", "is_sharded", "is_dtensor", "gather", "reduce_scatter", "like_layout",
    "replicated", "default_mesh",
]


def _dtensor_types() -> tuple[type, ...]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return ()
    return (DTensor,)


def is_dtensor(x: Any) -> bool:
    types = _dtensor_types()
    return bool(types) and isinstance(x, types)


def is_sharded(tree: Any) -> bool:
    """True if any leaf of ``tree`` is a DTensor."""
    return any(is_dtensor(x) for x in optree.tree_leaves(tree, namespace=NAMESPACE))


def default_mesh(device_type: str | None = None) -> Any:
    """A 1-D device mesh over all ranks of the default process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "sharding needs a torch.distributed process group: launch with torchrun and call "
            "torch.distributed.init_process_group (or functrain.train, which does it) first"
        )
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def _shard_leaf(x: Any, mesh: Any) -> Any:
    from torch.distributed.tensor import Shard, distribute_tensor

    if not isinstance(x, torch.Tensor) or is_dtensor(x) or x.dim() == 0:
        return x
    # every rank holds the same full value: cut out this rank's rows without communication
    return distribute_tensor(x.detach(), mesh, [Shard(0)], src_data_rank=None)


def shard_tree(tree: Any, mesh: Any) -> Any:
    """``tree`` with every tensor of one or more dims split along dim 0 over ``mesh``.

    The tensors must already hold the same value on every rank (a state made from the
    same seed, or restored from one checkpoint); 0-d tensors stay plain (replicated).
    """
    if mesh.ndim != 1:
        raise ValueError(f"functrain shards over a 1-D device mesh, got a {mesh.ndim}-D mesh {mesh}")
    return optree.tree_map(lambda x: _shard_leaf(x, mesh), tree, namespace=NAMESPACE)


def shard_state(state: Any, mesh: Any = None) -> Any:
    """The state with ``params`` and ``opt_state`` sharded along dim 0 (see the module docs).

    Counters, the key, buffers, metrics and the tracker stay replicated plain tensors.
    ``mesh`` defaults to :func:`default_mesh` (all ranks). Call it on every rank with the
    same replicated state.
    """
    mesh = default_mesh() if mesh is None else mesh
    return state.replace(params=shard_tree(state.params, mesh), opt_state=shard_tree(state.opt_state, mesh))


def unshard(tree: Any) -> Any:
    """``tree`` with every DTensor replaced by its full plain tensor (a collective: call on every rank)."""
    return optree.tree_map(lambda x: x.full_tensor() if is_dtensor(x) else x, tree, namespace=NAMESPACE)


# ------------------------------------------------------------------ inside the step


def _rows_of(dt: Any) -> tuple[int, int, int]:
    """``(global rows, rows per rank (padded), this rank's rows)`` of a ``Shard(0)`` DTensor."""
    mesh = dt.device_mesh
    world = mesh.size()
    rank = mesh.get_local_rank()
    n = dt.shape[0]
    per = -(-n // world)
    return n, per, min(per, max(0, n - rank * per))


def _check_layout(name: str, dt: Any) -> None:
    from torch.distributed.tensor import Shard

    if dt.device_mesh.ndim != 1 or tuple(dt.placements) != (Shard(0),):
        raise NotImplementedError(
            f"params/{name}: a DTensor with placements {tuple(dt.placements)} on a {dt.device_mesh.ndim}-D mesh; "
            "functrain's sharded step handles Shard(0) on a 1-D mesh (made by functrain.shard_state)"
        )


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def gather(params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The full plain tensors of a dict of ``Shard(0)`` DTensors (plain tensors pass through).

    One functional all-gather per tensor; traceable by ``torch.compile``.
    """
    from torch.distributed import _functional_collectives as funcol

    out = {}
    for name, v in params.items():
        if not is_dtensor(v):
            out[name] = v
            continue
        _check_layout(name, v)
        n, per, _ = _rows_of(v)
        local = _pad_rows(v.to_local(), per)
        out[name] = funcol.all_gather_single(local, 0, v.device_mesh.get_group())[:n]
    return out


def reduce_scatter(grads: Mapping[str, torch.Tensor], like: Mapping[str, Any]) -> dict[str, Any]:
    """Sum full gradients over ranks and keep this rank's rows, as DTensors laid out like ``like``.

    ``grads[k]`` is a plain full-size tensor on every rank; the result ``[k]`` is the
    ``Shard(0)`` DTensor of ``sum over ranks of grads[k]``. Entries whose ``like`` is plain
    are all-reduced (summed) instead.
    """
    from torch.distributed import _functional_collectives as funcol
    from torch.distributed.tensor import DTensor

    mesh = next(v.device_mesh for v in like.values() if is_dtensor(v))  # the group the shards live on
    out = {}
    for name, g in grads.items():
        ref = like[name]
        if not is_dtensor(ref):  # a 0-d param stays replicated: every rank gets the sum
            out[name] = funcol.all_reduce(g, "sum", mesh.get_group())
            continue
        n, per, rows = _rows_of(ref)
        world = ref.device_mesh.size()
        part = funcol.reduce_scatter_single(_pad_rows(g, per * world), "sum", 0,
                                            ref.device_mesh.get_group())
        out[name] = DTensor.from_local(part[:rows], ref.device_mesh, ref.placements, run_check=False,
                                       shape=ref.shape, stride=ref.stride())
    return out


def like_layout(new: Any, old: Any) -> Any:
    """``new`` with a plain tensor wherever ``old`` holds one (reductions over shards give replicated DTensors).

    Keeps the state's layout fixed from step to step, so a compiled step sees the same
    input types every call and never recompiles.
    """
    return optree.tree_map(lambda n, o: n.full_tensor() if is_dtensor(n) and not is_dtensor(o) else n,
                           new, old, namespace=NAMESPACE)


def replicated(tree: Any) -> Any:
    """``tree`` with DTensors (0-d results of reductions, metrics) as plain full tensors."""
    return optree.tree_map(lambda x: x.full_tensor() if is_dtensor(x) else x, tree, namespace=NAMESPACE)
