"""A character-level transformer language model trained on Python's own standard library sources.

No download: the text is the source of a few stdlib modules. Runs in a few minutes on 2 CPU cores:

    python examples/char_transformer.py steps=500 checkpoint_dir=runs/char

Any TrainConfig field or hparam can be set as key=value (width=128, lr=3e-3, ...). Run it
again with the same checkpoint_dir to resume; a larger steps= extends the run.
"""

import inspect
import math
import sys

import torch
from torch import nn

import functrain as ft
from functrain.data import Loader
from functrain.shell import TrainConfig, train

MODULES = ("textwrap", "string", "functools", "heapq", "bisect", "contextlib", "dataclasses")


def corpus() -> str:
    import importlib

    return "\n".join(inspect.getsource(importlib.import_module(m)) for m in MODULES)


class Windows(torch.utils.data.Dataset):
    """Sample i: the characters at [i*stride, i*stride + context + 1) as (input, target)."""

    def __init__(self, ids: torch.Tensor, context: int, stride: int) -> None:
        self.ids, self.context, self.stride = ids, context, stride

    def __len__(self) -> int:
        return (len(self.ids) - self.context - 1) // self.stride

    def __getitem__(self, i: int):
        chunk = self.ids[i * self.stride : i * self.stride + self.context + 1]
        return chunk[:-1], chunk[1:]


class CharLM(nn.Module):
    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True))


def loss_fn(forward, batch):
    x, y = batch
    logits = forward(x)
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def metric_fn(forward, batch):
    x, y = batch
    loss = nn.functional.cross_entropy(forward(x).flatten(0, 1), y.flatten(), reduction="none")
    return {"loss": loss.view(x.shape[0], -1).mean(1), "bits_per_char": loss.view(x.shape[0], -1).mean(1) / math.log(2)}


def main(argv: list[str]) -> ft.TrainState:
    config = TrainConfig.from_args(
        argv, steps=500, eval_every=100, log_every=25, checkpoint_every=100, checkpoint_dir="runs/char_transformer",
        score=("val", "loss", "min"), patience=5,
        hparams={"context": 64, "width": 96, "layers": 2, "heads": 4, "dropout": 0.1, "lr": 2e-3,
                 "batch_size": 32, "data_seed": 0, "model_seed": 0},
    )
    hp = config.hparams
    text = corpus()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(ids))
    train_set = Windows(ids[:split], hp["context"], stride=hp["context"] // 2)
    val_set = Windows(ids[split:], hp["context"], stride=hp["context"])
    torch.manual_seed(hp["model_seed"])
    model = CharLM(len(vocab), hp["context"], hp["width"], hp["layers"], hp["heads"], hp["dropout"])
    opt = ft.optim.chain(ft.optim.clip_by_global_norm(1.0), ft.optim.adamw(hp["lr"], weight_decay=0.01))
    state = ft.TrainState.create(model, opt, seed=hp["model_seed"])
    config = config.replace(
        step=ft.make_train_step(model, loss_fn, opt),
        data=Loader(train_set, hp["batch_size"], shuffle=True, seed=hp["data_seed"]),
        eval_step=ft.make_eval_step(model, metric_fn),
        eval_data={"val": Loader(val_set, 64, shuffle=False, drop_last=False)},
    )
    print(f"char transformer: {len(text):,} characters of stdlib source, vocab {len(vocab)}, "
          f"{sum(p.numel() for p in model.parameters()):,} params, {len(train_set):,} training windows")
    return train(state, config)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(sys.argv[1:])
