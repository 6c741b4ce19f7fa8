"""How many elements differ from torch.optim after 200 steps: the exact `step` vs the additive design.

Run: python benchmarks/optim_numerics.py   (figures quoted in docs/optimizers.md)
"""

import torch

from functrain import optim

SHAPES = {"layer.weight": (7, 5), "layer.bias": (5,), "norm.weight": (5,)}


def data(dtype, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()}
    return p, [{k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()} for _ in range(steps)]


def torch_run(mk, params, grads):
    tp = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    o = mk(list(tp.values()))
    for g in grads:
        for k, p in tp.items():
            p.grad = g[k].clone()
        o.step()
    return {k: p.detach() for k, p in tp.items()}


def additive(tx, params, grads):
    s = tx.init(params)
    p = params
    for g in grads:
        u, s = tx.update(g, s, p)
        p = optim.apply_updates(p, u)
    return p


def optax_adam(lr, b1=0.9, b2=0.999, eps=1e-8):
    # optax.adam's formula: -lr * m_hat / (sqrt(v_hat) + eps), then params + updates
    def init(params):
        def z():
            return {k: torch.zeros_like(v) for k, v in params.items()}

        return (torch.zeros((), dtype=torch.int64), z(), z())

    def update(g, s, p=None):
        c, m, v = s
        c = c + 1
        m = {k: b1 * m[k] + (1 - b1) * g[k] for k in g}
        v = {k: b2 * v[k] + (1 - b2) * g[k] ** 2 for k in g}
        t = c.to(torch.float64)
        u = {
            k: -lr * (m[k] / (1 - b1**t).to(g[k].dtype)) / ((v[k] / (1 - b2**t).to(g[k].dtype)).sqrt() + eps) for k in g
        }
        return u, (c, m, v)

    return optim.GradientTransformation(init, update)


n = sum(torch.Size(s).numel() for s in SHAPES.values())
print(f"additive design, elements differing from torch.optim after 200 steps (of {n}):")
for dt in (torch.float32, torch.float64):
    params, grads = data(dt, 200)
    for name, tx, mk in [
        ("sgd", optim.sgd(0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
        ("sgd momentum=0.9", optim.sgd(0.01, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
        ("adam (update = (-step_size*m)/denom)", optim.adam(1e-3), lambda p: torch.optim.Adam(p, lr=1e-3)),
        ("adam (optax formula)", optax_adam(1e-3), lambda p: torch.optim.Adam(p, lr=1e-3)),
        ("adamw wd=0.01", optim.adamw(1e-3), lambda p: torch.optim.AdamW(p, lr=1e-3)),
    ]:
        a = additive(tx, params, grads)
        b = torch_run(mk, params, grads)
        st = optim.apply_gradients
        s = tx.init(params)
        q = params
        if tx.step is not None:
            for g in grads:
                q, s = tx.step(g, s, q)
            stepdiff = sum((q[k] != b[k]).sum().item() for k in b)
        else:
            stepdiff = "-"
        d = sum((a[k] != b[k]).sum().item() for k in b)
        rel = max(((a[k] - b[k]).abs() / b[k].abs()).max().item() for k in b)
        print(f"  {str(dt):14s} {name:40s} additive: {d:3d}/{n} differ (max rel {rel:.1e}); step: {stepdiff}")
# compiled drift
tx = optim.chain(
    optim.clip_by_global_norm(1.0),
    optim.adamw(optim.warmup_cosine_decay_schedule(0.0, 1e-2, 20, 200), weight_decay=0.1, mask=optim.decay_mask),
)


def train_step(params, s, g):
    return optim.apply_gradients(tx, g, s, params)


comp = torch.compile(train_step, fullgraph=True)
for dt in (torch.float64, torch.float32):
    params, grads = data(dt, 200)
    pe, se = params, tx.init(params)
    pc, sc = params, tx.init(params)
    for g in grads:
        pe, se = train_step(pe, se, g)
        pc, sc = comp(pc, sc, g)
    d = sum((pe[k] != pc[k]).sum().item() for k in pe)
    rel = max(((pe[k] - pc[k]).abs() / pe[k].abs()).max().item() for k in pe)
    ab = max((pe[k] - pc[k]).abs().max().item() for k in pe)
    print(f"compiled vs eager after 200 steps, {dt}: {d}/{n} elements differ, max abs {ab:.2e}, max rel {rel:.2e}")
