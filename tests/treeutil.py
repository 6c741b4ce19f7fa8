"""Test helpers: flatten a state to (path, tensor) pairs, in a fixed order."""

from __future__ import annotations

import hashlib

import optree
import torch

from functrain.core.struct import NAMESPACE


def tensors_with_paths(tree) -> list[tuple[str, torch.Tensor]]:
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace=NAMESPACE)
    return [("/".join(map(str, p)), x) for p, x in zip(paths, leaves) if isinstance(x, torch.Tensor)]


def clone_tree(tree):
    return optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree, namespace=NAMESPACE)


def assert_bitwise_equal(a, b) -> None:
    pa, pb = tensors_with_paths(a), tensors_with_paths(b)
    assert [p for p, _ in pa] == [p for p, _ in pb]
    for (path, x), (_, y) in zip(pa, pb):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert torch.equal(x, y) or (x.is_floating_point() and torch.equal(x.isnan(), y.isnan())
                                     and torch.equal(x.nan_to_num(), y.nan_to_num())), f"{path} differs"


def raw_digest(tree) -> str:
    h = hashlib.sha256()
    for path, t in tensors_with_paths(tree):
        h.update(path.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
