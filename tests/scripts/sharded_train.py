"""Run by tests/test_distributed.py under torchrun (or alone): ``train()`` on a sharded state.

usage: sharded_train.py DIR TAG [key=value ...]

The tiny problem (helpers.tiny: dropout, shuffling, evaluation every 4 steps) with a global
batch of 16 whatever the world size. Under torchrun the script makes the process group and
shards the state (:func:`functrain.shard_state`); alone, the state stays plain. Options:
``steps=N`` (default 10), ``every=K`` (checkpoint every K steps, default 2), ``keep_last=N``
(default 2), ``async=1`` (async_checkpoint), ``sleep=SECONDS`` after every step.

Rank 0 writes DIR/TAG.json: the digest of the full (unsharded) state given to the first
call of the train step (the restored state when resuming), whether that state was sharded,
and the digest of the full final state. Each rank writes ``pid-{rank}`` and
``progress-{rank}`` (its last micro-step); stopped by a signal, ``exit-{rank}.json`` (exit
code, micro-step), then it waits for the other ranks' files before exiting.
"""

import json
import os
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(__file__)), os.path.dirname(os.path.dirname(os.path.dirname(__file__)))]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from helpers.tiny import dataset, setup, train_recording_exit, write  # noqa: E402

import functrain as ft  # noqa: E402
from functrain.data import Loader  # noqa: E402

GLOBAL_BATCH = 16


def full_digest(state) -> str:
    """The digest of the full state (a collective for a sharded one: every rank calls it)."""
    return ft.tree_digest(ft.unshard(state))


def main() -> None:
    torch.set_num_threads(1)
    directory, tag = sys.argv[1], sys.argv[2]
    opts = dict(a.split("=", 1) for a in sys.argv[3:])
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank, world = ft.parallel.world()
    state, config = setup(steps=int(opts.get("steps", 10)), checkpoint_every=int(opts.get("every", 2)),
                          keep_last=int(opts.get("keep_last", 2)), keep_best=0,
                          async_checkpoint=opts.get("async") == "1", checkpoint_dir=directory)
    if world > 1:
        state = ft.shard_state(state)
    inner = config.step
    record = {}
    last = {"micro": -1}
    pause = float(opts.get("sleep", 0))

    def step(s, batch):
        if not record:  # the state train() starts the loop from: restored, or fresh
            record["first"], record["first_sharded"] = full_digest(s), ft.is_sharded(s.params)
        out = inner(s, batch)
        last["micro"] = int(out.micro_step)
        write(os.path.join(directory, f"progress-{rank}"), str(last["micro"]))
        time.sleep(pause)
        return out

    config = config.replace(step=step, data=Loader(dataset(96, 0), GLOBAL_BATCH // world, shuffle=True, seed=3))
    os.makedirs(directory, exist_ok=True)
    write(os.path.join(directory, f"pid-{rank}"), str(os.getpid()))
    final = train_recording_exit(state, config, directory, rank, world, last)
    record["final"], record["final_sharded"] = full_digest(final), ft.is_sharded(final.params)
    if rank == 0:
        with open(os.path.join(directory, f"{tag}.json"), "w") as f:
            json.dump(record, f)
    if dist.is_initialized():
        dist.barrier()  # no rank closes its connections while another still uses them
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
