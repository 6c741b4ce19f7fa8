"""vmap populations: each member of a stacked state trains like the same model alone."""

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from models import MLP, ConvBN, classification_loss, conv_batch, mlp_batch
from treeutil import assert_bitwise_equal

import functrain as ft
from functrain.core import population as pop

SCALES = [1.0, 0.25, 3.0]


def _members(make_model, opt):
    out = []
    for i, scale in enumerate(SCALES):
        torch.manual_seed(i)
        out.append(pop.set_lr_scale(ft.TrainState.create(make_model().double(), opt, seed=i), scale))
    return out


def _double(batch):
    x, y = batch
    return x.double(), y


def _assert_member_equals_solo(member, solo):
    for field in ("params", "buffers"):
        for k, v in getattr(solo, field).items():
            torch.testing.assert_close(getattr(member, field)[k], v, rtol=1e-9, atol=1e-12, msg=f"{field}/{k}")
    torch.testing.assert_close(member.metrics["loss"], solo.metrics["loss"], rtol=1e-9, atol=1e-12)
    assert int(member.step) == int(solo.step)


# ConvBN's conv bias has a zero gradient up to rounding (BatchNorm removes it); Adam would
# normalise that noise into full-size steps, so the BatchNorm model trains with SGD.
CASES = [
    (MLP, mlp_batch, lambda: ft.optim.adamw(1e-2, weight_decay=0.01)),
    (ConvBN, conv_batch, lambda: ft.optim.sgd(0.05, momentum=0.9, weight_decay=0.01)),
]


@pytest.mark.parametrize("make_model,make_batch,make_opt", CASES, ids=["mlp-adamw", "convbn-sgd"])
@pytest.mark.parametrize("batch_axis", [None, 0])
def test_each_member_equals_the_same_model_trained_alone(make_model, make_batch, make_opt, batch_axis):
    opt = pop.lr_scale(make_opt())
    step = ft.make_train_step(make_model().double(), classification_loss, opt)
    members = _members(make_model, opt)
    solo = list(members)
    stacked = pop.stack_states(members)
    pstep = pop.population_step(step, batch_axis=batch_axis)
    for k in range(4):
        batches = [_double(make_batch(seed=10 * k + i)) for i in range(len(SCALES))]
        if batch_axis is None:
            batches = [batches[0]] * len(SCALES)
            stacked = pstep(stacked, batches[0])
        else:
            stacked = pstep(stacked, (torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])))
        solo = [step(s, b) for s, b in zip(solo, batches)]
    out = pop.unstack_state(stacked)
    for member, alone in zip(out, solo):
        _assert_member_equals_solo(member, alone)
    # the members really differ (different init and learning rates)
    assert not torch.allclose(out[0].params["fc2.weight" if make_model is MLP else "head.weight"],
                              out[1].params["fc2.weight" if make_model is MLP else "head.weight"])


def test_learning_rate_scale_changes_training_like_a_learning_rate():
    base = ft.optim.sgd(0.1)
    params = {"w": torch.ones(3, dtype=torch.float64)}
    grads = {"w": torch.full((3,), 2.0, dtype=torch.float64)}
    tx = pop.lr_scale(base, init_scale=0.5)
    new, _ = ft.optim.apply_gradients(tx, grads, tx.init(params), params)
    ref, _ = ft.optim.apply_gradients(ft.optim.sgd(0.05), grads, ft.optim.sgd(0.05).init(params), params)
    torch.testing.assert_close(new["w"], ref["w"], rtol=1e-15, atol=0)


def test_stack_and_unstack_round_trip_bitwise():
    opt = ft.optim.adamw(1e-3)
    members = [ft.TrainState.create(MLP(), opt, seed=i) for i in range(3)]
    stacked = pop.stack_states(members)
    assert stacked.params["fc1.weight"].shape == (3, 16, 8) and stacked.rng.shape == (3, 2)
    assert pop.population_size(stacked) == 3
    for a, b in zip(pop.unstack_state(stacked), members):
        assert_bitwise_equal(a, b)


def test_stack_refuses_mismatched_members():
    a = ft.TrainState.create(MLP(), ft.optim.adamw(1e-3))
    b = ft.TrainState.create(MLP(d_hidden=8), ft.optim.adamw(1e-3))
    with pytest.raises(ValueError, match="differs in shape"):
        pop.stack_states([a, b])
    with pytest.raises(ValueError, match="different tree structure"):
        pop.stack_states([a, ft.TrainState.create(MLP(), ft.optim.sgd(0.1))])
    with pytest.raises(ValueError, match="not a stacked state"):
        pop.unstack_state(a)
    with pytest.raises(TypeError, match="lr_scale"):
        pop.set_lr_scale(a, 0.5)


def test_population_with_dropout_is_pure_and_members_draw_different_masks():
    opt = ft.optim.sgd(0.1)
    model = MLP(dropout=0.5)
    step = pop.population_step(ft.make_train_step(model, classification_loss, opt), randomness="different")
    torch.manual_seed(0)
    same = ft.TrainState.create(model, opt, seed=0)
    stacked = pop.stack_states([same, same])  # identical members: only dropout can separate them
    before = torch.get_rng_state()
    a = step(stacked, mlp_batch())
    b = step(stacked, mlp_batch())
    assert_bitwise_equal(a, b)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(a.params["fc1.weight"][0], a.params["fc1.weight"][1])
    same_rand = pop.population_step(ft.make_train_step(model, classification_loss, opt), randomness="same")
    c = same_rand(stacked, mlp_batch())
    assert torch.equal(c.params["fc1.weight"][0], c.params["fc1.weight"][1])


@pytest.mark.compile
def test_compiled_population_does_not_recompile_and_matches_eager_population():
    torch._dynamo.reset()
    opt = pop.lr_scale(ft.optim.sgd(0.05, momentum=0.9))
    step = ft.make_train_step(MLP().double(), classification_loss, opt)
    stacked = pop.stack_states(_members(MLP, opt))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = ft.jit(pop.population_step(step), backend=counter)
    eager = pop.population_step(step)
    sc = se = stacked
    for k in range(5):
        batch = _double(mlp_batch(seed=k))
        sc, se = compiled(sc, batch), eager(se, batch)
        if k == 1:
            # the vmapped body reads the whole state, so the first call (empty metrics) has its own graph
            graphs = counter.frame_count
    assert graphs <= 2 and counter.frame_count == graphs, "recompiled from step to step"
    for k, v in se.params.items():
        torch.testing.assert_close(sc.params[k], v, rtol=1e-9, atol=1e-12)
