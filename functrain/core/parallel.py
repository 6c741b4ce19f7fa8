"""Data parallelism inside a pure step, with compile-friendly functional collectives.

A data-parallel train step computes gradients on each rank's share of the batch, then
averages them across ranks with ``torch.distributed._functional_collectives`` (which
``torch.compile`` traces into the step's one graph). The average is weighted by the number
of real samples on each rank, so a short last batch on one rank weighs what it holds:
the result equals the gradient of the mean loss over the global batch.

The process group itself (torchrun, ``init_process_group``) belongs to the shell; here we
only read it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["world", "is_data_parallel", "weighted_mean"]


def world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` of the default (or given) process group; ``(0, 1)`` without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_data_parallel(group: Any = None) -> bool:
    return world(group)[1] > 1


def _group(group: Any) -> Any:
    return group if group is not None else dist.group.WORLD


def weighted_mean(
    values: dict[str, torch.Tensor], count: torch.Tensor, group: Any = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Across ranks: ``sum_r(count_r * values_r) / sum_r(count_r)``, leaf by leaf.

    ``values`` hold per-rank means (gradients of a mean loss, metrics); ``count`` is the
    number of samples they average (a 0-d tensor). One all-reduce per dtype: the tensors
    of a dtype travel in one flat buffer, with the count appended to the first buffer.
    Returns the averaged values and the global count.
    """
    from torch.distributed import _functional_collectives as funcol

    g = _group(group)
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, v in values.items():
        by_dtype.setdefault(v.dtype, []).append(name)
    total = None
    out: dict[str, torch.Tensor] = {}
    for i, (dtype, names) in enumerate(by_dtype.items()):
        c = count.to(dtype)
        parts = [values[n].reshape(-1) * c for n in names]
        if i == 0:
            parts.append(c.reshape(1))
        flat = funcol.all_reduce(torch.cat(parts), "sum", g)
        if i == 0:
            total = flat[-1]
        denom = total.to(dtype)
        offset = 0
        for n in names:
            numel = values[n].numel()
            out[n] = (flat[offset: offset + numel] / denom).view_as(values[n])
            offset += numel
    if total is None:
        total = funcol.all_reduce(count.to(torch.float64).reshape(1), "sum", g)[0]
    return {n: out[n] for n in values}, total
