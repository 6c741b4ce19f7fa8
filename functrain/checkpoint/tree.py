"""How a state tree maps onto the checkpoint's plain tree, and back onto a target.

The file holds a *plain* tree: maps (str or int keys), arrays (lists), tensors and Python
scalars. :func:`node_of` says how any supported value becomes plain:

- ``dict`` (str or int keys), NamedTuple (by field name) and functrain structs (by data
  field name; static fields are structure, taken from the target on restore) -> map,
  its items in canonical key order: int keys ascending, then str keys by code point;
- ``list`` and ``tuple`` -> array;
- ``torch.Tensor`` -> tensor leaf; ``None``, ``bool``, ``int``, ``float``, ``str`` -> scalar.

:func:`restore_into` rebuilds a tree of the target's types from a plain tree, checking
keys, shapes and dtypes, and naming the exact path of every difference.

Example:
    >>> import torch
    >>> from functrain.checkpoint.tree import restore_into
    >>> target = {"w": torch.zeros(2), "n": 0}
    >>> tree, report = restore_into(target, {"w": torch.ones(2), "n": 3})
    >>> tree["w"].tolist(), tree["n"], bool(report)
    ([1.0, 1.0], 3, False)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from functrain.checkpoint.errors import LoadReport, TargetMismatchError
from functrain.core import struct

__all__ = ["node_of", "format_path", "restore_into", "describe", "CHUNKED_ARRAY_KEY"]

CHUNKED_ARRAY_KEY = "__msgpack_chunked_array__"
"""The key flax uses to mark an array split into chunks; reserved, never a user key."""

SCALAR_TYPES = (type(None), bool, int, float, str)


def format_path(path: Iterable[Any]) -> str:
    """``("params", "encoder.0.weight")`` -> ``"params/encoder.0.weight"``; ``()`` -> ``"<root>"``."""
    text = "/".join(str(p) for p in path)
    return text or "<root>"


def _key_order(key: Any) -> tuple[int, Any]:
    return (0, key) if isinstance(key, int) else (1, key)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _check_key(key: Any, path: tuple[Any, ...]) -> None:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(
            f"{format_path(path)}: dict key {key!r} of type {type(key).__name__} cannot be saved; "
            "checkpoint dict keys must be str or int"
        )
    if key == CHUNKED_ARRAY_KEY:
        raise TypeError(f"{format_path(path)}: the dict key {CHUNKED_ARRAY_KEY!r} is reserved by the array format")


def node_of(x: Any, path: tuple[Any, ...] = ()) -> tuple[str, Any]:
    """Classify ``x``: ``("map", sorted items)``, ``("seq", items)``, ``("tensor", x)`` or ``("scalar", x)``.

    Raises ``TypeError`` naming the path for anything a checkpoint cannot hold.
    """
    if isinstance(x, torch.Tensor):
        return "tensor", x
    if isinstance(x, SCALAR_TYPES):
        return "scalar", x
    if isinstance(x, dict):
        for k in x:
            _check_key(k, path)
        return "map", sorted(x.items(), key=lambda kv: _key_order(kv[0]))
    if _is_namedtuple(x):
        return "map", sorted(zip(type(x)._fields, x), key=lambda kv: kv[0])
    if struct.is_struct(x) and not isinstance(x, type):
        data_names, _ = struct.fields_of(x)
        return "map", sorted(((n, getattr(x, n)) for n in data_names), key=lambda kv: kv[0])
    if isinstance(x, (list, tuple)):
        return "seq", list(x)
    raise TypeError(
        f"{format_path(path)}: a {type(x).__module__}.{type(x).__qualname__} cannot be saved in a checkpoint; "
        "checkpoints hold tensors, None, bool, int, float, str, lists, tuples, dicts, NamedTuples and "
        "functrain structs (convert numpy arrays with torch.from_numpy, or make the class a functrain struct)"
    )


def describe(value: Any) -> str:
    """A short description of a plain-tree value for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return "a dict"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


class _Restorer:
    def __init__(self, strict: bool):
        self.strict = strict
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[str] = []

    def mismatch(self, path: tuple[Any, ...], reason: str, target: Any) -> Any:
        self.mismatched.append(f"{format_path(path)}: {reason}")
        return target

    def restore(self, target: Any, value: Any, path: tuple[Any, ...]) -> Any:
        kind, content = node_of(target, path)
        if kind == "tensor":
            return self.tensor(target, value, path)
        if kind == "scalar":
            return self.scalar(target, value, path)
        if kind == "seq":
            return self.seq(target, content, value, path)
        return self.map(target, content, value, path)

    def tensor(self, target: torch.Tensor, value: Any, path: tuple[Any, ...]) -> Any:
        if not isinstance(value, torch.Tensor):
            return self.mismatch(path, f"{describe(value)} in file, a tensor expected", target)
        if tuple(value.shape) != tuple(target.shape):
            return self.mismatch(path, f"shape {tuple(value.shape)} in file, {tuple(target.shape)} expected", target)
        if value.dtype != target.dtype:
            file_dtype, want = (str(d).removeprefix("torch.") for d in (value.dtype, target.dtype))
            return self.mismatch(path, f"dtype {file_dtype} in file, {want} expected", target)
        return value if value.device == target.device else value.to(target.device)

    def scalar(self, target: Any, value: Any, path: tuple[Any, ...]) -> Any:
        if type(value) is not type(target):
            want = "None" if target is None else f"a {type(target).__name__}"
            return self.mismatch(path, f"{describe(value)} in file, {want} expected", target)
        return value

    def seq(self, target: Any, items: list[Any], value: Any, path: tuple[Any, ...]) -> Any:
        if not isinstance(value, list):
            return self.mismatch(path, f"{describe(value)} in file, a {type(target).__name__} expected", target)
        out = [self.restore(t, v, path + (i,)) for i, (t, v) in enumerate(zip(items, value))]
        if len(value) != len(items):
            self.mismatched.append(f"{format_path(path)}: length {len(value)} in file, {len(items)} expected")
            out.extend(items[len(out):])
        return type(target)(out)

    def map(self, target: Any, items: list[tuple[Any, Any]], value: Any, path: tuple[Any, ...]) -> Any:
        if not isinstance(value, dict):
            return self.mismatch(path, f"{describe(value)} in file, a {type(target).__name__} expected", target)
        out = {}
        for key, sub in items:
            if key in value:
                out[key] = self.restore(sub, value[key], path + (key,))
            else:
                self.missing.append(format_path(path + (key,)))
                out[key] = sub
        wanted = {k for k, _ in items}
        self.unexpected.extend(format_path(path + (k,)) for k in value if k not in wanted)
        if isinstance(target, dict):
            ordered = [(k, out[k]) for k in target]
            if type(target) is dict:
                return dict(ordered)
            try:
                return type(target)(ordered)
            except TypeError:
                return dict(ordered)
        if _is_namedtuple(target):
            return type(target)(**out)
        return dataclasses.replace(target, **out)

    def report(self) -> LoadReport:
        return LoadReport(self.missing, self.unexpected, self.mismatched)


def restore_into(target: Any, plain: Any, strict: bool = True, source: str = "checkpoint") -> tuple[Any, LoadReport]:
    """A tree of ``target``'s types holding ``plain``'s values, and what was skipped.

    Strict: any missing or unexpected key, or differing shape, dtype or type, raises
    :class:`TargetMismatchError` listing every differing path. Non-strict: the target's
    value is kept where the file has nothing usable, and the report lists those paths.
    """
    restorer = _Restorer(strict)
    tree = restorer.restore(target, plain, ())
    report = restorer.report()
    if strict and report:
        problems = [f"{p}: missing in file" for p in report.missing]
        problems += [f"{p}: in file, not in the target" for p in report.unexpected]
        problems += report.mismatched
        shown = "\n  ".join(problems[:30]) + (f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else "")
        raise TargetMismatchError(
            f"{source}: the file does not match the target ({len(problems)} difference(s)):\n  {shown}\n"
            "Fix the target (model, optimizer) to match the file, or pass strict=False to load only what "
            "matches (for pretrained weights)."
        )
    return tree, report
