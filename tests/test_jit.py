"""Compiled steps: one graph, no recompiles, purity and determinism (inductor, small models)."""

import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from models import MLP, ConvBN, TinyTransformer, classification_loss, conv_batch, lm_batch, lm_loss, mlp_batch
from treeutil import assert_bitwise_equal, clone_tree, dropout_run_digest

import functrain as ft

pytestmark = pytest.mark.compile
HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)

CASES = {
    "mlp": (lambda: MLP(dropout=0.1), classification_loss, mlp_batch),
    "transformer": (lambda: TinyTransformer(dropout=0.1), lm_loss, lm_batch),
    "convbn": (ConvBN, classification_loss, conv_batch),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def compiled_case(request):
    torch._dynamo.reset()
    make_model, loss, make_batch = CASES[request.param]
    torch.manual_seed(0)
    model = make_model()
    opt = ft.optim.chain(
        ft.optim.clip_by_global_norm(1.0),
        ft.optim.adamw(ft.optim.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 40), weight_decay=0.01),
    )
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    eager = ft.make_train_step(model, loss, opt)
    step = ft.jit(eager, backend=counter)
    state = ft.TrainState.create(model, opt, seed=3)
    return request.param, model, opt, eager, step, state, make_batch, counter


def test_one_graph_and_no_recompiles_over_20_steps(compiled_case):
    name, _, _, _, step, state, make_batch, counter = compiled_case
    state = step(state, make_batch(seed=0))
    assert counter.frame_count == 1, f"{name}: {counter.frame_count} graphs"
    for i in range(1, 21):
        state = step(state, make_batch(seed=i))
    assert counter.frame_count == 1, f"{name}: recompiled ({counter.frame_count} graphs)"
    assert int(state.step) == 21 and torch.isfinite(state.metrics["loss"])
    assert float(state.metrics["learning_rate"]) > 0


def test_compiled_step_is_pure_and_deterministic(compiled_case):
    name, _, _, _, step, state, make_batch, _ = compiled_case
    batch = make_batch(seed=1)
    snapshot = clone_tree(state)
    global_before = torch.get_rng_state()
    a = step(state, batch)
    b = step(state, batch)
    assert_bitwise_equal(state, snapshot)
    assert_bitwise_equal(a, b)
    assert torch.equal(torch.get_rng_state(), global_before)
    if name == "convbn":
        assert not torch.equal(a.buffers["bn.running_var"], state.buffers["bn.running_var"])


def test_compiled_matches_eager_without_dropout():
    # SGD, so that float64 rounding differences of the fused kernels are not amplified by
    # Adam's division by small second moments; the optimizer alone is checked in test_optim.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ConvBN().double()
    opt = ft.optim.sgd(0.05, momentum=0.9)
    state = ft.TrainState.create(model, opt)
    eager = ft.make_train_step(model, classification_loss, opt)
    compiled = ft.jit(eager)
    se = sc = state
    for i in range(5):
        x, y = conv_batch(seed=i)
        se, sc = eager(se, (x.double(), y)), compiled(sc, (x.double(), y))
    for k in se.params:
        torch.testing.assert_close(sc.params[k], se.params[k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sc.buffers["bn.running_mean"], se.buffers["bn.running_mean"], rtol=1e-10, atol=1e-12)


def test_compiled_dropout_step_gives_the_same_bytes_in_a_new_process():
    script = (f"import sys; sys.path[:0] = [{HERE!r}, {ROOT!r}]; "
              f"import treeutil; print(treeutil.dropout_run_digest(True))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert out.splitlines()[-1] == dropout_run_digest(True)
