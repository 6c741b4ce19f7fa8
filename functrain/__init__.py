"""functrain: a functional, pure-state trainer for PyTorch.

The whole state of a run is one immutable pytree (:class:`TrainState`); every change to it
is a pure step ``(state, batch) -> state`` built with :mod:`torch.func` and compiled with
:func:`jit`; a thin shell (:func:`train`, checkpoints, signals, logging) does the rest.

Layers: ``functrain.core`` (pure: state, steps, rng) and ``functrain.optim`` (pure
optimizers); the shell in ``functrain.checkpoint``, ``functrain.data``, ``functrain.shell``
and the ``functrain`` command line (``functrain.cli``).
"""

from functrain import data, optim, testing
from functrain.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointSaveError,
    LoadReport,
    PartialLoadWarning,
    TargetMismatchError,
    from_bytes,
    load,
    load_sharded,
    read_header,
    save,
    save_sharded,
    to_bytes,
    tree_digest,
    verify,
)
from functrain.core import parallel
from functrain.core import rng as random
from functrain.core.compose import compose, repeat
from functrain.core.donate import donate, is_donated, jit_donated
from functrain.core.jit import jit
from functrain.core.population import lr_scale, population_step, set_lr_scale, stack_states, unstack_state
from functrain.core.sharding import is_sharded, shard_state, unshard
from functrain.core.state import LossScale, Tracker, TrainState, state_dict
from functrain.core.step import Step, batch_size, eval_results, make_eval_step, make_train_step, reset_eval
from functrain.shell import Interrupted, TrainConfig, evaluate, make_predict_step, predict, train

__version__ = "0.1.0"

__all__ = [
    "donate",
    "is_donated",
    "jit_donated",
    "lr_scale",
    "is_sharded",
    "shard_state",
    "unshard",
    "save_sharded",
    "load_sharded",
    "population_step",
    "set_lr_scale",
    "stack_states",
    "unstack_state",
    "Interrupted",
    "TrainConfig",
    "data",
    "evaluate",
    "make_predict_step",
    "predict",
    "train",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointSaveError",
    "LoadReport",
    "PartialLoadWarning",
    "TargetMismatchError",
    "from_bytes",
    "load",
    "read_header",
    "save",
    "testing",
    "to_bytes",
    "tree_digest",
    "verify",
    "LossScale",
    "Step",
    "Tracker",
    "TrainState",
    "batch_size",
    "compose",
    "eval_results",
    "jit",
    "make_eval_step",
    "make_train_step",
    "optim",
    "parallel",
    "random",
    "repeat",
    "reset_eval",
    "state_dict",
]
