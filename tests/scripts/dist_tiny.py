"""Run by tests/test_distributed.py under torchrun (or alone): the tiny problem trained by ``train()``.

usage: dist_tiny.py DIR MODE [key=value ...]

MODE ``signal``: dropout, shuffling, accumulation 2, evaluation every 3 steps, async
checkpoints every step. Each rank writes ``pid-{rank}`` and ``progress-{rank}`` (its last
micro-step); when stopped by a signal it writes ``exit-{rank}.json`` (code, micro-step) and
waits for the other ranks' files before exiting. A finished run writes ``digest-{rank}.txt``.
Options: ``sleep=SECONDS`` after every micro-step.

MODE ``samples``: a dataset that also returns each sample's index; a global batch of 16
whatever the world size; ``steps=N``. Each rank appends the indices it consumed to
``samples-w{world}-r{rank}.jsonl``. ``user_group=1``: the script makes the process group
itself (train must leave it alone); ``group-w{world}-r{rank}.json`` says whether a group is left after ``train``.
"""

import json
import os
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(__file__)), os.path.dirname(os.path.dirname(os.path.dirname(__file__)))]

import torch  # noqa: E402
from helpers.tiny import MLP, dataset, setup, train_recording_exit, write  # noqa: E402

import functrain as ft  # noqa: E402
from functrain.data import Loader  # noqa: E402
from functrain.shell import TrainConfig, train  # noqa: E402

GLOBAL_BATCH = 16


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Indexed(torch.utils.data.Dataset):
    """``(x, y, index)`` samples, so a run can record which samples it consumed."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, y, i


def loss_with_index(forward, batch):
    x, y, _ = batch
    return torch.nn.functional.cross_entropy(forward(x), y)


def signal_run(directory: str, opts: dict[str, str]) -> None:
    rank, world = rank_world()
    pause = float(opts.get("sleep", 0))
    state, config = setup(accumulate=2, steps=12, eval_every=3, checkpoint_every=1, async_checkpoint=True,
                          keep_last=2, checkpoint_dir=directory)
    inner = config.step
    last = {"micro": -1}

    def step(s, batch):
        out = inner(s, batch)
        last["micro"] = int(out.micro_step)
        write(os.path.join(directory, f"progress-{rank}"), str(last["micro"]))
        time.sleep(pause)
        return out

    os.makedirs(directory, exist_ok=True)
    write(os.path.join(directory, f"pid-{rank}"), str(os.getpid()))
    final = train_recording_exit(state, config.replace(step=step), directory, rank, world, last)
    write(os.path.join(directory, f"digest-{rank}.txt"), ft.tree_digest(final))


def samples_run(directory: str, opts: dict[str, str]) -> None:
    rank, world = rank_world()
    torch.manual_seed(0)
    model = MLP()
    opt = ft.optim.sgd(0.05, momentum=0.9)
    inner = ft.make_train_step(model, loss_with_index, opt)
    record = os.path.join(directory, f"samples-w{world}-r{rank}.jsonl")

    def step(s, batch):
        out = inner(s, batch)
        with open(record, "a") as f:
            f.write(json.dumps({"micro": int(out.micro_step), "idx": batch[2].tolist()}) + "\n")
        return out

    config = TrainConfig(step=step, data=Loader(Indexed(dataset(96, 0)), GLOBAL_BATCH // world, shuffle=True, seed=3),
                         steps=int(opts["steps"]), checkpoint_dir=directory, progress=False, tensorboard=False,
                         log_every=0, hparams={"lr": 0.05})
    os.makedirs(directory, exist_ok=True)
    user_group = opts.get("user_group") == "1" and world > 1
    if user_group:
        torch.distributed.init_process_group("gloo")
    train(ft.TrainState.create(model, opt, seed=1), config)
    after = torch.distributed.is_initialized()
    write(os.path.join(directory, f"group-w{world}-r{rank}.json"),
          json.dumps({"user_group": user_group, "after": after}))
    if after:
        torch.distributed.barrier()  # no rank closes its connections while another still uses them
        torch.distributed.destroy_process_group()


def main() -> None:
    torch.set_num_threads(1)
    directory, mode = sys.argv[1], sys.argv[2]
    opts = dict(a.split("=", 1) for a in sys.argv[3:])
    {"signal": signal_run, "samples": samples_run}[mode](directory, opts)


if __name__ == "__main__":
    main()
