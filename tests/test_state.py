import dataclasses

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from models import MLP, ConvBN
from torch import nn

import functrain as ft
from functrain.core.struct import NAMESPACE


def make_state(model=None, seed=0):
    model = model or ConvBN()
    return ft.TrainState.create(model, ft.optim.adamw(1e-3), seed=seed)


def test_params_and_buffers_are_keyed_like_state_dict_and_detached_copies():
    model = ConvBN()
    state = make_state(model)
    assert set(state.params) | set(state.buffers) == set(model.state_dict())
    assert set(state.params) == {n for n, _ in model.named_parameters()}
    assert "bn.running_mean" in state.buffers and "bn.num_batches_tracked" in state.buffers
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p) and state.params[name].data_ptr() != p.data_ptr()
        assert not state.params[name].requires_grad


def test_counters_are_0d_int64_tensors_and_key_is_int64_pair():
    state = make_state()
    for c in (state.step, state.micro_step, state.epoch, state.data_index, state.tracker.best_step):
        assert isinstance(c, torch.Tensor) and c.dim() == 0 and c.dtype == torch.int64
    assert state.rng.dtype == torch.int64 and state.rng.shape == (2,)
    assert torch.isnan(state.tracker.best_score)


def test_state_is_frozen_and_replace_returns_a_new_state():
    state = make_state()
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.step = torch.tensor(3)
    new = state.replace(step=torch.tensor(3))
    assert int(new.step) == 3 and int(state.step) == 0
    assert new.params is state.params


@pytest.mark.parametrize("library", ["optree", "torch"])
def test_state_round_trips_through_both_pytree_registries(library):
    state = make_state()
    if library == "optree":
        leaves, spec = optree.tree_flatten(state, namespace=NAMESPACE)
        back = optree.tree_unflatten(spec, leaves)
    else:
        leaves, spec = torch_pytree.tree_flatten(state)
        back = torch_pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, ft.TrainState)
    n_tensors = len(state.params) + len(state.buffers)
    assert sum(isinstance(x, torch.Tensor) for x in leaves) > n_tensors  # counters, opt state, rng too
    assert all(torch.equal(back.params[k], state.params[k]) for k in state.params)
    def double(x):
        return x * 2 if isinstance(x, torch.Tensor) else x

    doubled = (optree.tree_map(double, state, namespace=NAMESPACE)
               if library == "optree" else torch_pytree.tree_map(double, state))
    assert int(doubled.step) == 0 and int(doubled.rng[0]) == 2 * int(state.rng[0])


def test_optree_paths_name_fields_and_keys():
    state = make_state(MLP())
    paths = ["/".join(map(str, p)) for p in optree.tree_paths(state, namespace=NAMESPACE)]
    assert "params/fc1.weight" in paths and "step" in paths and "tracker/best_score" in paths


def test_state_dict_round_trip_strict():
    model = ConvBN()
    state = make_state(model)
    fresh = ConvBN()
    fresh.load_state_dict(ft.state_dict(state), strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])


def test_create_from_dicts_and_tied_weights_export():
    tied = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    tied[1].weight = tied[0].weight
    state = ft.TrainState.create(tied, ft.optim.sgd(0.1))
    assert list(state.params) == ["0.weight"]
    with pytest.raises(RuntimeError):
        nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)).load_state_dict(ft.state_dict(state))
    tied.load_state_dict(ft.state_dict(state, model=tied), strict=True)

    from_dicts = ft.TrainState.create({"w": torch.ones(2)}, ft.optim.sgd(0.1), buffers={"b": torch.zeros(1)})
    assert set(from_dicts.params) == {"w"} and set(from_dicts.buffers) == {"b"}
    with pytest.raises(TypeError, match="nn.Module or a dict"):
        ft.TrainState.create([torch.ones(2)], ft.optim.sgd(0.1))
