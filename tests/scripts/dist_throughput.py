"""Throughput of the data-parallel train step: samples/s at one global batch on 1 or N ranks.

usage: OMP_NUM_THREADS=1 python tests/scripts/dist_throughput.py [--hidden H] [--batch GLOBAL] [--steps N] [--sharded]
       OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \\
           tests/scripts/dist_throughput.py [same options]
Each rank takes GLOBAL / world samples per step; rank 0 prints samples/s over the timed steps
(after warm-up steps), the median of 3 repeats.
"""

import argparse
import os
import statistics
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.dirname(__file__)))]

import torch  # noqa: E402

import functrain as ft  # noqa: E402
from functrain.shell import distributed as dist  # noqa: E402


def _local_bytes(state) -> int:
    """Bytes of tensors this rank holds for the state (a DTensor counts its local shard)."""
    import optree

    leaves = optree.tree_leaves(state, namespace="functrain")
    local = [x.to_local() if ft.is_sharded(x) else x for x in leaves if isinstance(x, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in local)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--sharded", action="store_true", help="params and optimizer state as Shard(0) DTensors")
    args = p.parse_args()
    torch.set_num_threads(1)
    owned = dist.init_from_env(torch.device("cpu"))
    rank, world = dist.world()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, args.hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU(),
                                torch.nn.Linear(args.hidden, 10))
    opt = ft.optim.adamw(1e-3)
    step = ft.make_train_step(model, lambda f, b: torch.nn.functional.cross_entropy(f(b[0]), b[1]), opt)
    state = ft.TrainState.create(model, opt, seed=0)
    if args.sharded:
        state = ft.shard_state(state)
    share = args.batch // world
    g = torch.Generator().manual_seed(1 + rank)
    batch = (torch.randn(share, 64, generator=g), torch.randint(0, 10, (share,), generator=g))
    for _ in range(5):
        state = step(state, batch)
    rates = []
    for _ in range(3):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            state = step(state, batch)
        float(state.metrics["loss"])
        rates.append(args.steps * args.batch / (time.perf_counter() - start))
    if rank == 0:
        params = sum(v.numel() for v in state.params.values())
        print(f"world={world} sharded={args.sharded} global_batch={args.batch} hidden={args.hidden} params={params} "
              f"state_bytes_per_rank={_local_bytes(state)} samples_per_s={statistics.median(rates):.0f}", flush=True)
    dist.teardown(owned)


if __name__ == "__main__":
    main()
