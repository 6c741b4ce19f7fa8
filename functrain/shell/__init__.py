"""The imperative shell: ``train(state, config)``, evaluation, results, signals, logging."""

from functrain.shell.config import TrainConfig
from functrain.shell.evaluate import evaluate, make_predict_step, predict
from functrain.shell.signals import Interrupted
from functrain.shell.train import train

__all__ = ["TrainConfig", "train", "evaluate", "predict", "make_predict_step", "Interrupted"]
