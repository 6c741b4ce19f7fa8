"""The ``functrain`` command line: ``inspect``, ``diff`` and ``verify`` checkpoint files.

Each subcommand is a function ``(args) -> exit code`` registered on an argparse subparser,
so other subcommands can be added beside them.

Example:
    >>> import os, tempfile, torch
    >>> from functrain.checkpoint import save
    >>> from functrain.cli import main
    >>> path = os.path.join(tempfile.mkdtemp(), "a.msgpack")
    >>> _ = save(path, {"w": torch.zeros(2)})
    >>> main(["verify", path])  # doctest: +ELLIPSIS
    OK ...
    0
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch

from functrain.checkpoint.errors import CheckpointError
from functrain.checkpoint.files import load, read_header, read_tree_info, verify
from functrain.checkpoint.format import ArrayInfo
from functrain.checkpoint.tree import format_path

__all__ = ["main", "build_parser", "leaves"]


def leaves(tree: Any, path: tuple[Any, ...] = ()) -> list[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf of a plain tree, in file order; empty containers are leaves too."""
    if isinstance(tree, dict) and tree:
        return [item for k, v in tree.items() for item in leaves(v, path + (k,))]
    if isinstance(tree, list) and tree:
        return [item for i, v in enumerate(tree) for item in leaves(v, path + (i,))]
    return [(format_path(path), tree)]


def _describe_leaf(leaf: Any) -> tuple[str, str, int, str, int]:
    """(shape, dtype, bytes, value, elements) columns for one leaf; elements is -1 for non-arrays."""
    if isinstance(leaf, ArrayInfo):
        return str(leaf.shape), leaf.dtype, leaf.nbytes, "", math.prod(leaf.shape)
    if isinstance(leaf, torch.Tensor):
        dtype = str(leaf.dtype).removeprefix("torch.")
        value = repr(leaf.item()) if leaf.numel() == 1 else ""
        return str(tuple(leaf.shape)), dtype, leaf.numel() * leaf.element_size(), value, leaf.numel()
    if isinstance(leaf, (dict, list)):
        return "", type(leaf).__name__, 0, repr(leaf), -1
    return "", type(leaf).__name__, 0, repr(leaf), -1


def _inspect(args: argparse.Namespace) -> int:
    header, tree = read_tree_info(args.file, verify_checksum=False, keep_small=16)
    print(f"file:            {args.file}")
    print(f"format version:  {header.format_version}")
    print(f"library version: {header.library_version}")
    print(f"body bytes:      {header.body_size}")
    print(f"digest (sha256): {header.digest}   (not verified here; run `functrain verify`)")
    if isinstance(tree, dict) and isinstance(tree.get("step"), (torch.Tensor, int)):
        step = tree["step"]
        print(f"step:            {int(step.item()) if isinstance(step, torch.Tensor) else step}")
    rows = [(p, *_describe_leaf(leaf)) for p, leaf in leaves(tree)]
    width = max([len(r[0]) for r in rows] + [4])
    print(f"\n{'path':<{width}}  {'shape':<16} {'dtype':<10} {'bytes':>12}  value")
    arrays = elements = total = 0
    for path, shape, dtype, nbytes, value, count in rows:
        print(f"{path:<{width}}  {shape:<16} {dtype:<10} {nbytes:>12}  {value}")
        if count >= 0:
            arrays, elements, total = arrays + 1, elements + count, total + nbytes
    print(f"\ntotal: {len(rows)} leaves, {arrays} arrays, {elements} elements, {total} bytes of array data")
    return 0


def _compare(path: str, a: Any, b: Any) -> str | None:
    """A line describing how leaf ``a`` differs from leaf ``b``, or None if bitwise equal."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return (f"{path}: {str(a.dtype).removeprefix('torch.')}{tuple(a.shape)} vs "
                    f"{str(b.dtype).removeprefix('torch.')}{tuple(b.shape)}")
        if a.numel() == 0:
            return None
        width = a.element_size()
        differs = (a.reshape(-1).view(torch.uint8).reshape(-1, width)
                   != b.reshape(-1).view(torch.uint8).reshape(-1, width)).any(dim=1)
        count = int(differs.sum())
        if not count:
            return None
        wide = torch.complex128 if a.is_complex() else torch.float64
        x, y = a.reshape(-1)[differs].to(wide), b.reshape(-1)[differs].to(wide)
        gap = (x - y).abs()
        rel = gap / torch.maximum(x.abs(), y.abs())
        return (f"{path}: {count} of {a.numel()} elements differ, max abs diff {float(gap.max()):.6g}, "
                f"max rel diff {float(rel.nan_to_num(nan=0.0).max()):.6g}")
    if type(a) is not type(b) or isinstance(a, torch.Tensor):
        return f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if a != b and not (isinstance(a, float) and a != a and b != b):
        return f"{path}: {a!r} vs {b!r}"
    return None


def _diff(args: argparse.Namespace) -> int:
    if read_header(args.a).digest == read_header(args.b).digest:
        print(f"identical: {args.a} and {args.b} hold the same tree (digest {read_header(args.a).digest})")
        return 0
    left, right = dict(leaves(load(args.a))), dict(leaves(load(args.b)))
    lines = [f"{p}: only in {args.a}" for p in left if p not in right]
    lines += [f"{p}: only in {args.b}" for p in right if p not in left]
    lines += [line for p in left if p in right and (line := _compare(p, left[p], right[p])) is not None]
    if not lines:  # same values, different encodings (e.g. key order of a foreign writer)
        print(f"identical values: {args.a} and {args.b}")
        return 0
    print(f"{len(lines)} difference(s) between {args.a} and {args.b}:")
    for line in lines:
        print(f"  {line}")
    return 1


def _verify(args: argparse.Namespace) -> int:
    try:
        header = verify(args.file)
    except (CheckpointError, OSError) as e:
        print(f"BAD {args.file}: {e}")
        return 1
    print(f"OK {args.file}: checksum and structure valid, sha256 {header.digest}, "
          f"format {header.format_version}, written by functrain {header.library_version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``functrain`` argument parser; add subcommands with ``parser._subparsers`` or extend here."""
    parser = argparse.ArgumentParser(prog="functrain", description="functrain command line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show a checkpoint's header, step and every leaf's shape, dtype and bytes")
    p.add_argument("file")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("diff", help="compare two checkpoints leaf by leaf (exit 0 identical, 1 different)")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=_diff)
    p = sub.add_parser("verify", help="check a checkpoint's checksum and structure (exit 0 good, 1 bad)")
    p.add_argument("file")
    p.set_defaults(func=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``functrain`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CheckpointError, OSError) as e:
        print(f"functrain {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
