"""Small pytree helpers shared by the optimizers (torch.utils._pytree, so torch.compile traces them).

Trees are usually flat ``dict[str, Tensor]`` keyed like a ``state_dict``, but any pytree of
tensors registered with ``torch.utils._pytree`` works. Leaves are visited in the tree's own
order (insertion order for dicts), which is the order ``module.parameters()`` yields for a
``state_dict``-keyed dict: reductions such as the global norm depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["tree_map", "leaves", "named_leaves", "resolve", "scalar", "zeros_like", "computed_once"]


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``fn`` applied leaf by leaf over trees of the same structure."""
    return pytree.tree_map(fn, tree, *rest)


def leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree`` in flattening order."""
    return pytree.tree_leaves(tree)


def named_leaves(tree: Any) -> tuple[dict[str, Any], Any]:
    """``({name: leaf}, spec)``: names are dict keys for a flat dict, else key paths."""
    with_path, spec = pytree.tree_flatten_with_path(tree)
    named = {}
    for path, leaf in with_path:
        if len(path) == 1 and isinstance(path[0], pytree.MappingKey) and isinstance(path[0].key, str):
            name = path[0].key
        else:
            name = pytree.keystr(path)
        named[name] = leaf
    return named, spec


def unflatten_named(named: dict[str, Any], spec: Any) -> Any:
    """Inverse of :func:`named_leaves` (``named`` in the same order)."""
    return pytree.tree_unflatten(list(named.values()), spec)


def resolve(tree_or_fn: Any, params: Any, what: str) -> dict[str, Any]:
    """A mask/label tree (or a function of params returning one) as ``{name: value}``.

    Raises ``ValueError`` naming the first path where its structure differs from ``params``.
    """
    value = tree_or_fn(params) if callable(tree_or_fn) else tree_or_fn
    named_params, _ = named_leaves(params)
    named_value, _ = named_leaves(value)
    missing = [k for k in named_params if k not in named_value]
    extra = [k for k in named_value if k not in named_params]
    if missing or extra:
        raise ValueError(
            f"{what} does not match the params tree: missing {missing[:3]} extra {extra[:3]}; "
            f"give one entry per parameter, keyed like the params (or pass a function of params)."
        )
    return {k: named_value[k] for k in named_params}


def scalar(value: float, like: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A 0-d tensor on ``like``'s device."""
    return torch.full((), value, dtype=dtype, device=like.device)


def zeros_like(tree: Any) -> Any:
    """Zeros with each leaf's shape, dtype and device."""
    return tree_map(torch.zeros_like, tree)


_ONCE_WIDTH = 16  # > torch._inductor.config.unroll_reductions_threshold (8): a real reduction loop


def computed_once(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged (bitwise), but computed once per compiled call rather than once per element.

    Inductor inlines a 0-d pointwise computation into every loop that reads it. On CPU the
    C++ kernels then recompute an optimizer's scalar chain (``count`` -> ``pow`` bias
    corrections -> step size, a learning-rate schedule's ``cos``...) for every 16-float
    vector of every parameter: three double ``pow`` calls per vector made the compiled AdamW
    update of 400k params ~7x slower (2.7 ms against 0.37 ms, one CPU thread; fused
    ``torch.optim.AdamW`` takes 0.3 ms). A reduction is always
    computed into its own buffer, so ``x`` goes through one that returns it exactly: the max
    of 16 copies of itself. The per-element loops then load one number.

    A no-op in eager mode and off CPU (GPU kernels are memory-bound; the extra reduction
    would be one more kernel launch), so eager results and their equality with
    ``torch.optim`` are untouched.
    """
    if x.device.type != "cpu" or not torch.compiler.is_compiling():
        return x
    return x.expand(_ONCE_WIDTH).amax()
