"""Run by tests/test_parallel.py, under torchrun or alone: train a float64 MLP and save its params.

usage: dp_equivalence.py OUT_DIR CONFIG [--compile]
Each rank takes its contiguous share of a global batch of GLOBAL samples per step.
"""

import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(__file__)), os.path.dirname(os.path.dirname(os.path.dirname(__file__)))]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch._dynamo.testing  # noqa: E402
import torch.distributed as dist  # noqa: E402
from models import MLP, classification_loss  # noqa: E402

import functrain as ft  # noqa: E402

GLOBAL = 12
STEPS = 50


def optimizer(config: str):
    if config == "sgd":
        return ft.optim.sgd(0.05, momentum=0.9, weight_decay=1e-3)
    if config == "adamw_clip_accum":
        return ft.optim.accumulate(
            ft.optim.chain(ft.optim.clip_by_global_norm(0.5), ft.optim.adamw(1e-2, weight_decay=0.01)), every=2
        )
    raise SystemExit(f"unknown config {config}")


def main() -> None:
    out_dir, config = sys.argv[1], sys.argv[2]
    compiled = "--compile" in sys.argv
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank, world = ft.parallel.world()
    torch.manual_seed(0)
    model = MLP().double()
    opt = optimizer(config)
    state = ft.TrainState.create(model, opt, seed=0)
    step = ft.make_train_step(model, classification_loss, opt, data_parallel=False if "--no-dp" in sys.argv else None)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    if compiled:
        step = ft.jit(step, backend=counter)
    g = torch.Generator().manual_seed(1)
    share = GLOBAL // world
    for _ in range(STEPS):
        x = torch.randn(GLOBAL, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (GLOBAL,), generator=g)
        state = step(state, (x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]))
    if rank == 0:
        np.savez(os.path.join(out_dir, f"params-{world}.npz"), **{k: v.numpy() for k, v in state.params.items()},
                 __loss=state.metrics["loss"].numpy(), __graphs=np.array(counter.frame_count))
    if dist.is_initialized():
        dist.barrier()  # no rank closes its connections while another still uses them
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
