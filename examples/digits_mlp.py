"""An MLP on scikit-learn's bundled 8x8 digits (no download; needs the `examples` extra: scikit-learn).

    python examples/digits_mlp.py steps=500 checkpoint_dir=runs/digits
"""

import sys

import torch
from torch import nn

import functrain as ft
from functrain.data import Loader
from functrain.shell import TrainConfig, train


def loss_fn(forward, batch):
    x, y = batch
    logits = forward(x)
    return nn.functional.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def metric_fn(forward, batch):
    x, y = batch
    logits = forward(x)
    return {"loss": nn.functional.cross_entropy(logits, y, reduction="none"), "acc": (logits.argmax(-1) == y).float()}


def main(argv: list[str]) -> ft.TrainState:
    from sklearn.datasets import load_digits

    config = TrainConfig.from_args(
        argv, steps=500, eval_every=50, log_every=50, checkpoint_every=100, checkpoint_dir="runs/digits",
        score=("val", "acc", "max"), patience=6,
        hparams={"hidden": 128, "dropout": 0.2, "lr": 1e-3, "batch_size": 64, "data_seed": 0, "model_seed": 0},
    )
    hp = config.hparams
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(hp["data_seed"]))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    train_set = torch.utils.data.TensorDataset(x[:cut], y[:cut])
    val_set = torch.utils.data.TensorDataset(x[cut:], y[cut:])
    torch.manual_seed(hp["model_seed"])
    hidden = hp["hidden"]
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(hp["dropout"]), nn.Linear(hidden, 10))
    opt = ft.optim.adamw(hp["lr"], weight_decay=1e-4)
    state = ft.TrainState.create(model, opt, seed=hp["model_seed"])
    config = config.replace(
        step=ft.make_train_step(model, loss_fn, opt),
        data=Loader(train_set, hp["batch_size"], shuffle=True, seed=hp["data_seed"]),
        eval_step=ft.make_eval_step(model, metric_fn),
        eval_data={"val": Loader(val_set, 256, shuffle=False, drop_last=False)},
    )
    return train(state, config)


if __name__ == "__main__":
    main(sys.argv[1:])
