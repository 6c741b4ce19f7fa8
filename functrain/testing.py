"""Assertions on whole trees, for reproducibility tests.

:func:`assert_trees_equal` is bitwise: same container types and keys, same static fields,
same dtypes and shapes, and the same bytes in every tensor (so ``NaN`` equals a NaN with
the same bits, and ``-0.0`` differs from ``0.0``). :func:`assert_trees_close` allows a
tolerance on floating-point leaves. Failures name the first differing path and the size
of the difference.

Example:
    >>> import torch
    >>> from functrain.testing import assert_trees_equal
    >>> a = {"w": torch.tensor([1.0, 2.0, 3.0])}
    >>> assert_trees_equal(a, {"w": torch.tensor([1.0, 2.0, 3.0])})
    >>> try:
    ...     assert_trees_equal(a, {"w": torch.tensor([1.0, 2.5, 3.0])})
    ... except AssertionError as e:
    ...     print(e)
    trees differ at w: 1 of 3 elements differ, max abs diff 0.5 (first at index (1,): 2.0 vs 2.5)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from functrain.checkpoint.tree import format_path, node_of
from functrain.core import struct

__all__ = ["assert_trees_equal", "assert_trees_close", "first_difference"]


def _static_fields(x: Any) -> tuple[Any, ...]:
    if struct.is_struct(x) and not isinstance(x, type):
        return tuple(getattr(x, n) for n in struct.fields_of(x)[1])
    return ()


def _leaf_difference(a: torch.Tensor, b: torch.Tensor, rtol: float | None, atol: float, equal_nan: bool) -> str | None:
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.numel() == 0:
        return None
    if rtol is None or not (a.is_floating_point() or a.is_complex()):
        width = a.element_size()
        a_bytes = a.reshape(-1).view(torch.uint8).reshape(-1, width)
        b_bytes = b.reshape(-1).view(torch.uint8).reshape(-1, width)
        differs = (a_bytes != b_bytes).any(dim=1)
    else:
        differs = ~torch.isclose(a.reshape(-1), b.reshape(-1), rtol=rtol, atol=atol, equal_nan=equal_nan)
    count = int(differs.sum())
    if count == 0:
        return None
    first = int(differs.nonzero()[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), a.shape)) if a.dim() else ()
    wide = torch.complex128 if a.is_complex() else torch.float64
    av, bv = a.reshape(-1).to(wide), b.reshape(-1).to(wide)
    gap = (av - bv).abs()[differs]
    max_abs = float(gap.max()) if gap.numel() else math.nan
    x, y = a.reshape(-1)[first].item(), b.reshape(-1)[first].item()
    return (f"{count} of {a.numel()} elements differ, max abs diff {max_abs:.6g} "
            f"(first at index {index}: {x!r} vs {y!r})")


def first_difference(a: Any, b: Any, rtol: float | None = None, atol: float = 0.0,
                     equal_nan: bool = True, path: tuple[Any, ...] = ()) -> str | None:
    """A description of the first difference between two trees (``"path: what"``), or None.

    ``rtol=None`` compares bitwise; otherwise floating-point tensors and floats are compared
    with ``torch.isclose(rtol, atol, equal_nan)`` and everything else exactly.
    """
    where = format_path(path)
    kind_a, content_a = node_of(a, path)
    kind_b, content_b = node_of(b, path)
    if kind_a != kind_b or (kind_a != "scalar" and type(a) is not type(b)):
        return f"{where}: a {type(a).__name__} vs a {type(b).__name__}"
    if kind_a == "tensor":
        diff = _leaf_difference(content_a, content_b, rtol, atol, equal_nan)
        return None if diff is None else f"{where}: {diff}"
    if kind_a == "scalar":
        if type(a) is not type(b):
            return f"{where}: {a!r} ({type(a).__name__}) vs {b!r} ({type(b).__name__})"
        if isinstance(a, float):
            same = a == b or (equal_nan and math.isnan(a) and math.isnan(b))
            if rtol is None:
                same = math.copysign(1, a) == math.copysign(1, b) and (a == b or (math.isnan(a) and math.isnan(b)))
            else:
                same = same or abs(a - b) <= atol + rtol * abs(b)
        else:
            same = a == b
        return None if same else f"{where}: {a!r} vs {b!r}, abs diff " + (
            f"{abs(a - b):.6g}" if isinstance(a, (int, float)) and not isinstance(a, bool) else "n/a")
    if _static_fields(a) != _static_fields(b):
        return f"{where}: static fields {_static_fields(a)!r} vs {_static_fields(b)!r}"
    if kind_a == "seq":
        if len(content_a) != len(content_b):
            return f"{where}: length {len(content_a)} vs {len(content_b)}"
        pairs = [((i,), x, y) for i, (x, y) in enumerate(zip(content_a, content_b))]
    else:
        keys_a, keys_b = [k for k, _ in content_a], [k for k, _ in content_b]
        if keys_a != keys_b:
            only_a = [k for k in keys_a if k not in set(keys_b)]
            only_b = [k for k in keys_b if k not in set(keys_a)]
            return f"{where}: keys only in the first tree {only_a}, only in the second {only_b}"
        pairs = [((k,), x, y) for (k, x), (_, y) in zip(content_a, content_b)]
    for key, x, y in pairs:
        diff = first_difference(x, y, rtol, atol, equal_nan, path + key)
        if diff is not None:
            return diff
    return None


def assert_trees_equal(a: Any, b: Any) -> None:
    """Assert that two trees are bitwise equal (types, keys, static fields, dtypes, shapes, bytes)."""
    diff = first_difference(a, b)
    if diff is not None:
        raise AssertionError(f"trees differ at {diff}")


def assert_trees_close(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-8, equal_nan: bool = True) -> None:
    """Assert that two trees have the same structure and dtypes and close values.

    Floating-point and complex tensors and Python floats within ``atol + rtol * |b|``;
    integer, bool and str leaves must be equal.
    """
    diff = first_difference(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan)
    if diff is not None:
        raise AssertionError(f"trees are not close (rtol={rtol}, atol={atol}) at {diff}")
