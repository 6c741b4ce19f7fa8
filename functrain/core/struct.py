"""Frozen dataclass pytrees, in the manner of ``flax.struct``.

A class decorated with :func:`dataclass` is a frozen :mod:`dataclasses` dataclass that is
registered as a pytree node with both :mod:`optree` (namespace ``"functrain"``) and
:mod:`torch.utils._pytree` (which ``torch.func`` and ``torch.compile`` use). Fields marked
``static=True`` with :func:`field` are metadata, not leaves: they are part of the tree
structure and are not traversed.

Children are always visited in field-declaration order, in both libraries, so the flat
order of a dataclass never depends on which library flattened it.

Example:
    >>> import torch
    >>> from functrain.core import struct
    >>> @struct.dataclass
    ... class Point:
    ...     x: torch.Tensor
    ...     name: str = struct.field(static=True, default="p")
    >>> p = Point(torch.tensor(1.0))
    >>> p.replace(x=torch.tensor(2.0)).x.item()
    2.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import optree
import torch.utils._pytree as torch_pytree

__all__ = ["NAMESPACE", "dataclass", "field", "is_struct", "fields_of"]

NAMESPACE = "functrain"
"""The optree namespace under which functrain registers its pytree nodes."""

T = TypeVar("T")

_STATIC = "functrain_static"


def field(*, static: bool = False, **kwargs: Any) -> Any:
    """A dataclass field; ``static=True`` keeps it out of the pytree leaves."""
    metadata = dict(kwargs.pop("metadata", None) or {})
    metadata[_STATIC] = static
    return dataclasses.field(metadata=metadata, **kwargs)


def _split_fields(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    data, static = [], []
    for f in dataclasses.fields(cls):
        (static if f.metadata.get(_STATIC, False) else data).append(f.name)
    return tuple(data), tuple(static)


def dataclass(cls: type[T] | None = None, **kwargs: Any) -> Any:
    """Turn ``cls`` into a frozen dataclass registered as a pytree with optree and torch.

    The class gains a ``replace(**changes)`` method returning a new instance.
    """

    def wrap(cls: type[T]) -> type[T]:
        kwargs.setdefault("frozen", True)
        dc = dataclasses.dataclass(cls, **kwargs)  # type: ignore[call-overload]
        data_names, static_names = _split_fields(dc)

        def replace(self: Any, **changes: Any) -> Any:
            return dataclasses.replace(self, **changes)

        dc.replace = replace  # type: ignore[attr-defined]
        dc.__functrain_struct__ = (data_names, static_names)  # type: ignore[attr-defined]

        def unflatten(meta: tuple[Any, ...], children: Any) -> Any:
            kw = dict(zip(data_names, children))
            kw.update(zip(static_names, meta))
            return dc(**kw)

        def optree_flatten(x: Any) -> tuple[list[Any], tuple[Any, ...], tuple[str, ...]]:
            return [getattr(x, n) for n in data_names], tuple(getattr(x, n) for n in static_names), data_names

        optree.register_pytree_node(
            dc,
            optree_flatten,  # type: ignore[arg-type]
            unflatten,
            path_entry_type=optree.GetAttrEntry,
            namespace=NAMESPACE,
        )

        def torch_flatten(x: Any) -> tuple[list[Any], Any]:
            return [getattr(x, n) for n in data_names], tuple(getattr(x, n) for n in static_names)

        def torch_unflatten(children: Any, meta: Any) -> Any:
            return unflatten(meta, list(children))

        def torch_flatten_with_keys(x: Any) -> tuple[list[tuple[Any, Any]], Any]:
            return (
                [(torch_pytree.GetAttrKey(n), getattr(x, n)) for n in data_names],
                tuple(getattr(x, n) for n in static_names),
            )

        torch_pytree.register_pytree_node(
            dc,
            torch_flatten,
            torch_unflatten,
            serialized_type_name=f"{dc.__module__}.{dc.__qualname__}",
            flatten_with_keys_fn=torch_flatten_with_keys,
        )
        return dc

    return wrap if cls is None else wrap(cls)


def is_struct(x: Any) -> bool:
    """True for instances (or classes) made by :func:`dataclass`."""
    return hasattr(x, "__functrain_struct__")


def fields_of(x: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(data_field_names, static_field_names)`` of a struct instance or class."""
    return x.__functrain_struct__  # type: ignore[no-any-return]




def find_first(tree: Any, match: Callable[[Any], bool]) -> Any:
    """The first node of ``tree`` (depth first, the node before its children) for which ``match`` is true, or None.

    Walks functrain structs (data fields), NamedTuples (fields), dicts (values), lists and
    tuples; anything else is a leaf. Works on live states and on the plain containers a
    checkpoint is read into.

    Example:
        >>> find_first({"a": [1, {"ema": 2}]}, lambda n: isinstance(n, dict) and "ema" in n)
        {'ema': 2}
    """
    if match(tree):
        return tree
    fields = getattr(tree, "_fields", None)
    if fields is None and is_struct(tree):
        fields = fields_of(tree)[0]
    if fields is not None:
        children = [getattr(tree, f) for f in fields]
    elif isinstance(tree, dict):
        children = list(tree.values())
    elif isinstance(tree, (list, tuple)):
        children = list(tree)
    else:
        return None
    for child in children:
        found = find_first(child, match)
        if found is not None:
            return found
    return None
