"""Donated steps: bitwise equal to the pure compiled step, in place, and the old state is unusable."""

import pytest
import torch
import torch._dynamo
from models import MLP, ConvBN, classification_loss, conv_batch, mlp_batch
from treeutil import assert_bitwise_equal, clone_tree

import functrain as ft
from functrain.core.donate import Donated, donate, is_donated

pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def trajectories():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ConvBN()
    opt = ft.optim.chain(ft.optim.clip_by_global_norm(1.0), ft.optim.adamw(1e-2, weight_decay=0.01))
    step = ft.make_train_step(model, classification_loss, opt)
    pure, donated = ft.jit(step), donate(step)
    start = ft.TrainState.create(model, opt, seed=5)
    sp, sd = start, clone_tree(start)
    pure_states, donated_states, inputs = [], [], []
    first_ptrs = [t.data_ptr() for t in sd.params.values()]
    for i in range(4):
        batch = conv_batch(seed=i)
        sp = pure(sp, batch)
        pure_states.append(clone_tree(sp))
        inputs.append(sd)
        ptrs = [t.data_ptr() for t in sd.params.values()]
        sd = donated(sd, batch)
        assert [t.data_ptr() for t in sd.params.values()] == ptrs  # written in place
        donated_states.append(clone_tree(sd))
    return first_ptrs, pure_states, donated_states, inputs, donated, sd


def test_donated_is_bitwise_equal_to_pure_over_several_steps(trajectories):
    _, pure_states, donated_states, _, _, _ = trajectories
    for p, d in zip(pure_states, donated_states):
        assert_bitwise_equal(p, d)
    assert int(donated_states[-1].step) == 4
    assert not torch.equal(donated_states[0].buffers["bn.running_mean"], donated_states[-1].buffers["bn.running_mean"])


def test_donated_step_leaves_the_first_states_tensors_updated_not_copied(trajectories):
    first_ptrs, _, donated_states, inputs, _, last = trajectories
    assert is_donated(inputs[0]) and not is_donated(last)
    # after four steps the state still lives in the memory of the state given to the first call
    assert [t.data_ptr() for t in last.params.values()] == first_ptrs
    assert_bitwise_equal(last, donated_states[-1])


@pytest.mark.parametrize("use", [
    lambda s: s.params["conv.weight"],
    lambda s: list(s.buffers),
    lambda s: s.opt_state[1],
    lambda s: s.params.values(),
])
def test_reading_a_donated_state_raises(trajectories, use):
    old = trajectories[3][1]
    with pytest.raises(RuntimeError, match="donated to jit_donated"):
        use(old)


def test_calling_a_step_on_a_donated_state_raises(trajectories):
    _, _, _, inputs, donated, _ = trajectories
    old = inputs[2]
    assert isinstance(old.__dict__["params"], Donated)
    with pytest.raises(RuntimeError, match="Use the returned state"):
        donated(old, conv_batch(seed=9))
    with pytest.raises(RuntimeError, match="donated"):
        ft.make_train_step(ConvBN(), classification_loss, ft.optim.sgd(0.1))(old, conv_batch(seed=9))


def test_donate_refuses_a_step_that_changes_shapes():
    torch._dynamo.reset()
    model = MLP()
    opt = ft.optim.sgd(0.1)
    state = ft.TrainState.create(model, opt)

    def grow(s, batch):
        return s.replace(params={k: torch.cat([v, v]) for k, v in s.params.items()})

    step = donate(ft.Step(grow, uses_rng=False), backend="aot_eager")
    with pytest.raises(Exception, match="keep shapes"):
        step(state, mlp_batch())
    assert not is_donated(state) and state.params["fc1.weight"].shape == (16, 8)


def test_donate_rejects_a_non_step():
    with pytest.raises(TypeError, match="functrain Step"):
        donate(lambda s, b: s)
