"""functrain.optim against torch.optim: bitwise where the claim is bitwise, else with stated tolerances."""

from __future__ import annotations

import copy

import pytest
import torch

from functrain import optim

SHAPES = {"layer.weight": (7, 5), "layer.bias": (5,), "norm.weight": (5,)}
STEPS = 200


def make_data(dtype, steps=STEPS, seed=0, scale=1.0):
    """Initial params and a fixed stream of random gradients (dicts keyed like a state_dict)."""
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}
    grads = [{k: scale * torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()} for _ in range(steps)]
    return params, grads


def run_functrain(tx, params, grads):
    state = tx.init(params)
    for g in grads:
        params, state = optim.apply_gradients(tx, g, state, params)
    return params, state


def run_torch(make_opt, params, grads, clip=None, schedulers=(), param_groups=None):
    """torch.optim on copies of ``params``; ``make_opt(groups)`` builds the optimizer."""
    tparams = {k: torch.nn.Parameter(p.clone()) for k, p in params.items()}
    groups = list(tparams.values()) if param_groups is None else param_groups(tparams)
    opt = make_opt(groups)
    scheds = [s(opt) for s in schedulers]
    norms = []
    for g in grads:
        for k, p in tparams.items():
            p.grad = g[k].clone()
        if clip is not None:
            norms.append(clip(list(tparams.values())))
        opt.step()
        for s in scheds:
            s.step()
    return {k: p.detach() for k, p in tparams.items()}, norms


def assert_bitwise(ours, theirs):
    assert ours.keys() == theirs.keys()
    for k in ours:
        differ = (ours[k] != theirs[k]).sum().item()
        assert torch.equal(ours[k], theirs[k]), f"{k}: {differ} of {ours[k].numel()} elements differ"


# ----------------------------------------------------------------------------- the bitwise matrix

OPTIMIZERS = {
    "sgd": (lambda: optim.sgd(0.05), lambda g, fe: torch.optim.SGD(g, lr=0.05, foreach=fe)),
    "sgd-wd": (
        lambda: optim.sgd(0.05, weight_decay=0.03),
        lambda g, fe: torch.optim.SGD(g, lr=0.05, weight_decay=0.03, foreach=fe),
    ),
    "sgd-momentum": (
        lambda: optim.sgd(0.01, momentum=0.9),
        lambda g, fe: torch.optim.SGD(g, lr=0.01, momentum=0.9, foreach=fe),
    ),
    "sgd-momentum-dampening-wd": (
        lambda: optim.sgd(0.01, momentum=0.8, dampening=0.3, weight_decay=0.01),
        lambda g, fe: torch.optim.SGD(g, lr=0.01, momentum=0.8, dampening=0.3, weight_decay=0.01, foreach=fe),
    ),
    "sgd-nesterov-wd": (
        lambda: optim.sgd(0.01, momentum=0.9, nesterov=True, weight_decay=0.02),
        lambda g, fe: torch.optim.SGD(g, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.02, foreach=fe),
    ),
    "adam": (lambda: optim.adam(1e-3), lambda g, fe: torch.optim.Adam(g, lr=1e-3, foreach=fe)),
    "adam-options": (
        lambda: optim.adam(3e-3, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.05),
        lambda g, fe: torch.optim.Adam(g, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, foreach=fe),
    ),
    "adam-amsgrad-wd": (
        lambda: optim.adam(1e-3, weight_decay=0.01, amsgrad=True),
        lambda g, fe: torch.optim.Adam(g, lr=1e-3, weight_decay=0.01, amsgrad=True, foreach=fe),
    ),
    "adamw": (lambda: optim.adamw(1e-3), lambda g, fe: torch.optim.AdamW(g, lr=1e-3, foreach=fe)),
    "adamw-options": (
        lambda: optim.adamw(2e-3, b1=0.85, b2=0.99, eps=1e-7, weight_decay=0.1),
        lambda g, fe: torch.optim.AdamW(g, lr=2e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.1, foreach=fe),
    ),
    "adamw-amsgrad": (
        lambda: optim.adamw(1e-3, weight_decay=0.05, amsgrad=True),
        lambda g, fe: torch.optim.AdamW(g, lr=1e-3, weight_decay=0.05, amsgrad=True, foreach=fe),
    ),
}


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bitwise_equal_to_torch_optim_after_200_steps(name, dtype, foreach):
    make_tx, make_torch = OPTIMIZERS[name]
    params, grads = make_data(dtype)
    ours, state = run_functrain(make_tx(), params, grads)
    theirs, _ = run_torch(lambda g: make_torch(g, foreach), params, grads)
    assert_bitwise(ours, theirs)
    assert int(state.count) == STEPS
    assert not torch.equal(ours["layer.weight"], params["layer.weight"])  # it did move


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["sgd-momentum", "adam", "adamw-amsgrad"])
def test_clip_by_global_norm_then_optimizer_is_bitwise_clip_grad_norm(name, dtype, foreach):
    make_tx, make_torch = OPTIMIZERS[name]
    start, grads = make_data(dtype, steps=50, scale=0.3)  # norms around 2.0: some steps clip, some not
    tx = optim.chain(optim.clip_by_global_norm(2.0), make_tx())
    params, state = start, tx.init(start)
    norms = []
    for g in grads:
        params, state = optim.apply_gradients(tx, g, state, params)
        norms.append(optim.stats(state)["grad_norm"])
    theirs, torch_norms = run_torch(
        lambda g: make_torch(g, foreach), start, grads, clip=lambda ps: torch.nn.utils.clip_grad_norm_(ps, 2.0)
    )
    assert_bitwise(params, theirs)
    assert all(torch.equal(a, b) for a, b in zip(norms, torch_norms))
    assert any(n > 2.0 for n in torch_norms) and any(n < 2.0 for n in torch_norms)


def test_clip_by_value_then_sgd_is_bitwise_clip_grad_value():
    params, grads = make_data(torch.float32, steps=50)
    ours, _ = run_functrain(optim.chain(optim.clip_by_value(0.5), optim.sgd(0.1, momentum=0.5)), params, grads)
    theirs, _ = run_torch(
        lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.5),
        params,
        grads,
        clip=lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.5),
    )
    assert_bitwise(ours, theirs)
    unclipped, _ = run_functrain(optim.sgd(0.1, momentum=0.5), params, grads)
    assert not torch.equal(unclipped["layer.weight"], ours["layer.weight"])


def test_decay_mask_matches_torch_param_group_without_weight_decay():
    params, grads = make_data(torch.float64, steps=100)
    assert optim.decay_mask(params) == {"layer.weight": True, "layer.bias": False, "norm.weight": False}
    ours, _ = run_functrain(optim.adamw(1e-2, weight_decay=0.5, mask=optim.decay_mask), params, grads)

    def groups(tp):
        return [
            {"params": [tp["layer.weight"]]},
            {"params": [tp["layer.bias"], tp["norm.weight"]], "weight_decay": 0.0},
        ]

    theirs, _ = run_torch(lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.5), params, grads, param_groups=groups)
    assert_bitwise(ours, theirs)


def test_multi_transform_matches_torch_param_groups_and_set_to_zero_freezes():
    params, grads = make_data(torch.float32, steps=100)
    labels = {"layer.weight": "fast", "layer.bias": "slow", "norm.weight": "frozen"}
    tx = optim.multi_transform(
        {"fast": optim.sgd(0.1, momentum=0.9), "slow": optim.adam(1e-3), "frozen": optim.set_to_zero()}, labels
    )
    ours, state = run_functrain(tx, params, grads)
    fast, _ = run_torch(lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9), params, grads)
    slow, _ = run_torch(lambda g: torch.optim.Adam(g, lr=1e-3), params, grads)
    assert torch.equal(ours["layer.weight"], fast["layer.weight"])
    assert torch.equal(ours["layer.bias"], slow["layer.bias"])
    assert torch.equal(ours["norm.weight"], params["norm.weight"])
    assert set(state.inner) == {"fast", "slow", "frozen"}


def test_masked_applies_inner_only_where_true_and_passes_the_rest_through():
    params, grads = make_data(torch.float64, steps=3)
    mask = {"layer.weight": True, "layer.bias": False, "norm.weight": False}
    tx = optim.chain(optim.masked(optim.clip_by_value(0.1), mask), optim.sgd(1.0))
    ours, _ = run_functrain(tx, params, grads)
    w = params["layer.weight"] - sum(g["layer.weight"].clamp(-0.1, 0.1) for g in grads)
    b = params["layer.bias"] - sum(g["layer.bias"] for g in grads)
    torch.testing.assert_close(ours["layer.weight"], w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours["layer.bias"], b, rtol=1e-12, atol=1e-12)


def test_mask_with_wrong_keys_names_the_path():
    params, _ = make_data(torch.float32, steps=1)
    tx = optim.adamw(1e-3, mask={"layer.weight": True})
    with pytest.raises(ValueError, match="layer.bias"):
        optim.apply_gradients(tx, params, tx.init(params), params)


# ----------------------------------------------------------------------------- wrappers


def test_skip_nonfinite_leaves_params_and_state_unchanged_and_counts():
    params, grads = make_data(torch.float32, steps=30)
    bad_steps = {3, 4, 17}
    poisoned = []
    for i, g in enumerate(grads):
        g = dict(g)
        if i in bad_steps:
            g["layer.bias"] = g["layer.bias"].clone()
            g["layer.bias"][i % 5] = float("nan") if i != 4 else float("inf")
        poisoned.append(g)
    tx = optim.skip_nonfinite(optim.chain(optim.clip_by_global_norm(2.0), optim.adamw(1e-2)))
    ours, state = run_functrain(tx, params, poisoned)
    clean = [g for i, g in enumerate(grads) if i not in bad_steps]
    theirs, _ = run_torch(
        lambda g: torch.optim.AdamW(g, lr=1e-2), params, clean, clip=lambda ps: torch.nn.utils.clip_grad_norm_(ps, 2.0)
    )
    assert_bitwise(ours, theirs)
    assert int(optim.stats(state)["skipped"]) == len(bad_steps)
    assert int(state.inner[1].count) == len(clean)


@pytest.mark.parametrize("make", [lambda: optim.sgd(0.1, momentum=0.9, dampening=0.2), lambda: optim.adam(1e-2)])
def test_accumulate_applies_the_mean_every_k_calls(make):
    k = 3
    params, micro = make_data(torch.float64, steps=4 * k)
    means = [{n: (micro[i][n] + micro[i + 1][n] + micro[i + 2][n]) / k for n in SHAPES} for i in range(0, 4 * k, k)]
    expected, _ = run_functrain(make(), params, means)
    tx = optim.accumulate(make(), every=k)
    state = tx.init(params)
    applied = []
    p = params
    for g in micro:
        p, state = optim.apply_gradients(tx, g, state, p)
        applied.append(int(optim.stats(state)["applied"]))
    assert applied == [0, 0, 1] * 4
    assert_bitwise(p, expected)
    assert int(state.mini_step) == 0


def test_ema_tracks_the_params_after_each_update():
    params, grads = make_data(torch.float64, steps=20)
    tx = optim.ema(optim.sgd(0.1), decay=0.9)
    state = tx.init(params)
    expected = {k: v.clone() for k, v in params.items()}
    p = params
    for g in grads:
        p, state = optim.apply_gradients(tx, g, state, p)
        expected = {k: 0.9 * expected[k] + 0.1 * p[k] for k in p}
    got = optim.ema_params(state)
    for k in p:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-14)
    assert optim.ema_params(optim.sgd(0.1).init(params)) is None
    plain, _ = run_functrain(optim.sgd(0.1), params, grads)
    assert_bitwise(p, plain)


def test_stats_finds_learning_rate_grad_norm_skipped_applied():
    params, grads = make_data(torch.float32, steps=2)
    sched = optim.linear_schedule(0.0, 1.0, 10)
    tx = optim.skip_nonfinite(optim.accumulate(optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(sched)), 2))
    _, state = run_functrain(tx, params, grads)
    s = optim.stats(state)
    assert set(s) == {"learning_rate", "grad_norm", "skipped", "applied"}
    assert s["learning_rate"].item() == pytest.approx(0.0)  # the lr of the one update applied (step 0)
    assert s["applied"].item() == 1 and s["skipped"].item() == 0
    expected_norm = torch.linalg.vector_norm(torch.cat([((grads[0][k] + grads[1][k]) / 2).flatten() for k in SHAPES]))
    torch.testing.assert_close(s["grad_norm"], expected_norm)


def test_step_is_pure_inputs_are_not_mutated():
    params, grads = make_data(torch.float32, steps=3)
    tx = optim.ema(optim.accumulate(optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, amsgrad=True)), 1))
    state = tx.init(params)
    for g in grads:
        before = copy.deepcopy((params, state, g))
        new_params, new_state = optim.apply_gradients(tx, g, state, params)
        leaves_now = torch.utils._pytree.tree_leaves((params, state, g))
        leaves_before = torch.utils._pytree.tree_leaves(before)
        assert len(leaves_now) == len(leaves_before) > 10
        for a, b in zip(leaves_now, leaves_before):
            assert a is None and b is None or torch.equal(a, b)
        params, state = new_params, new_state


# ----------------------------------------------------------------------------- additive updates


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_additive_update_is_close_but_step_is_the_exact_one(dtype):
    params, grads = make_data(dtype)
    tx = optim.adamw(1e-3, weight_decay=0.1)
    state = tx.init(params)
    p = params
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = optim.apply_updates(p, updates)
    theirs, _ = run_torch(lambda g: torch.optim.AdamW(g, lr=1e-3, weight_decay=0.1), params, grads)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for k in p:
        torch.testing.assert_close(p[k], theirs[k], rtol=tol, atol=tol)
    assert any(not torch.equal(p[k], theirs[k]) for k in p)  # why ``step`` exists


# ----------------------------------------------------------------------------- schedules

SCHEDULES = {
    "linear-warmup": (
        optim.linear_schedule(0.1 * 0.5, 0.5, 20),
        [lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=20)],
    ),
    "linear-decay": (
        optim.linear_schedule(0.5, 0.0, 150),
        [lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=150)],
    ),
    "cosine": (
        optim.cosine_decay_schedule(0.5, STEPS, alpha=0.1),
        [lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS, eta_min=0.05)],
    ),
    "step": (optim.step_schedule(0.5, 30, 0.5), [lambda o: torch.optim.lr_scheduler.StepLR(o, 30, 0.5)]),
    "exponential-staircase": (
        optim.exponential_decay(0.5, 30, 0.5, staircase=True),
        [lambda o: torch.optim.lr_scheduler.StepLR(o, 30, 0.5)],
    ),
    "multistep": (
        optim.multistep_schedule(0.5, [50, 120], 0.1),
        [lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [50, 120], 0.1)],
    ),
    "warmup-cosine": (
        optim.warmup_cosine_decay_schedule(0.05, 0.5, 20, STEPS, end_value=0.01),
        [
            lambda o: torch.optim.lr_scheduler.SequentialLR(
                o,
                [
                    torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=20),
                    torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS - 20, eta_min=0.01),
                ],
                milestones=[20],
            )
        ],
    ),
}


def torch_lrs(make_sched, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = make_sched(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_values_match_lr_scheduler(name):
    schedule, (make_sched,) = SCHEDULES[name]
    expected = torch.tensor(torch_lrs(make_sched, STEPS), dtype=torch.float64)
    got = torch.stack([schedule(torch.tensor(t)) for t in range(STEPS)])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    assert len(set(expected.tolist())) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["warmup-cosine", "step", "multistep"])
def test_scheduled_adamw_and_sgd_match_torch_with_scheduler(name, dtype):
    schedule, schedulers = SCHEDULES[name]
    params, grads = make_data(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for tx, make_opt in [
        (optim.adamw(schedule, weight_decay=0.1), lambda g: torch.optim.AdamW(g, lr=0.5, weight_decay=0.1)),
        (optim.sgd(schedule, momentum=0.9), lambda g: torch.optim.SGD(g, lr=0.5, momentum=0.9)),
    ]:
        ours, state = run_functrain(tx, params, grads)
        theirs, _ = run_torch(make_opt, params, grads, schedulers=schedulers)
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], rtol=tol, atol=tol)
        assert state.learning_rate.dtype == torch.float64
        assert state.learning_rate.item() == pytest.approx(schedule(torch.tensor(STEPS - 1)).item())


def test_multistep_schedule_is_bitwise_with_multisteplr():
    """Piecewise-constant scales multiply in the same order as MultiStepLR, so even params are bitwise."""
    schedule, schedulers = SCHEDULES["multistep"]
    params, grads = make_data(torch.float32)
    ours, _ = run_functrain(optim.adam(schedule), params, grads)
    theirs, _ = run_torch(lambda g: torch.optim.Adam(g, lr=0.5), params, grads, schedulers=schedulers)
    assert_bitwise(ours, theirs)


def test_join_schedules_switches_at_the_boundary_with_a_shifted_step():
    s = optim.join_schedules([optim.constant_schedule(1.0), optim.linear_schedule(2.0, 3.0, 10)], [5])
    got = [s(torch.tensor(t)).item() for t in (0, 4, 5, 10, 15, 100)]
    assert got == pytest.approx([1.0, 1.0, 2.0, 2.5, 3.0, 3.0])


# ----------------------------------------------------------------------------- compiled


@pytest.mark.compile
def test_compiled_adamw_clip_schedule_matches_eager_and_compiles_once():
    import torch._dynamo.testing

    tx = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.adamw(optim.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20), weight_decay=0.1, mask=optim.decay_mask),
    )

    def train_step(params, opt_state, grads):
        return optim.apply_gradients(tx, grads, opt_state, params)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(train_step, backend="inductor", fullgraph=True)
    counted = torch.compile(train_step, backend=counter, fullgraph=True)
    params, grads = make_data(torch.float64, steps=6)
    eager_p, eager_s = params, tx.init(params)
    comp_p, comp_s = params, tx.init(params)
    count_p, count_s = params, tx.init(params)
    for g in grads:
        eager_p, eager_s = train_step(eager_p, eager_s, g)
        comp_p, comp_s = compiled(comp_p, comp_s, g)
        count_p, count_s = counted(count_p, count_s, g)
    assert counter.frame_count == 1
    assert int(comp_s[1].count) == len(grads)
    for k in eager_p:
        torch.testing.assert_close(comp_p[k], eager_p[k], rtol=1e-12, atol=0)
        assert not torch.equal(comp_p[k], params[k])
    torch.testing.assert_close(comp_s[0].grad_norm, eager_s[0].grad_norm, rtol=1e-12, atol=0)


def test_computed_once_is_the_identity_in_eager_mode():
    from functrain.optim import _tree

    x = torch.tensor(-0.25, dtype=torch.float64)
    assert _tree.computed_once(x) is x


@pytest.mark.compile
@pytest.mark.parametrize("schedule", [False, True], ids=["constant_lr", "cosine_schedule"])
def test_compiled_adamw_computes_its_scalars_once_not_per_element_and_bitwise_the_same(monkeypatch, schedule):
    # Inductor inlines 0-d math into every element loop: the bias corrections' pow (and a
    # schedule's cos) ran once per 16 floats of every param. computed_once hoists them out
    # without changing a bit of the result.
    from torch._inductor.utils import run_and_get_code

    from functrain.optim import _tree

    gen = torch.Generator().manual_seed(0)
    shapes = {f"w{i}": (64, 48) for i in range(3)}
    params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    grads = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    lr = optim.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20) if schedule else 1e-2
    tx = optim.adamw(lr, weight_decay=0.1)
    state = tx.init(params)
    state = state._replace(count=torch.tensor(5))

    def step(p, s, g):
        return optim.apply_gradients(tx, g, s, p)

    def compiled_code():
        torch._dynamo.reset()
        out, code = run_and_get_code(torch.compile(step, backend="inductor", fullgraph=True), params, state, grads)
        return out, "\n".join(code)

    hoisted, code = compiled_code()
    monkeypatch.setattr(_tree, "computed_once", lambda x: x)
    inlined, code_inlined = compiled_code()
    torch._dynamo.reset()
    assert code.count("std::pow") <= 3  # pow(b1, t), pow(b2, t), pow(bc2, 0.5): once each
    if not schedule:  # the old code: in each param's loop (a schedule's long chain inductor realizes itself)
        assert code_inlined.count("std::pow") >= 3 * len(params)
    leaves_h, spec_h = torch.utils._pytree.tree_flatten(hoisted)
    leaves_i, spec_i = torch.utils._pytree.tree_flatten(inlined)
    assert spec_h == spec_i
    assert all(torch.equal(a, b) for a, b in zip(leaves_h, leaves_i) if a is not None)
    eager = step(params, state, grads)
    for k in params:
        torch.testing.assert_close(hoisted[0][k], eager[0][k], rtol=1e-5, atol=1e-7)  # float32 fusion: ~1 ulp
