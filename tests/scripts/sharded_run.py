"""Run by tests/test_sharded.py, under torchrun or alone: train a float64 MLP with a sharded or replicated state.

usage: sharded_run.py OUT_DIR TAG [--sharded] [--compile] [--dropout P] [--steps N]
                      [--save-at K CKPT_DIR] [--resume CKPT_DIR]

Each step's global batch of GLOBAL samples is drawn from a generator seeded by the step
index, and each rank takes its contiguous share, so any world size sees the same data.
Rank 0 writes OUT_DIR/TAG.npz: the final full params, evaluation results and optimizer moments, the loss, the
digest of the full (unsharded) final state, the digest at the save point, the number of
distinct graphs Dynamo compiled, the digest right after loading (--resume), and the local shapes of
rank 0's shards.
"""

import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(__file__)), os.path.dirname(os.path.dirname(os.path.dirname(__file__)))]

import numpy as np  # noqa: E402
import optree  # noqa: E402
import torch  # noqa: E402
import torch._dynamo.utils  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from models import MLP  # noqa: E402

import functrain as ft  # noqa: E402

GLOBAL = 12
CLASSES = 3


def loss_fn(forward, batch):
    x, y = batch
    logits = forward(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).double().mean()}


def arg(name, default=None, n=1):
    if name not in sys.argv:
        return default
    i = sys.argv.index(name)
    return sys.argv[i + 1] if n == 1 else sys.argv[i + 1: i + 1 + n]


def main() -> None:
    out_dir, tag = sys.argv[1], sys.argv[2]
    steps = int(arg("--steps", 20))
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank, world = ft.parallel.world()
    torch.manual_seed(0)
    # hidden 15 and 3 classes: uneven shards over 2 ranks (8/7 rows, 2/1 rows)
    model = MLP(d_in=8, d_hidden=15, d_out=CLASSES, dropout=float(arg("--dropout", 0.0))).double()
    opt = ft.optim.accumulate(
        ft.optim.chain(ft.optim.clip_by_global_norm(0.5), ft.optim.adamw(1e-2, weight_decay=0.01)), every=2
    )
    state = ft.TrainState.create(model, opt, seed=0)
    if "--sharded" in sys.argv:
        state = ft.shard_state(state)
    step = ft.make_train_step(model, loss_fn, opt)
    if "--compile" in sys.argv:
        step = ft.jit(step)
    resume = arg("--resume")
    loaded_digest = ""
    if resume:
        state = ft.checkpoint.load_sharded(resume, state)
        loaded_digest = ft.tree_digest(ft.unshard(state))
    save_at = arg("--save-at", n=2)
    saved_digest = ""
    share = GLOBAL // world
    for i in range(int(state.micro_step), steps):
        if save_at and i == int(save_at[0]):
            ft.checkpoint.save_sharded(save_at[1], state)
            saved_digest = ft.tree_digest(ft.unshard(state))
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(GLOBAL, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, CLASSES, (GLOBAL,), generator=g)
        state = step(state, (x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]))
    full = ft.unshard(state)
    # evaluation over 13 samples: uneven shares (6 and 7), each rank evaluates its own, the sums are added
    g = torch.Generator().manual_seed(7)
    data = torch.utils.data.TensorDataset(torch.randn(13, 8, generator=g, dtype=torch.float64),
                                          torch.randint(0, CLASSES, (13,), generator=g))
    eval_step = ft.make_eval_step(model, lambda f, b: {"loss": F.cross_entropy(f(b[0]), b[1], reduction="none"),
                                                       "acc": (f(b[0]).argmax(-1) == b[1]).double().mean()})
    results = ft.evaluate(state, eval_step, ft.data.Loader(data, batch_size=4, shuffle=False, drop_last=False))
    local_shapes = {k: list(v.to_local().shape) if hasattr(v, "to_local") else list(v.shape)
                    for k, v in state.params.items()}
    if rank == 0:
        moments = {}
        for path, leaf in zip(*optree.tree_flatten_with_path(full.opt_state, namespace="functrain")[:2]):
            if leaf.dim() > 0:
                moments["opt/" + "/".join(map(str, path))] = leaf.numpy()
        np.savez(os.path.join(out_dir, f"{tag}.npz"), **{k: v.numpy() for k, v in full.params.items()}, **moments,
                 __loss=full.metrics["loss"].numpy(), __digest=np.array(ft.tree_digest(full)),
                 __saved_digest=np.array(saved_digest),
                 __loaded_digest=np.array(loaded_digest),
                 __graphs=np.array(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
                 __local_shapes=np.array(repr(local_shapes)), __sharded=np.array(ft.is_sharded(state.params)),
                 __eval=np.array([results["loss"], results["acc"]]))
    if dist.is_initialized():
        dist.barrier()  # no rank closes its connections while another still uses them
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
