"""A tiny, fast training problem for shell tests: an MLP with dropout on synthetic data."""

import json
import os
import time

import torch

import functrain as ft
from functrain.data import Loader
from functrain.shell import TrainConfig


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


def dataset(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return torch.utils.data.TensorDataset(x, y)


def loss_fn(forward, batch):
    x, y = batch
    logits = forward(x)
    return torch.nn.functional.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def metric_fn(forward, batch):
    x, y = batch
    logits = forward(x)
    return {"loss": torch.nn.functional.cross_entropy(logits, y, reduction="none"),
            "acc": (logits.argmax(-1) == y).float()}


def setup(accumulate=1, num_workers=0, lr=0.05, **overrides):
    """(state, config) for a small run; ``overrides`` go to TrainConfig."""
    torch.manual_seed(0)
    model = MLP()
    opt = ft.optim.sgd(lr, momentum=0.9)
    if accumulate > 1:
        opt = ft.optim.accumulate(opt, every=accumulate)
    state = ft.TrainState.create(model, opt, seed=1)
    config = TrainConfig(
        step=ft.make_train_step(model, loss_fn, opt),
        data=Loader(dataset(96, 0), batch_size=8, shuffle=True, seed=3, num_workers=num_workers),
        eval_step=ft.make_eval_step(model, metric_fn),
        eval_data={"val": Loader(dataset(40, 1), batch_size=16, shuffle=False, drop_last=False)},
        progress=False,
        tensorboard=False,
        log_every=0,
        hparams={"lr": lr, "accumulate": accumulate},
    )
    fields = {"steps": 12, "eval_every": 4, "score": ("val", "loss", "min")}
    fields.update(overrides)
    return state, config.replace(**fields)


def write(path, text):
    """Write a small file atomically (a test polling for it never reads half of it)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def train_recording_exit(state, config, directory, rank, world, last):
    """``train(state, config)``; if a signal stops it, write ``exit-{rank}.json`` (code, ``last["micro"]``).

    A stopped rank then waits (up to 60 s) until every rank has written its file, so the test
    sees how each rank stopped before the launcher tears the others down.
    """
    from functrain.shell import Interrupted, train

    try:
        return train(state, config)
    except Interrupted as e:
        write(os.path.join(directory, f"exit-{rank}.json"), json.dumps({"code": e.code, "micro": last["micro"]}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
            os.path.exists(os.path.join(directory, f"exit-{r}.json")) for r in range(world)
        ):
            time.sleep(0.01)
        raise
