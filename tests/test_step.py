"""Pure steps in eager mode: purity, counters, equivalence with a plain PyTorch loop."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from models import MLP, ConvBN, TinyTransformer, classification_loss, conv_batch, lm_batch, lm_loss, mlp_batch
from treeutil import assert_bitwise_equal, clone_tree, dropout_run_digest

import functrain as ft

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def test_train_step_is_pure_and_updates_buffers_counters_rng_metrics():
    torch.manual_seed(0)
    model = ConvBN()
    opt = ft.optim.adamw(1e-2)
    state = ft.TrainState.create(model, opt, seed=1)
    snapshot = clone_tree(state)
    step = ft.make_train_step(model, classification_loss, opt)
    new = step(state, conv_batch())
    assert_bitwise_equal(state, snapshot)  # nothing in the input changed, BatchNorm buffers included
    assert int(new.step) == 1 and int(new.micro_step) == 1
    assert not torch.equal(new.buffers["bn.running_mean"], state.buffers["bn.running_mean"])
    assert int(new.buffers["bn.num_batches_tracked"]) == 1
    assert not torch.equal(new.rng, state.rng)
    assert set(new.metrics) >= {"loss", "grad_norm", "accuracy"}
    assert all(v.dim() == 0 for v in new.metrics.values())
    assert all(not torch.equal(new.params[k], state.params[k]) for k in state.params)


def test_sgd_train_steps_match_a_plain_pytorch_loop():
    torch.manual_seed(0)
    model = ConvBN().double()
    reference = ConvBN().double()
    reference.load_state_dict(model.state_dict())
    opt = ft.optim.sgd(0.05, momentum=0.9)
    state = ft.TrainState.create(model, opt)
    step = ft.make_train_step(model, classification_loss, opt)
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    reference.train()
    for i in range(10):
        x, y = conv_batch(seed=i)
        x = x.double()
        state = step(state, (x, y))
        torch_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        torch_opt.step()
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(ft.state_dict(state)[k], v, rtol=1e-12, atol=1e-12)


def test_dropout_step_is_a_pure_function_of_state_and_batch():
    model = TinyTransformer(dropout=0.3)
    opt = ft.optim.sgd(0.1)
    state = ft.TrainState.create(model, opt, seed=5)
    step = ft.make_train_step(model, lm_loss, opt)
    batch = lm_batch()
    global_before = torch.get_rng_state()
    a, b = step(state, batch), step(state, batch)
    assert torch.equal(torch.get_rng_state(), global_before)
    assert_bitwise_equal(a, b)
    other = step(state.replace(rng=ft.random.key(6)), batch)
    assert not torch.equal(other.params["out.weight"], a.params["out.weight"])  # the key drives dropout


def test_eval_step_accumulates_weighted_means_and_keeps_model_state():
    model = MLP(dropout=0.5)
    state = ft.TrainState.create(model, None)
    x, y = mlp_batch(n=10)

    def metrics(forward, batch):
        xb, yb = batch
        logits = forward(xb)
        return {"loss": F.cross_entropy(logits, yb), "correct": (logits.argmax(-1) == yb).double()}

    step = ft.make_eval_step(model, metrics)
    s = step(state, (x[:6], y[:6]))
    s = step(s, (x[6:], y[6:]))
    model.load_state_dict(ft.state_dict(state))
    model.eval()
    with torch.no_grad():
        logits = model(x)
    results = ft.eval_results(s)
    torch.testing.assert_close(results["loss"], F.cross_entropy(logits, y).double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results["correct"], (logits.argmax(-1) == y).double().mean())
    assert_bitwise_equal(s.params, state.params)
    assert ft.reset_eval(s).eval_metrics == {}


def test_micro_batches_average_to_the_full_batch_gradient():
    model = MLP().double()
    opt = ft.optim.sgd(0.1)
    state = ft.TrainState.create(model, opt)
    batch = mlp_batch(n=12, dtype=torch.float64)
    whole = ft.make_train_step(model, classification_loss, opt)(state, batch)
    parts = ft.make_train_step(model, classification_loss, opt, micro_batches=3)(state, batch)
    for k in whole.params:
        torch.testing.assert_close(parts.params[k], whole.params[k], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(parts.metrics["loss"], whole.metrics["loss"], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="divisible by 5"):
        ft.make_train_step(model, classification_loss, opt, micro_batches=5)(state, batch)


def test_repeat_equals_calling_k_times_and_compose_runs_in_order():
    model = MLP(dropout=0.2)
    opt = ft.optim.adamw(1e-2)
    state = ft.TrainState.create(model, opt, seed=2)
    train = ft.make_train_step(model, classification_loss, opt)
    batches = [mlp_batch(seed=i) for i in range(3)]
    stacked = (torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches]))
    by_repeat = ft.repeat(train, 3)(state, stacked)
    assert int(by_repeat.step) == 3
    assert torch.isfinite(by_repeat.metrics["loss"])
    one_by_one = state
    for b in batches:
        one_by_one = train(one_by_one, b)
    # repeat seeds once per call, single steps once each: same math, different dropout draws
    assert int(one_by_one.step) == int(by_repeat.step)
    evaluate = ft.make_eval_step(model, lambda f, b: {"loss": classification_loss(f, b)[0]})
    both = ft.compose(train, evaluate)(state, batches[0])
    assert int(both.step) == 1 and "loss" in both.eval_metrics
    assert_bitwise_equal(both.params, train(state, batches[0]).params)


def test_bad_loss_is_named():
    model = MLP()
    opt = ft.optim.sgd(0.1)
    step = ft.make_train_step(model, lambda f, b: f(b[0]), opt)
    with pytest.raises(TypeError, match="0-d loss"):
        step(ft.TrainState.create(model, opt), mlp_batch())


def test_bf16_and_fp16_precision_options():
    model = MLP()
    opt = ft.optim.sgd(0.1)
    batch = mlp_batch()
    state = ft.TrainState.create(model, opt)
    bf16 = ft.make_train_step(model, classification_loss, opt, precision="bf16")(state, batch)
    fp32 = ft.make_train_step(model, classification_loss, opt)(state, batch)
    assert bf16.params["fc1.weight"].dtype == torch.float32
    assert not torch.equal(bf16.metrics["loss"], fp32.metrics["loss"])
    torch.testing.assert_close(bf16.metrics["loss"], fp32.metrics["loss"], rtol=2e-2, atol=0)

    with pytest.raises(ValueError, match="LossScale.create"):
        ft.make_train_step(model, classification_loss, opt, precision="fp16")(state, batch)
    scaled = ft.TrainState.create(model, opt, loss_scale=ft.LossScale.create(2.0**10))
    fp16 = ft.make_train_step(model, classification_loss, opt, precision="fp16")
    s = fp16(scaled, batch)
    assert int(s.loss_scale.skipped) == 0 and float(s.loss_scale.scale) == 2.0**10
    assert not torch.equal(s.params["fc1.weight"], scaled.params["fc1.weight"])
    # an overflowing scale gives inf gradients: the step is skipped and the scale halves
    huge = scaled.replace(loss_scale=ft.LossScale.create(2.0**127 * 1.5))
    s = fp16(huge, batch)
    assert int(s.loss_scale.skipped) == 1 and float(s.loss_scale.scale) == 2.0**126 * 1.5
    assert_bitwise_equal(s.params, huge.params)
    assert_bitwise_equal(s.opt_state, huge.opt_state)


def test_same_state_and_batch_give_the_same_bytes_in_a_new_process():
    script = (f"import sys; sys.path[:0] = [{HERE!r}, {ROOT!r}]; "
              f"import treeutil; print(treeutil.dropout_run_digest(False))")
    digests = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
        for _ in range(2)
    ]
    assert digests[0] == digests[1] == dropout_run_digest(False)
