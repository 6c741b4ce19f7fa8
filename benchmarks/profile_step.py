"""Where a compiled functrain train step spends its time beyond the kernels: a reproducible profile.

Usage::

    python benchmarks/profile_step.py                     # MLP 256-512-512-10, batch 64 (bench_steps' "mlp")
    python benchmarks/profile_step.py --size tiny         # MLP 8-8-2, batch 4: the time is all per-call overhead
    python benchmarks/profile_step.py --rounds 9 --steps 100 --threads 1 --torch-profile

Three parts, all in one process:

1. Micro-timings (microseconds per call) of each piece of the Python wrapper around the
   compiled graph: the seed derivation, the rank and device look-ups, the RNG seeding
   context manager (functrain's, and the ``fork_rng`` + ``torch.manual_seed`` pair it
   replaced), the ``TrainState`` flatten/unflatten.
2. Layers added back one at a time, interleaved round by round (ratios of per-round
   rates, medians over rounds; noise from other processes hits every contender of a
   round alike):

   - ``torch fused AdamW``: the best eager PyTorch loop (the reference, 1.00x);
   - ``ceiling``: a hand-written ``torch.compile``d pure function
     ``(params, exp_avg, exp_avg_sq, count, x, y) -> (params, exp_avg, exp_avg_sq, count, loss)``
     (``torch.func.grad_and_value`` + functrain's AdamW math), no functrain wrapper;
     ``ceiling, scalars per element``: the same without
     :func:`functrain.optim._tree.computed_once`, i.e. with the bias-correction ``pow`` calls
     recomputed in every element's loop by inductor (functrain's step before the fix);
   - ``ft body``: ``functrain.jit(step).fn(state, batch)``: the compiled body on the
     ``TrainState`` pytree, without the RNG wrapper;
   - ``ft jit``: ``functrain.jit(step)(state, batch)``, what users call;
   - ``ft jit, old rng``: the body under the pre-fix wrapper (``fork_rng`` + ``torch.manual_seed``).

   The difference of two neighbouring rows is the cost of one layer.
3. With ``--torch-profile``: a ``torch.profiler`` table of ``ft jit`` steps (self CPU time
   by op), and Dynamo's guard count for the compiled body.

On a shared machine use ``--threads 1 --clock cpu``: per-call overhead is single-threaded
Python, and the process's CPU time (unlike wall time) does not count the time other
processes hold the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad_and_value  # noqa: E402

import functrain as ft  # noqa: E402
from functrain.core import rng as _rng  # noqa: E402
from functrain.core import step as _step  # noqa: E402
from functrain.optim import _tree  # noqa: E402

computed_once = getattr(_tree, "computed_once", lambda x: x)  # runs against older checkouts too

LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 0.01
SIZES = {"mlp": (256, 512, 10, 64), "tiny": (8, 8, 2, 4)}


def make_model(size: str) -> nn.Module:
    d_in, d_h, classes, _ = SIZES[size]
    return nn.Sequential(nn.Linear(d_in, d_h), nn.GELU(), nn.Linear(d_h, d_h), nn.GELU(), nn.Linear(d_h, classes))


def make_batches(size: str, k: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    d_in, _, classes, n = SIZES[size]
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(k)]


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def per_call_us(fn: Callable[[], Any], n: int = 2000) -> float:
    """Median over 5 runs of the mean time of ``n`` calls, in microseconds."""
    runs = []
    for _ in range(5):
        t0 = clock()
        for _ in range(n):
            fn()
        runs.append((clock() - t0) / n * 1e6)
    return statistics.median(runs)


# ------------------------------------------------------------------------------------- contenders


def fused_adamw(model: nn.Module) -> Callable[[Any], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, fused=True)

    def step(batch: Any) -> None:
        x, y = batch
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def ceiling(model: nn.Module, hoist: bool = True) -> Callable[[Any], None]:
    """A compiled pure step with no functrain layer: flat tuple of dicts in, flat tuple out.

    ``hoist=False`` leaves the scalar math (bias corrections) where inductor puts it: inlined
    into every element's loop (see :func:`functrain.optim._tree.computed_once`).
    """
    once = computed_once if hoist else (lambda x: x)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    grad_fn = grad_and_value(loss)

    def pure(p: dict, m: dict, v: dict, count: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple:
        g, value = grad_fn(p, x, y)
        t = (count + 1).to(torch.float64)
        bc1 = 1 - torch.pow(torch.full((), B1, dtype=torch.float64), t)
        bc2_sqrt = once(torch.pow(1 - torch.pow(torch.full((), B2, dtype=torch.float64), t), 0.5))
        neg_step = once(-(LR / bc1))
        new_p, new_m, new_v = {}, {}, {}
        for k in p:
            q = p[k].mul(1 - LR * WD)
            new_m[k] = m[k].lerp(g[k], 1 - B1)
            new_v[k] = v[k].mul(B2).addcmul(g[k], g[k], value=1 - B2)
            denom = (new_v[k].sqrt() / bc2_sqrt.to(torch.float32)).add(EPS)
            new_p[k] = q + (neg_step.to(torch.float32) * new_m[k]) / denom
        return new_p, new_m, new_v, count + 1, value

    compiled = torch.compile(pure, fullgraph=True, dynamic=False)
    box = {"s": (params, {k: torch.zeros_like(v) for k, v in params.items()},
                 {k: torch.zeros_like(v) for k, v in params.items()}, torch.zeros((), dtype=torch.int64))}

    def step(batch: Any) -> None:
        p, m, v, c = box["s"]
        p, m, v, c, _ = compiled(p, m, v, c, *batch)
        box["s"] = (p, m, v, c)

    return step


def old_seeded(k: torch.Tensor, rank: int = 0) -> Any:
    """The RNG wrapper functrain used before: ``fork_rng`` + ``torch.manual_seed`` (all backends)."""
    import contextlib

    @contextlib.contextmanager
    def cm() -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_rng.seed_of(k, rank))
            yield

    return cm()


def functrain_contenders(model: nn.Module, batch: Any) -> tuple[dict[str, Callable[[Any], None]], Any]:
    opt = ft.optim.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
    step = ft.make_train_step(model, lambda f, b: F.cross_entropy(f(b[0]), b[1]), opt)
    jstep = ft.jit(step)
    box = {"s": ft.TrainState.create(model, opt, seed=0)}
    box["s"] = jstep(box["s"], batch)  # compile (metrics filled: the steady-state structure)

    def body(b: Any) -> None:
        box["s"] = jstep.fn(box["s"], b)

    def call(b: Any) -> None:
        box["s"] = jstep(box["s"], b)

    def old(b: Any) -> None:
        s = box["s"]
        with old_seeded(s.rng, _step._current_rank()):
            box["s"] = jstep.fn(s, b)

    return {"ft body (no rng wrapper)": body, "ft jit": call, "ft jit, old rng wrapper": old}, (jstep, box)


# ------------------------------------------------------------------------------------------ parts


def micro_timings(state: Any) -> dict[str, float]:
    k = state.rng

    def ours() -> None:
        with _rng.seeded(k, 0, "cpu"):
            pass

    def old() -> None:
        with old_seeded(k):
            pass

    def fork_only() -> None:
        with torch.random.fork_rng(devices=[]):
            pass

    leaves, spec = pytree.tree_flatten(state)
    return {
        "rng.seed_of (key.tolist + SplitMix64)": per_call_us(lambda: _rng.seed_of(k, 0)),
        "_current_rank": per_call_us(_step._current_rank),
        "_state_device": per_call_us(lambda: _step._state_device(state)),
        "torch.random.fork_rng, empty block": per_call_us(fork_only),
        "torch.manual_seed (visits CUDA/XPU/MTIA...)": per_call_us(lambda: torch.manual_seed(1), n=300),
        "torch.default_generator.manual_seed": per_call_us(lambda: torch.default_generator.manual_seed(1)),
        "old wrapper: fork_rng + torch.manual_seed": per_call_us(old, n=300),
        "functrain.random.seeded (now)": per_call_us(ours),
        f"tree_flatten(TrainState) ({len(leaves)} leaves)": per_call_us(lambda: pytree.tree_flatten(state)),
        "tree_unflatten(TrainState)": per_call_us(lambda: pytree.tree_unflatten(leaves, spec)),
    }


def interleaved(contenders: dict[str, Callable[[Any], None]], batches: list, rounds: int, steps: int,
                ref: str) -> dict[str, tuple[float, float]]:
    """``{name: (median us/step, median ratio of rates vs ref)}``, contenders rotated per round."""
    names = list(contenders)
    for name in names:  # warm up (compiles) outside the timing
        for i in range(3):
            contenders[name](batches[i % len(batches)])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = contenders[name]
            t0 = clock()
            for i in range(steps):
                fn(batches[i % len(batches)])
            times[name].append((clock() - t0) / steps * 1e6)
    return {n: (statistics.median(times[n]), statistics.median(a / b for a, b in zip(times[ref], times[n])))
            for n in names}


def torch_profile(call: Callable[[Any], None], batches: list, steps: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            call(batches[i % len(batches)])
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="mlp")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                   help="cpu: process CPU time, robust to other processes' load when --threads 1")
    p.add_argument("--torch-profile", action="store_true")
    args = p.parse_args(argv)
    global clock
    clock = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    init = make_model(args.size).state_dict()
    batches = make_batches(args.size)

    def fresh() -> nn.Module:
        m = make_model(args.size)
        m.load_state_dict(init)
        return m

    contenders = {"torch fused AdamW": fused_adamw(fresh()),
                  "ceiling, scalars per element": ceiling(fresh(), hoist=False),
                  "ceiling (hand-written compiled pure fn)": ceiling(fresh())}
    ft_contenders, (jstep, box) = functrain_contenders(fresh(), batches[0])
    contenders.update(ft_contenders)

    print(f"# profile_step: size={args.size} threads={args.threads} clock={args.clock} torch={torch.__version__}\n")
    print("## wrapper pieces, us per call (median of 5)")
    for name, us in micro_timings(box["s"]).items():
        print(f"  {name:48s} {us:9.2f}")
    print(f"\n## layers, {args.rounds} rounds x {args.steps} steps, interleaved")
    print(f"  {'contender':42s} {'us/step':>9s} {'vs fused':>9s}")
    for name, (us, ratio) in interleaved(contenders, batches, args.rounds, args.steps, "torch fused AdamW").items():
        print(f"  {name:42s} {us:9.1f} {ratio:8.2f}x")
    if args.torch_profile:
        print("\n## torch.profiler, ft jit\n")
        print(torch_profile(contenders["ft jit"], batches, args.steps))
        cache = getattr(jstep.fn, "_torchdynamo_orig_callable", None)
        print(f"dynamo compiled entries for the body: {cache is not None and 'see TORCH_LOGS=guards'}")


if __name__ == "__main__":
    main()
