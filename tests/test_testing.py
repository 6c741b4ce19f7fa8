"""functrain.testing: bitwise and tolerant tree assertions with useful messages."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from functrain.core import struct
from functrain.testing import assert_trees_close, assert_trees_equal


class Pair(NamedTuple):
    a: torch.Tensor
    b: int


@struct.dataclass
class Box:
    x: torch.Tensor
    tag: str = struct.field(static=True, default="t")


def tree(w: torch.Tensor) -> dict:
    return {"params": {"w": w}, "opt": Pair(torch.tensor(1), 3), "box": Box(torch.zeros(2)), "s": [1.0, None]}


def test_equal_trees_pass_including_nan_with_same_bits() -> None:
    w = torch.tensor([1.0, float("nan"), 3.0])
    assert_trees_equal(tree(w), tree(w.clone()))


def test_first_differing_path_and_size_are_named() -> None:
    a = torch.zeros(4, 5)
    b = a.clone()
    b[1, 2], b[3, 0] = 0.25, -1.0
    with pytest.raises(AssertionError, match=r"params/w: 2 of 20 elements differ, max abs diff 1 "
                                             r"\(first at index \(1, 2\): 0.0 vs 0.25\)"):
        assert_trees_equal(tree(a), tree(b))


def test_bitwise_means_bitwise() -> None:
    with pytest.raises(AssertionError, match="params/w: 1 of 1"):
        assert_trees_equal(tree(torch.tensor([0.0])), tree(torch.tensor([-0.0])))
    with pytest.raises(AssertionError, match="params/w: dtype torch.float32 vs torch.float64"):
        assert_trees_equal(tree(torch.zeros(1)), tree(torch.zeros(1, dtype=torch.float64)))
    with pytest.raises(AssertionError, match=r"params/w: shape \(1,\) vs \(2,\)"):
        assert_trees_equal(tree(torch.zeros(1)), tree(torch.zeros(2)))


def test_structure_and_static_differences_are_named() -> None:
    a = tree(torch.zeros(1))
    with pytest.raises(AssertionError, match=r"<root>: keys only in the first tree \['s'\]"):
        assert_trees_equal(a, {k: v for k, v in a.items() if k != "s"})
    with pytest.raises(AssertionError, match="box: static fields"):
        assert_trees_equal(a, {**a, "box": Box(torch.zeros(2), tag="other")})
    with pytest.raises(AssertionError, match="opt: a Pair vs a dict"):
        assert_trees_equal(a, {**a, "opt": {"a": torch.tensor(1), "b": 3}})
    with pytest.raises(AssertionError, match="opt/b: 3 vs 4"):
        assert_trees_equal(a, {**a, "opt": Pair(torch.tensor(1), 4)})
    with pytest.raises(AssertionError, match="s/0: 1.0 vs 1.5"):
        assert_trees_equal(a, {**a, "s": [1.5, None]})


def test_close_uses_tolerances_on_floats_only() -> None:
    a = torch.tensor([1.0, 2.0])
    assert_trees_close(tree(a), tree(a + 1e-7), rtol=1e-5, atol=0.0)
    with pytest.raises(AssertionError, match=r"not close .* params/w: 2 of 2 elements differ, max abs diff 0.001"):
        assert_trees_close(tree(a), tree(a + 1e-3), rtol=1e-5, atol=1e-8)
    with pytest.raises(AssertionError, match="opt/a: 1 of 1 elements differ"):
        assert_trees_close(tree(a), {**tree(a), "opt": Pair(torch.tensor(2), 3)})
