"""Test helpers on top of functrain's own tree tools (functrain.testing, functrain.tree_digest)."""

from __future__ import annotations

import optree
import torch

import functrain as ft
from functrain.core.struct import NAMESPACE
from functrain.testing import assert_trees_equal as assert_bitwise_equal  # noqa: F401  (bitwise, names the path)


def clone_tree(tree):
    return optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree, namespace=NAMESPACE)


def dropout_run_digest(compiled: bool) -> str:
    """Three train steps with dropout from a fixed seed; the digest of the final state.

    Run in the test process and in fresh ones: the digests must agree. Eager: a tiny
    transformer with AdamW; compiled: an MLP with SGD momentum (a quicker compile).
    """
    from models import MLP, TinyTransformer, classification_loss, lm_batch, lm_loss, mlp_batch

    torch.manual_seed(0)
    if compiled:
        torch._dynamo.reset()
        model, loss, make_batch, opt, seed = MLP(dropout=0.5), classification_loss, mlp_batch, ft.optim.sgd(
            0.1, momentum=0.9), 4
    else:
        model, loss, make_batch, opt, seed = TinyTransformer(dropout=0.3), lm_loss, lm_batch, ft.optim.adamw(1e-2), 9
    state = ft.TrainState.create(model, opt, seed=seed)
    step = ft.make_train_step(model, loss, opt)
    if compiled:
        step = ft.jit(step)
    for i in range(3):
        state = step(state, make_batch(seed=i))
    return ft.tree_digest(state)
