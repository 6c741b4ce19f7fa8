"""``train(state, config) -> state``: the imperative shell around pure steps.

The loop feeds one batch per call of ``config.step`` (a micro-batch when the optimizer
accumulates), stores the data position in the state after every call, evaluates, records
results, saves checkpoints and logs. All decisions it makes (when to evaluate, what is best,
when to stop) are functions of the state and the config, so an interrupted and resumed run
makes the same ones as an uninterrupted run.

Order of work after each call of the step: data position into the state; stop signal
(save, exit); logging; evaluation (best/patience into the state's tracker, records to
``results.json``); checkpoint. Checkpoint files are keyed by ``state.micro_step`` (equal to
``state.step`` without accumulation), so a save inside an accumulation window never
replaces the one at the window's start.

Example:
    >>> import torch, functrain as ft
    >>> from functrain.data import Loader
    >>> from functrain.shell import TrainConfig, train
    >>> model = torch.nn.Linear(3, 1)
    >>> data = torch.utils.data.TensorDataset(torch.randn(32, 3), torch.randn(32, 1))
    >>> loss = lambda f, b: torch.nn.functional.mse_loss(f(b[0]), b[1])
    >>> opt = ft.optim.sgd(0.1)
    >>> config = TrainConfig(steps=10, step=ft.make_train_step(model, loss, opt), data=Loader(data, 8),
    ...                      progress=False, log_every=0)
    >>> state = train(ft.TrainState.create(model, opt, seed=0), config)
    functrain: started fresh at step 0 (epoch 0, sample 0)
    >>> int(state.step), int(state.epoch), int(state.data_index)
    (10, 2, 16)
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any

import optree
import torch

from functrain.checkpoint import CheckpointManager, load, tree_digest
from functrain.checkpoint.errors import CheckpointError, TargetMismatchError
from functrain.checkpoint.format import finish_restore
from functrain.checkpoint.sharded import META_NAME, is_sharded_checkpoint, load_sharded
from functrain.core.donate import is_donated
from functrain.core.sharding import is_dtensor, is_sharded, shard_state, shard_tree, unshard
from functrain.core.state import TrainState
from functrain.core.step import batch_size
from functrain.core.struct import NAMESPACE, find_first
from functrain.shell import distributed as dist
from functrain.shell.config import TrainConfig, semantic, semantic_diff, semantic_hash
from functrain.shell.evaluate import EvaluationStopped, evaluate
from functrain.shell.results import Results, score_of, should_stop, update_tracker
from functrain.shell.runlog import RunLog, _write_json, is_main_process, versions
from functrain.shell.signals import Interrupted, StopFlag

__all__ = ["train", "check_config", "restore_state", "load_pretrained"]

SEMANTIC_FILE = "semantic.json"
CHECKPOINTS = "checkpoints"
PENDING_EVAL = "functrain.pending_eval"
"""Key in ``state.eval_metrics`` of a state saved by a signal during its evaluation."""


# ------------------------------------------------------------------ config
def check_config(config: TrainConfig) -> None:
    """Raise a clear error for a config ``train`` cannot run."""
    if (config.steps is None) == (config.epochs is None):
        raise ValueError("set exactly one of steps= (step mode) or epochs= (epoch mode) in TrainConfig")
    if config.step is None or not callable(config.step):
        raise ValueError("TrainConfig.step must be a train step (state, batch) -> state, e.g. ft.make_train_step(...)")
    if not hasattr(config.data, "iterate"):
        raise TypeError(
            f"TrainConfig.data must be a functrain.data.Loader (its position is saved in the state), "
            f"got {type(config.data).__name__}; wrap the dataset: functrain.data.Loader(dataset, batch_size)"
        )
    if config.score is not None:
        if len(config.score) != 3 or config.score[2] not in ("min", "max"):
            raise ValueError(f"score must be (split, metric, 'min' | 'max'), got {config.score!r}; "
                             "the mode is explicit, whatever the metric is called")
        if config.eval_data is None or config.score[0] not in config.eval_data:
            raise ValueError(f"score split {config.score[0]!r} is not in eval_data ({sorted(config.eval_data or {})})")
    if (config.eval_data is None) != (config.eval_step is None):
        raise ValueError("set eval_step and eval_data together")
    if config.eval_data is not None and config.steps is not None and not config.eval_every:
        raise ValueError("in step mode, set eval_every= (steps between evaluations) when eval_data is given")
    if config.patience is not None and config.score is None:
        raise ValueError("patience needs score=(split, metric, mode) to know what improves")
    if config.resume not in ("auto", "never") and not os.path.exists(config.resume):
        raise FileNotFoundError(f"resume={config.resume!r}: no such checkpoint file or folder; "
                                "use resume='auto' to resume from checkpoint_dir when it has a checkpoint")


def _check_semantics(directory: str, config: TrainConfig, resuming: bool) -> None:
    path = os.path.join(directory, SEMANTIC_FILE)
    current = semantic(config)
    if resuming and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["hash"] != semantic_hash(current):
            lines = semantic_diff(saved["semantic"], current)
            raise ValueError(
                f"refusing to resume {directory}: the config changed in a way that changes the math:\n"
                + "\n".join(lines)
                + "\nRestore these values, or start a new run in another checkpoint_dir. "
                "(steps/epochs, logging and checkpoint cadence may change freely.)"
            )
    if is_main_process():
        os.makedirs(directory, exist_ok=True)
        _write_json(path, {"hash": semantic_hash(current), "semantic": current})
        _write_json(os.path.join(directory, "config.json"),
                    {"config": config.to_dict(), "versions": versions(), "world_size": dist.world()[1]})


def saved_world_size(source: str) -> int | None:
    """The number of ranks that wrote the run folder ``source`` (or the folder holding a checkpoint), if recorded.

    A sharded checkpoint directory records its own world size (in its ``functrain.msgpack``).
    """
    if is_sharded_checkpoint(source):
        try:
            size = load(os.path.join(source, META_NAME)).get("world_size")
        except (CheckpointError, OSError, AttributeError):
            return None
        return int(size) if isinstance(size, int) else None
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    for candidate in (folder, os.path.dirname(os.path.abspath(folder))):
        path = os.path.join(candidate, "config.json")
        if os.path.exists(path):
            try:
                with open(path) as f:
                    size = json.load(f).get("world_size")
            except (OSError, ValueError):
                return None
            return int(size) if isinstance(size, int) else None
    return None


def world_change_message(saved: int | None, now: int) -> str | None:
    """The warning for resuming on another number of ranks, or None when it is the same (or unknown)."""
    if saved is None or saved == now:
        return None
    return (f"functrain: resuming a {saved}-rank run on {now} rank(s): the data continues from the same global "
            "sample, none skipped or repeated, but the trajectory is no longer bitwise the same as an uninterrupted "
            f"{saved}-rank run (all-reduce order and per-rank dropout streams differ)")


# ----------------------------------------------------------------- restore
def restore_state(template: TrainState, plain: Any, source: str) -> TrainState:
    """A state of ``template``'s structure from a checkpoint read as plain containers.

    ``metrics`` and ``eval_metrics`` are taken as saved (their keys are not known in advance);
    everything else must match the template's keys, shapes and dtypes.
    """
    target = template.replace(metrics=dict(plain.get("metrics") or {}),
                              eval_metrics=dict(plain.get("eval_metrics") or {}))
    return finish_restore(plain, target, True, source)


def _mesh_of(tree: Any) -> Any:
    """The device mesh of the first DTensor in ``tree``."""
    return next(x.device_mesh for x in optree.tree_leaves(tree, namespace=NAMESPACE) if is_dtensor(x))


def load_pretrained(state: TrainState, path: str) -> TrainState:
    """``state`` with params from a checkpoint (its EMA params when it has them); nothing else changes.

    A sharded state's params are gathered, replaced and sharded again the same way (a
    collective: every rank calls it).
    """
    if is_sharded(state.params):
        mesh = _mesh_of(state.params)
        loaded = load_pretrained(state.replace(params=unshard(state.params)), path)
        return loaded.replace(params=shard_tree(loaded.params, mesh))
    plain = load(path)
    keys = set(state.params)
    params = plain.get("params", plain) if isinstance(plain, dict) else None
    holder = find_first(plain.get("opt_state"), lambda node: isinstance(node, dict) and isinstance(
        node.get("ema"), dict) and set(node["ema"]) == keys) if isinstance(plain, dict) else None
    ema = None if holder is None else holder["ema"]
    source = ema if ema is not None else params
    if not isinstance(source, dict) or set(source) != keys:
        have = sorted(source) if isinstance(source, dict) else type(source).__name__
        raise ValueError(f"pretrained={path}: its params {have} do not match the model's {sorted(keys)}")
    new = {}
    for k, v in state.params.items():
        w = source[k]
        if tuple(w.shape) != tuple(v.shape) or w.dtype != v.dtype:
            raise ValueError(f"pretrained={path}: params/{k} is {w.dtype} {tuple(w.shape)}, "
                             f"the model wants {v.dtype} {tuple(v.shape)}")
        new[k] = w.to(v.device)
    return state.replace(params=new)


def _read_checkpoint(path: str, state: TrainState) -> TrainState:
    """The checkpoint at ``path`` as a state laid out like ``state`` (every rank calls it).

    A sharded directory is read straight into ``state``'s layout, whatever world size wrote
    it; a msgpack file is read whole on every rank and, for a sharded ``state``, sharded the
    same way afterwards.
    """
    if is_sharded_checkpoint(path):
        return load_sharded(path, state)
    if not is_sharded(state):
        return restore_state(state, load(path), path)
    mesh = _mesh_of(state)
    return shard_state(restore_state(unshard(state), load(path), path), mesh)


def _start(state: TrainState, config: TrainConfig,
           manager: CheckpointManager | None) -> tuple[TrainState, str, str | None]:
    """Resume, start from pretrained weights, or start fresh (in that order of precedence).

    Returns the state, how it started, and the checkpoint it resumed from (None when it did not).
    """
    if config.resume not in ("auto", "never"):
        path = config.resume
        if os.path.isdir(path) and not is_sharded_checkpoint(path):
            sub = os.path.join(path, CHECKPOINTS)
            with CheckpointManager(sub if os.path.isdir(sub) else path) as other:
                restored, origin = _restore_agreed(other, state)
        else:
            restored, origin = _read_checkpoint(path, state), path
        return restored, f"resumed from {path}", origin
    latest = dist.broadcast_object(manager.latest_step() if manager is not None else None)
    if latest is not None:
        if config.resume == "never":
            raise FileExistsError(
                f"resume='never' but {manager.directory} already has checkpoints (latest {latest}); "
                "use another checkpoint_dir, or resume='auto' to continue that run"
            )
        restored, origin = _restore_agreed(manager, state)
        return restored, f"resumed from {manager.directory}", origin
    if config.pretrained is not None:
        return load_pretrained(state, config.pretrained), f"started from pretrained params {config.pretrained}", None
    return state, "started fresh", None


_FALLBACK, _FATAL = 1, 2  # how a rank's attempt to read a checkpoint failed (agreed as the maximum over ranks)


def _restore_agreed(manager: CheckpointManager, state: TrainState) -> tuple[TrainState, str]:
    """Rank 0's latest readable checkpoint, restored by every rank into ``state``'s layout; and its path.

    Every rank tries the same step (rank 0's listing) and the ranks agree on the outcome: all
    succeed, all fall back to the previous step (the checkpoint is unreadable somewhere), or
    all raise (a target mismatch, a rank that cannot see the file). A sharded checkpoint's
    read is itself a collective, so the ranks must never go separate ways.
    """
    rank = dist.world()[0]
    listing = dist.broadcast_object([(s, manager.kind_of(s)) for s in manager.all_steps()]
                                    if is_main_process() else None)
    failures = []
    for step, kind in reversed(listing):
        path = manager.path_of(step)
        if not dist.agree_ok(manager.kind_of(step) == kind):
            raise FileNotFoundError(
                f"rank {rank}: rank 0 resumes from micro-step {step} ({kind}) but "
                f"{'this rank sees' if manager.kind_of(step) != kind else 'another rank sees'} no such checkpoint "
                f"in {manager.directory}; put checkpoint_dir on a filesystem every rank shares"
            )
        restored, error, code = None, None, 0
        try:
            restored = _read_checkpoint(path, state)
        except TargetMismatchError as e:
            error, code = e, _FATAL
        except CheckpointError as e:
            error, code = e, _FALLBACK
        except Exception as e:  # noqa: BLE001 -- re-raised below, after telling the other ranks
            error, code = e, _FATAL
        worst = dist.agree_flag(code)
        if worst == 0:
            return restored, path
        if worst == _FATAL:
            if error is not None:
                raise error
            raise RuntimeError(f"rank {rank}: another rank failed to restore {path}; see its error")
        failures.append(str(error) if error is not None else f"{path}: unreadable on another rank")
        if is_main_process():
            warnings.warn(f"skipping an unreadable checkpoint, falling back to the previous one: {failures[-1]}",
                          stacklevel=3)
    if not listing:
        raise FileNotFoundError(f"no committed checkpoint in {manager.directory}")
    raise CheckpointError(f"every checkpoint in {manager.directory} is unreadable:\n  " + "\n  ".join(failures))


def _bind_data(config: TrainConfig) -> TrainConfig:
    """Train data sharded to this rank; evaluation data read whole on every rank (the same record everywhere)."""
    rank, size = dist.world()
    data = dist.shard_loader(config.data, rank, size)
    evals = None if config.eval_data is None else {k: dist.shard_loader(v, 0, 1) for k, v in config.eval_data.items()}
    return config.replace(data=data, eval_data=evals)


# -------------------------------------------------------------------- loop
class CounterMismatchError(RuntimeError):
    """The state's counters differ from the loop's host-side count of them (an irregular train step)."""


class _Clock:
    """Host-side mirrors of ``state.step``, ``state.micro_step`` and ``state.epoch``.

    The loop decides everything (logging, evaluation, checkpoints, the end) from these, so a
    micro-step costs no read of a device value (on CUDA each read is a sync that stalls the
    queue). ``micro_step`` advances by 1 per call of the train step and the epoch comes from
    the loader. ``state.step`` advances by 1 on every call, or on every ``k``-th call under
    ``accumulate(k)``: the clock reads it after the first calls until it has seen three
    advances with equal gaps (the period ``k``), then predicts it. A step that advances by
    anything but 0 or 1 keeps being read after every call. :meth:`check` compares the
    mirrors with the state where the shell reads the state anyway.
    """

    def __init__(self, state: TrainState) -> None:
        self.step, self.micro, self.epoch = int(state.step), int(state.micro_step), int(state.epoch)
        self.period: int | None = None  # micro-steps per optimizer step, once learned
        self.advances: list[int] = []  # micro-steps at which state.step advanced, while learning
        self.exact = False  # irregular step: read state.step after every call

    def tick(self, state: TrainState) -> bool:
        """Count one call of the train step (``state`` is its result); True when ``state.step`` advanced."""
        self.micro += 1
        if self.period is not None:
            advanced = (self.micro - self.advances[-1]) % self.period == 0
            self.step += advanced
            return advanced
        now = int(state.step)
        delta, self.step = now - self.step, now
        if not self.exact and delta not in (0, 1):
            self.exact = True
        if self.exact or delta == 0:
            return delta > 0
        self.advances = (self.advances + [self.micro])[-3:]
        if len(self.advances) == 3 and self.advances[2] - self.advances[1] == self.advances[1] - self.advances[0]:
            self.period = self.advances[2] - self.advances[1]
        return True

    def check(self, state: TrainState) -> None:
        """Raise :class:`CounterMismatchError` unless the state's counters equal the mirrors."""
        step, micro = int(state.step), int(state.micro_step)
        if (step, micro) != (self.step, self.micro):
            pattern = (f"advancing state.step every {self.period} call(s)" if self.period is not None
                       else "state.step read after every call")
            raise CounterMismatchError(
                f"train(): the state is at step {step}, micro-step {micro}, but the loop counted step {self.step}, "
                f"micro-step {self.micro} ({pattern}). train() needs a train step that advances state.micro_step "
                "by 1 per call and state.step by 1 per call, or by 1 on every k-th call (accumulate(k)), as "
                "functrain.make_train_step does; a hand-written step must keep to that."
            )


def _device_int(value: int, device: torch.device) -> torch.Tensor:
    """A 0-d int64 counter made on ``device`` by a fill kernel: no host-to-device copy, no sync on CUDA."""
    return torch.full((), value, dtype=torch.int64, device=device)


def _with_position(state: TrainState, epoch: torch.Tensor, index: torch.Tensor) -> TrainState:
    """``state.replace(epoch=epoch, data_index=index)``, without ``dataclasses.replace``'s cost per micro-step."""
    if type(state) is not TrainState:
        return state.replace(epoch=epoch, data_index=index)
    new = object.__new__(TrainState)
    new.__dict__.update(state.__dict__)
    new.__dict__["epoch"], new.__dict__["data_index"] = epoch, index
    return new


def _batch_size(batch: Any) -> int:
    """``batch_size(batch)`` with a fast path for the common tuple/list whose first item is a batched tensor."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor) and batch[0].dim() > 0:
        return int(batch[0].shape[0])
    return batch_size(batch)


class _Run:
    """The mutable bookkeeping of one ``train`` call (not part of the state)."""

    def __init__(self, config: TrainConfig, manager: CheckpointManager | None, results: Results, log: RunLog,
                 flag: StopFlag, sharded: bool = False) -> None:
        self.config, self.manager, self.results, self.log, self.flag = config, manager, results, log, flag
        self.sharded = sharded  # DTensor params: every rank writes its shards (a collective, synchronous save)
        self.saved_micro = -1
        self.samples = 0
        self.clock_time = time.perf_counter()
        self.clock: _Clock | None = None  # host counters, set by the loop
        self.collective = dist.is_distributed()  # the stop flag must be agreed by all ranks
        self.donating = False  # the train step overwrites its input's tensors (functrain.donate)
        self.early = False  # early stopping due (changes only at evaluations)

    def check(self, state: TrainState) -> None:
        if self.clock is not None:
            self.clock.check(state)

    # decisions ------------------------------------------------------------
    def done(self, state: TrainState) -> bool:
        c = self.config
        return int(state.step) >= c.steps if c.steps is not None else int(state.epoch) >= c.epochs

    def stopped_early(self, state: TrainState) -> bool:
        return should_stop(state.tracker, self.config.patience)

    def eval_due(self, step: int, epoch: int, advanced: bool, new_epoch: bool) -> bool:
        c = self.config
        if c.eval_step is None:
            return False
        if c.steps is not None:
            return advanced and step % c.eval_every == 0
        return new_epoch and epoch % (c.eval_every or 1) == 0

    def checkpoint_due(self, step: int, epoch: int, advanced: bool, new_epoch: bool) -> bool:
        every = self.config.checkpoint_every
        if self.manager is None or not every:
            return False
        if self.config.steps is not None:
            return advanced and step % every == 0
        return new_epoch and epoch % every == 0

    # actions --------------------------------------------------------------
    def save(self, state: TrainState, score: float | None = None, sync: bool = False) -> None:
        """Rank 0 writes the (replicated) state; with ``sync`` or sync checkpoints every rank waits for the commit.

        An async save copies the state first only when the train step donates (it will overwrite
        these tensors); a pure state is written from its own tensors (see ``CheckpointManager.save``).
        A sharded state is saved by every rank (its shards, one ``.dcp`` directory), synchronously;
        the ranks then agree that every one of them succeeded.
        """
        if self.manager is None:
            return
        self.check(state)
        micro = int(state.micro_step)
        fresh = micro != self.saved_micro
        if not fresh and not sync:
            return
        error = None
        if self.sharded or is_main_process():
            try:
                if fresh:
                    self.manager.save(state, step=micro, metrics={"score": score} if score is not None else None,
                                      copy=True if self.donating else None)
                if sync:
                    self.manager.wait()
            except Exception as e:  # noqa: BLE001 -- re-raised below, after telling the other ranks
                error = e
        if (sync or self.sharded or not self.manager.async_save) and not dist.agree_ok(error is None):
            # the other ranks wait here for the commit, so every rank resumes from the same step
            if error is not None:
                raise error
            who = "another rank" if self.sharded else "rank 0"
            raise RuntimeError(f"{who} failed to save the checkpoint of micro-step {micro}; see {who}'s error")
        if error is not None:
            raise error
        self.saved_micro = micro

    def check_signal(self, state: TrainState) -> None:
        # one process: the handler's flag; several: agreed by all ranks (a small all-reduce MAX)
        signum = self.flag.requested() if self.collective else self.flag.signum
        if signum is None:
            return
        self.save(state, sync=True)
        where = self.manager.path_of(int(state.micro_step)) if self.manager is not None else None
        self.log.beat(int(state.step), status="interrupted")
        raise Interrupted(signum, where)

    def evaluate(self, state: TrainState) -> tuple[TrainState, float | None]:
        """Evaluate every split, update the tracker, record the results."""
        c = self.config
        self.check(state)
        record: dict[str, Any] = {"step": int(state.step), "epoch": int(state.epoch)}
        for split, data in c.eval_data.items():
            try:
                record[split] = evaluate(state, c.eval_step, data,
                                         should_stop=lambda: self.flag.requested() is not None)
            except EvaluationStopped:  # save the state before this evaluation, marked to evaluate on resume
                self.check_signal(state.replace(eval_metrics={PENDING_EVAL: state.step.clone()}))
        record = dist.broadcast_object(record)  # one record (and so one decision) on every rank
        score = None
        if c.score is not None:
            score = score_of(record, c.score)
            improved_before = int(state.tracker.best_step)
            state = state.replace(tracker=update_tracker(state.tracker, score, int(state.step), c.score[2]))
            if int(state.tracker.best_step) == improved_before:
                score = None  # not a new best: no need to keep this checkpoint as best
        self.early = self.stopped_early(state)
        self.results.add(record, state.tracker)
        for split in c.eval_data:
            self.log.scalars(split, record[split], int(state.step))
        text = "  ".join(f"{s}/{k} {v:.4g}" for s in c.eval_data for k, v in record[s].items())
        self.log.print(f"eval step {record['step']} epoch {record['epoch']}: {text}")
        return state, score

    def log_train(self, state: TrainState) -> None:
        self.check(state)
        now = time.perf_counter()
        values = {k: float(v) for k, v in state.metrics.items() if v.dim() == 0}
        values["samples_per_s"] = self.samples / max(now - self.clock_time, 1e-9)
        self.samples, self.clock_time = 0, now
        step = int(state.step)
        self.log.scalars("train", values, step)
        self.log.beat(step)
        if "loss" in values:
            self.log.postfix({"loss": values["loss"]})
        if self.log.bar is None:
            text = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
            self.log.print(f"step {step} epoch {int(state.epoch)}: {text}")


def train(state: TrainState, config: TrainConfig) -> TrainState:
    """Train ``state`` as ``config`` says and return the final state.

    Resumes from ``config.checkpoint_dir`` when it holds a checkpoint (``resume="auto"``),
    runs until ``steps``/``epochs`` or early stopping, evaluates and saves on the configured
    cadence, and always saves the final state. A SIGTERM/SIGINT/SIGUSR1 saves the state at
    the next micro-step (or evaluation batch) and raises :class:`Interrupted`
    (exit code ``128 + signum``).

    A sharded state (:func:`functrain.shard_state`, DTensor params and optimizer state)
    stays sharded: every rank saves its shards into one ``step-N.dcp`` directory per
    checkpoint, and resuming reads a checkpoint of either kind into the layout of the given
    ``state`` (another world size, or a plain state in one process); see ``docs/distributed.md``.
    """
    check_config(config)
    owned = dist.init_from_env(state.step.device)  # torchrun's environment, when no group exists yet
    together = False  # every rank ends here the same way: finished, or stopped by an agreed signal
    try:
        final = _train(state, _bind_data(config))
        together = True
        return final
    except Interrupted:
        together = True
        raise
    finally:
        dist.teardown(owned, together)


def _open_manager(config: TrainConfig) -> CheckpointManager | None:
    """The run's checkpoint manager; rank 0 opens it first (it clears stray temporary files), then the others."""
    if config.checkpoint_dir is None:
        return None
    main = is_main_process()
    if not main:
        dist.barrier()
    score = config.score
    manager = CheckpointManager(
        os.path.join(config.checkpoint_dir, CHECKPOINTS), keep_last=config.keep_last, keep_best=config.keep_best,
        best_metric="score" if score else None, mode=score[2] if score else "min",
        async_save=config.async_checkpoint,
    )
    if main:
        dist.barrier()
    dist.barrier()  # no rank saves before every rank has opened the folder
    return manager


def _train(state: TrainState, config: TrainConfig) -> TrainState:
    directory = config.checkpoint_dir
    manager = _open_manager(config)
    log = None
    try:
        state, how, origin = _start(state, config, manager)
        resumed = origin is not None
        sharded = is_sharded(state)
        if dist.is_distributed():  # a sharded state: its full values (shards differ by design)
            dist.check_replicated(tree_digest(unshard(state) if sharded else state))
        change = world_change_message(saved_world_size(origin), dist.world()[1]) if resumed else None
        if directory is not None:
            _check_semantics(directory, config, resuming=resumed)
        results = Results(directory if is_main_process() else None, config.score)
        results.truncate(int(state.step))
        unit_total = config.steps if config.steps is not None else config.epochs
        unit_now = int(state.step) if config.steps is not None else int(state.epoch)
        log = RunLog(directory, unit_total, initial=unit_now, progress=config.progress, tensorboard=config.tensorboard,
                     heartbeat=config.heartbeat, purge_step=int(state.step) if resumed else None,
                     unit="step" if config.steps is not None else "epoch")
        rank, size = dist.world()
        log.print(f"functrain: {how} at step {int(state.step)} (epoch {int(state.epoch)}, "
                  f"sample {int(state.data_index)})" + (f"; run folder {directory}" if directory else "")
                  + (f"; {size} ranks" if size > 1 else ""))
        if change is not None and rank == 0:
            warnings.warn(change, stacklevel=2)
        with StopFlag() as flag:
            run = _Run(config, manager, results, log, flag, sharded=sharded)
            latest = dist.broadcast_object(manager.latest_step() if manager is not None else None)
            if latest is not None and latest == int(state.micro_step):
                run.saved_micro = int(state.micro_step)
            state = _loop(state, run)
            log.beat(int(state.step), status="finished")
            if directory is not None:
                log.print(f"functrain: finished at step {int(state.step)}; checkpoints in "
                          f"{os.path.join(directory, CHECKPOINTS)}, results in {directory}/results.json"
                          + (f", TensorBoard logs in {directory}/tensorboard" if config.tensorboard else ""))
        return state
    finally:
        if manager is not None:
            manager.close()
        if log is not None:
            log.close()


def _loop(state: TrainState, run: _Run) -> TrainState:
    """Feed the loader to the step until done; per micro-step, no device value is read (see :class:`_Clock`)."""
    config = run.config
    loader = config.data
    world = getattr(loader, "world_size", 1)
    if PENDING_EVAL in state.eval_metrics:  # an evaluation that a signal cut short
        state, best = run.evaluate(state.replace(eval_metrics={}))
        run.save(state, best)
    run.early = run.stopped_early(state)
    if not run.done(state) and not run.early:
        clock = run.clock = _Clock(state)
        device = state.epoch.device
        epoch_tensor = state.epoch
        step_mode = config.steps is not None
        total = config.steps if step_mode else config.epochs
        log_every = config.log_every
        bar = run.log.bar
        first = True
        batches = loader.iterate(clock.epoch, int(state.data_index))
        for batch, epoch, index in batches:
            given = state
            state = config.step(state, batch)
            if first:  # a donated step marks its input as consumed (checked once: a step is what it is)
                run.donating, first = is_donated(given), False
            del given
            advanced = clock.tick(state)
            new_epoch = epoch > clock.epoch
            if epoch != clock.epoch:
                epoch_tensor = _device_int(epoch, device)
                clock.epoch = epoch
            state = _with_position(state, epoch_tensor, _device_int(index, device))
            run.samples += _batch_size(batch) * world
            step = clock.step
            if advanced and log_every and step % log_every == 0:
                run.log_train(state)
            if bar is not None and (advanced or new_epoch):
                run.log.advance(step if step_mode else epoch)
            best = None
            if run.eval_due(step, epoch, advanced, new_epoch):
                state, best = run.evaluate(state)
            if best is not None or run.checkpoint_due(step, epoch, advanced, new_epoch):
                run.save(state, best)
            run.check_signal(state)  # after the evaluation it may have needed (which checks it between batches)
            if (step if step_mode else epoch) >= total or run.early:
                break
        batches.close()
        clock.check(state)
    if run.early:
        run.log.print(f"functrain: early stop at step {int(state.step)}: {config.patience} evaluations without "
                      f"improvement; best step {int(state.tracker.best_step)}")
    run.save(state, sync=True)  # every rank returns once the final state is committed
    return state
