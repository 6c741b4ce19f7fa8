"""A folder of step checkpoints with retention, best tracking and background saving.

Files are ``step-00001200.msgpack`` (the step zero-padded to 8 digits, more when larger).
A checkpoint is *committed* once its file has its final name: :func:`~functrain.checkpoint.save`
renames it there only when complete, so the folder listing is the list of commits.

A sharded state (DTensor params and optimizer state, :func:`functrain.shard_state`) is
saved as a directory ``step-00001200.dcp`` by :func:`~functrain.checkpoint.save_sharded`
(torch.distributed.checkpoint; every rank writes its shards, so every rank calls
:meth:`CheckpointManager.save`), and restored into a target of any layout and world size
by :meth:`CheckpointManager.restore`. Such a directory is committed once it is renamed
from ``step-00001200.dcp.partial`` with its metadata in it; ``format=`` chooses the kind.
``index.json`` (written atomically) records each step's metrics and digest; it is
metadata, never needed to read a checkpoint.

Retention after each commit: keep the ``keep_last`` highest steps, the ``keep_best`` best
by ``best_metric`` (``mode="min"`` or ``"max"``; NaN is never best), and always the
checkpoint just committed; delete the rest. Nothing is deleted before a newer commit, so
at least one committed checkpoint always remains.

Example:
    >>> import tempfile, torch
    >>> from functrain.checkpoint.manager import CheckpointManager
    >>> state = {"w": torch.zeros(2)}
    >>> with CheckpointManager(tempfile.mkdtemp(), keep_last=2, best_metric="loss", mode="min") as mgr:
    ...     for step, loss in [(1, 0.5), (2, 0.2), (3, 0.4), (4, 0.3)]:
    ...         _ = mgr.save({"w": torch.full((2,), float(step))}, step=step, metrics={"loss": loss})
    ...     mgr.all_steps(), mgr.best_step(), mgr.restore(state)["w"].tolist()
    ([2, 3, 4], 2, [4.0, 4.0])
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import torch

from functrain.checkpoint.errors import CheckpointError, CheckpointSaveError, TargetMismatchError
from functrain.checkpoint.files import TEMP_MARK, fsync_dir, load, save
from functrain.checkpoint.sharded import is_sharded_checkpoint, load_sharded, save_sharded
from functrain.checkpoint.tree import node_of

__all__ = ["CheckpointManager", "CheckpointMutatedError", "Snapshot", "host_copy", "snapshot", "checkpoint_name"]

INDEX_NAME = "index.json"
FORMATS = ("auto", "msgpack", "dcp")
_STEP_FILE = re.compile(r"^step-(\d{8,})\.msgpack$")
_STEP_DIR = re.compile(r"^step-(\d{8,})\.dcp$")
_TEMP_FILE = re.compile(r"^(step-\d{8,}\.msgpack|" + re.escape(INDEX_NAME) + ")" + re.escape(TEMP_MARK))
_TEMP_DIR = re.compile(r"^(step-\d{8,}\.dcp)\.(partial|trash|old)$")  # a killed sharded save or deletion


def checkpoint_name(step: int, kind: Literal["msgpack", "dcp"] = "msgpack") -> str:
    """``1200`` -> ``"step-00001200.msgpack"`` (``kind="dcp"``: the directory ``"step-00001200.dcp"``)."""
    if kind not in ("msgpack", "dcp"):
        raise ValueError(f"kind must be 'msgpack' or 'dcp', got {kind!r}")
    return f"step-{int(step):08d}.{kind}"


def _primary() -> bool:
    """Whether this process is rank 0 of the default process group (or there is no group)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _remove_tree(path: str) -> None:
    """Delete a checkpoint directory: renamed out of the listing first (atomic), then removed."""
    trash = path + ".trash"
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def host_copy(tree: Any) -> Any:
    """A plain copy of ``tree`` whose tensors are fresh contiguous CPU copies (same digest as ``tree``)."""

    def copy(x: Any, path: tuple[Any, ...]) -> Any:
        kind, content = node_of(x, path)
        if kind == "tensor":
            return content.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        if kind == "seq":
            return [copy(v, path + (i,)) for i, v in enumerate(content)]
        if kind == "map":
            return {k: copy(v, path + (k,)) for k, v in content}
        return content

    return copy(tree, ())


class CheckpointMutatedError(RuntimeError):
    """A tensor was changed in place while a background save (``copy=False``) was reading it; nothing was committed."""


class Snapshot:
    """What a background save writes: ``tree`` as plain containers, and how to check it is still valid.

    Built on the caller's thread by :func:`snapshot`. Tensors are either the caller's own
    (no copy; their version counters are recorded to detect in-place changes) or host copies
    (a device tensor's copy may still be in flight: :meth:`ready` waits for it).
    """

    def __init__(self, tree: Any, shared: list[tuple[str, torch.Tensor, int]], events: list[Any]) -> None:
        self.tree, self.shared, self.events = tree, shared, events

    @property
    def copied(self) -> bool:
        """True when no tensor of the caller's is shared with the writer."""
        return not self.shared

    def ready(self) -> None:
        """Wait for the device-to-host copies enqueued by :func:`snapshot` (background thread)."""
        for event in self.events:
            event.synchronize()

    def check_unchanged(self) -> None:
        """Raise :class:`CheckpointMutatedError` if a shared tensor was changed in place since the snapshot."""
        changed = [name for name, t, version in self.shared if t._version != version]
        if changed:
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise CheckpointMutatedError(
                f"{shown} changed in place while the background save was writing them, so the file would mix "
                "old and new values; nothing was committed. Save with copy=True when the state's tensors are "
                "modified after save() returns (a donated step, an in-place update), or call wait() before "
                "modifying them."
            )


def _copy_to_host(t: torch.Tensor, events: dict[str, Any]) -> torch.Tensor:
    """A contiguous CPU copy of ``t``; from CUDA, an asynchronous copy into pinned memory (see ``events``)."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.to(memory_format=torch.contiguous_format, copy=True)
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        if t.device.index not in events:
            events[t.device.index] = None  # recorded after the last copy from this device
        return host
    return t.to("cpu", memory_format=torch.contiguous_format)


def snapshot(tree: Any, copy: bool | None = None) -> Snapshot:
    """``tree`` as plain containers for a background writer, copying as little as is safe.

    ``copy=True``: every tensor is copied to host memory (device tensors asynchronously into
    pinned memory; the writer waits for them). ``copy=False``: no tensor is copied; a
    device tensor is read by the writer thread. ``copy=None`` (auto): device tensors are
    copied, CPU tensors are not. Shared tensors must not be changed in place until the save
    is committed; version counters detect (best effort) a change, see :class:`Snapshot`.
    """
    shared: list[tuple[str, torch.Tensor, int]] = []
    pending: dict[Any, Any] = {}

    def walk(x: Any, path: tuple[Any, ...]) -> Any:
        kind, content = node_of(x, path)
        if kind == "tensor":
            if copy or (copy is None and content.device.type != "cpu"):
                return _copy_to_host(content, pending)
            shared.append(("/".join(map(str, path)) or "<root>", content, content._version))
            return content
        if kind == "seq":
            return [walk(v, path + (i,)) for i, v in enumerate(content)]
        if kind == "map":
            return {k: walk(v, path + (k,)) for k, v in content}
        return content

    plain = walk(tree, ())
    events = []
    for index in pending:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(index))
        events.append(event)
    return Snapshot(plain, shared, events)


def _write_json_atomic(path: str, data: Any) -> None:
    tmp = f"{path}{TEMP_MARK}{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, sort_keys=True, indent=1, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CheckpointSaveError(e.errno, f"could not write the checkpoint index {path}: {e.strerror or e}") from e
    fsync_dir(os.path.dirname(path))


class CheckpointManager:
    """Saves, retains and restores the checkpoints of one run in ``directory``.

    Args:
        directory: the folder (created if missing). Stray temporary files left there by a
            killed save are removed on construction.
        keep_last: how many of the highest steps to keep (at least 1).
        keep_best: how many of the best checkpoints by ``best_metric`` to keep as well.
        best_metric: the key in ``metrics`` that ranks checkpoints, or None.
        mode: ``"min"`` (lower is better) or ``"max"``; explicit, whatever the metric's name.
        async_save: write in a background thread; ``save`` returns at once, after copying to
            host memory only what must be (device tensors; everything with ``copy=True``; see
            :meth:`save` for the contract on CPU tensors). One save in flight (a second ``save``
            waits for the first); errors of a background save are raised by the next call to
            ``save``, ``wait``, ``restore`` or ``close``. A sharded (``"dcp"``) save is always
            synchronous: it is a collective of every rank, which cannot run on a background thread
            next to the training collectives.
        format: the kind of checkpoint :meth:`save` writes. ``"auto"`` (default): a directory
            ``step-N.dcp`` (:func:`~functrain.checkpoint.save_sharded`) for a state holding
            DTensors (:func:`functrain.is_sharded`), one ``step-N.msgpack`` file otherwise.
            ``"dcp"``: always the directory (a plain state is saved as replicated tensors;
            useful to write checkpoints that a sharded run resumes from). ``"msgpack"``: always one
            file (a sharded state is refused: unshard it first). Listing and restoring read both
            kinds whatever ``format`` is.

    Sharded checkpoints and several ranks: ``save`` of a ``"dcp"`` checkpoint and ``restore``
    of one are collectives, so every rank calls them, with the folder on a filesystem all ranks
    share; rank 0 alone writes ``index.json``, deletes retired checkpoints and, on construction,
    clears directories left by a killed save. A msgpack save writes and retires from whichever
    process calls it (``train`` calls it on rank 0 only).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep_last: int = 3,
        keep_best: int = 1,
        best_metric: str | None = None,
        mode: Literal["min", "max"] = "min",
        async_save: bool = False,
        format: Literal["auto", "msgpack", "dcp"] = "auto",
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (got {keep_last}): a manager never deletes its last commit")
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {keep_best}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.format = format
        self.directory = os.fspath(directory)
        self.keep_last, self.keep_best = keep_last, keep_best
        self.best_metric, self.mode = best_metric, mode
        self.async_save = async_save
        os.makedirs(self.directory, exist_ok=True)
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="functrain-ckpt") if async_save else None
        self._pending: Future[None] | None = None
        self._closed = False
        self._remove_stray_temp_files()
        self._meta: dict[int, dict[str, Any]] = self._read_index()

    # ------------------------------------------------------------------ listing
    def path_of(self, step: int) -> str:
        """The path of ``step``'s checkpoint: its ``.dcp`` directory when that is committed, else its ``.msgpack`` file.

        The file path is returned whether or not it exists.
        """
        directory = self._dir_of(step)
        return directory if is_sharded_checkpoint(directory) else self._file_of(step)

    def kind_of(self, step: int) -> Literal["msgpack", "dcp"] | None:
        """``"dcp"`` (a committed sharded directory), ``"msgpack"`` (a committed file) or None for ``step``."""
        if is_sharded_checkpoint(self._dir_of(step)):
            return "dcp"
        return "msgpack" if os.path.isfile(self._file_of(step)) else None

    def _file_of(self, step: int) -> str:
        return os.path.join(self.directory, checkpoint_name(step))

    def _dir_of(self, step: int) -> str:
        return os.path.join(self.directory, checkpoint_name(step, "dcp"))

    def all_steps(self) -> list[int]:
        """The committed steps, ascending: files with their final name and complete ``.dcp`` directories.

        Temporary files and the ``.partial`` directories of unfinished sharded saves are ignored.
        """
        steps = set()
        for name in os.listdir(self.directory):
            m = _STEP_FILE.match(name)
            if m:
                steps.add(int(m.group(1)))
                continue
            m = _STEP_DIR.match(name)
            if m and is_sharded_checkpoint(os.path.join(self.directory, name)):
                steps.add(int(m.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The highest committed step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def metrics_of(self, step: int) -> dict[str, float]:
        """The metrics recorded with ``step`` (empty if none were)."""
        with self._lock:
            return dict(self._meta.get(step, {}).get("metrics", {}))

    def best_step(self) -> int | None:
        """The committed step with the best ``best_metric`` (by ``mode``), or None."""
        ranked = self._ranked_by_metric(self.all_steps())
        return ranked[0] if ranked else None

    def _ranked_by_metric(self, steps: list[int]) -> list[int]:
        if self.best_metric is None:
            return []
        scored = []
        for s in steps:
            value = self._meta.get(s, {}).get("metrics", {}).get(self.best_metric)
            if isinstance(value, (int, float)) and not math.isnan(value):
                scored.append((value if self.mode == "min" else -value, s))
        return [s for _, s in sorted(scored)]  # ties: the earlier step first

    # ------------------------------------------------------------------ saving
    def save(self, state: Any, step: int | None = None, metrics: dict[str, Any] | None = None, *,
             copy: bool | None = None) -> int:
        """Save ``state`` as ``step`` (default: ``int(state.step)``) with ``metrics``; return the step.

        Synchronous: returns once the checkpoint is committed and old ones are retired
        (``copy`` is ignored). Async: returns once the background write is submitted; what it
        copies first is ``copy``'s choice:

        - ``copy=None`` (default): device tensors are copied to host memory (asynchronously,
          into pinned memory on CUDA); CPU tensors are not copied: the writer reads the
          caller's tensors. The contract: do not change them in place until the save is
          committed (the next ``save``, ``wait`` or ``close`` returns). A pure
          :class:`~functrain.TrainState` is never changed by functrain (steps return new
          tensors), so a training loop keeps this contract; an in-place change is detected
          (best effort, by tensor version counters) and fails the save with
          :class:`CheckpointMutatedError` instead of committing a mixed file.
        - ``copy=True``: every tensor is copied before ``save`` returns: the state may be
          changed right afterwards (a donated step, ``.add_()``); ``train()`` does this when
          its step donates.
        - ``copy=False``: nothing is copied, device tensors included (they are read by the
          writer thread, and stay alive until the save is committed).

        A sharded checkpoint (see ``format``) is a collective: every rank calls ``save`` with
        its own shards, and it returns on every rank once the directory is committed (and, on
        rank 0, old checkpoints are retired); it is synchronous even when ``async_save`` is set.
        """
        self._check_open()
        self._drain()
        if step is None:
            if not hasattr(state, "step"):
                raise ValueError("pass step=...: the state has no 'step' field to take it from")
            step = int(state.step)
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        clean = {str(k): float(v) for k, v in (metrics or {}).items()}
        if self._sharded_format(state):
            save_sharded(self._dir_of(step), state)
            self._record(step, {"metrics": clean, "kind": "dcp"}, writer=_primary())
            if os.path.exists(self._file_of(step)) and _primary():
                os.unlink(self._file_of(step))  # the directory now holds this step: no stale file beside it
        elif self._executor is None:
            self._commit(state, step, clean)
        else:
            self._pending = self._executor.submit(self._commit_snapshot, snapshot(state, copy), step, clean)
        return step

    def _commit_snapshot(self, snap: Snapshot, step: int, metrics: dict[str, float]) -> None:
        snap.ready()
        self._commit(snap.tree, step, metrics, None if snap.copied else snap.check_unchanged)

    def _sharded_format(self, state: Any) -> bool:
        """Whether ``save`` writes ``state`` as a sharded directory (by ``format``; see the class docs)."""
        from functrain.core.sharding import is_sharded

        sharded = is_sharded(state)
        if self.format == "msgpack" and sharded:
            raise ValueError(
                f"the CheckpointManager of {self.directory} has format='msgpack' but the state holds DTensors "
                "(a sharded state); use format='auto' or 'dcp' (a sharded directory), or save "
                "functrain.unshard(state) (called on every rank) from rank 0"
            )
        return self.format == "dcp" or sharded

    def _commit(self, tree: Any, step: int, metrics: dict[str, float],
                check: Callable[[], None] | None = None) -> None:
        path = self._file_of(step)
        digest = save(path, tree) if check is None else save(path, tree, check)
        self._record(step, {"digest": digest, "metrics": metrics}, writer=True)
        if os.path.isdir(self._dir_of(step)):
            _remove_tree(self._dir_of(step))  # the file now holds this step: no stale directory beside it

    def _record(self, step: int, meta: dict[str, Any], writer: bool) -> None:
        """Note ``step``'s commit; the ``writer`` also writes the index and deletes what retention retires."""
        with self._lock:
            self._meta[step] = meta
            steps = sorted(set(self.all_steps()) | {step})
            keep = set(steps[-self.keep_last:]) | {step}
            if self.keep_best:
                keep |= set(self._ranked_by_metric(steps)[: self.keep_best])
            doomed = [s for s in steps if s not in keep]
            for s in doomed:
                self._meta.pop(s, None)
            if not writer:
                return
            self._write_index()
            for s in doomed:
                try:
                    os.unlink(self._file_of(s))
                except FileNotFoundError:
                    pass
                _remove_tree(self._dir_of(s))

    def _drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises the background save's error here

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise its error if it failed."""
        self._drain()

    def close(self) -> None:
        """Wait for the save in flight and stop the background thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._drain()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the CheckpointManager of {self.directory} is closed")

    # ------------------------------------------------------------------ restoring
    def restore(self, target: Any = None, step: int | Literal["best"] | None = None, strict: bool = True) -> Any:
        """Load a checkpoint into ``target`` (or as plain containers when None).

        ``step=None``: the latest committed checkpoint; if it is unreadable (corrupt,
        truncated), warn and fall back to the previous committed one. ``step=N``: that step.
        ``step="best"``: the best by ``best_metric``. A file that does not match ``target``
        raises :class:`TargetMismatchError` (no fallback: the target is wrong, not the file).

        A sharded (``.dcp``) checkpoint is read into ``target``'s layout (sharded over any
        number of ranks, or plain: see :func:`~functrain.checkpoint.load_sharded`); it needs a
        ``target`` (always strict) and, under a process group, every rank calls ``restore``
        and sees the same steps.
        """
        if not self._closed:
            self._drain()
        if step == "best":
            best = self.best_step()
            if best is None:
                raise FileNotFoundError(
                    f"no checkpoint in {self.directory} has the metric {self.best_metric!r} (best_metric); "
                    "pass metrics= to save, or restore the latest with step=None"
                )
            return self._load(best, target, strict)
        if step is not None:
            if self.kind_of(int(step)) is None:
                raise FileNotFoundError(
                    f"no checkpoint for step {step} in {self.directory}; committed: {self.all_steps()}"
                )
            return self._load(int(step), target, strict)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
        failures = []
        for s in reversed(steps):
            try:
                return self._load(s, target, strict)
            except TargetMismatchError:
                raise
            except CheckpointError as e:
                failures.append(str(e))
                warnings.warn(f"skipping an unreadable checkpoint, falling back to the previous one: {e}",
                              stacklevel=2)
        raise CheckpointError(f"every checkpoint in {self.directory} is unreadable:\n  " + "\n  ".join(failures))

    def _load(self, step: int, target: Any, strict: bool) -> Any:
        """``step``'s checkpoint, of either kind, into ``target``."""
        if self.kind_of(step) != "dcp":
            return load(self._file_of(step), target, strict)
        if target is None:
            raise ValueError(
                f"{self._dir_of(step)} is a sharded checkpoint: it is read into a target state's layout; pass "
                "target= (the state to restore into: sharded, or plain for one process)"
            )
        return load_sharded(self._dir_of(step), target)

    # ------------------------------------------------------------------ bookkeeping
    def _remove_stray_temp_files(self) -> None:
        """Remove what killed saves left: temporary files and (rank 0 only) sharded directories.

        ``step-N.dcp.old`` is the previous checkpoint of a step whose replacing save was killed
        between its two renames: it is put back when ``step-N.dcp`` is missing, never lost.
        """
        primary = _primary()
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if _TEMP_FILE.match(name):
                try:
                    os.unlink(path)
                except OSError:
                    pass
                continue
            m = _TEMP_DIR.match(name)
            if not m or not primary or not os.path.isdir(path):
                continue
            final = os.path.join(self.directory, m.group(1))
            if m.group(2) == "old" and not os.path.exists(final) and is_sharded_checkpoint(path):
                os.replace(path, final)
            else:
                shutil.rmtree(path, ignore_errors=True)

    def _read_index(self) -> dict[int, dict[str, Any]]:
        path = os.path.join(self.directory, INDEX_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
            return {int(k): dict(v) for k, v in raw.get("checkpoints", {}).items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError, OSError) as e:
            warnings.warn(f"{path}: unreadable checkpoint index ({e}); metrics of earlier checkpoints are forgotten",
                          stacklevel=3)
            return {}

    def _write_index(self) -> None:
        existing = set(self.all_steps())
        data = {
            "format": 1,
            "best_metric": self.best_metric,
            "mode": self.mode,
            "checkpoints": {str(s): m for s, m in sorted(self._meta.items()) if s in existing},
        }
        _write_json_atomic(os.path.join(self.directory, INDEX_NAME), data)
