"""A folder of step checkpoints with retention, best tracking and background saving.

Files are ``step-00001200.msgpack`` (the step zero-padded to 8 digits, more when larger).
A checkpoint is *committed* once its file has its final name: :func:`~functrain.checkpoint.save`
renames it there only when complete, so the folder listing is the list of commits.
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
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import torch

from functrain.checkpoint.errors import CheckpointError, CheckpointSaveError, TargetMismatchError
from functrain.checkpoint.files import TEMP_MARK, fsync_dir, load, save
from functrain.checkpoint.tree import node_of

__all__ = ["CheckpointManager", "host_copy", "checkpoint_name"]

INDEX_NAME = "index.json"
_STEP_FILE = re.compile(r"^step-(\d{8,})\.msgpack$")
_TEMP_FILE = re.compile(r"^(step-\d{8,}\.msgpack|" + re.escape(INDEX_NAME) + ")" + re.escape(TEMP_MARK))


def checkpoint_name(step: int) -> str:
    """``1200`` -> ``"step-00001200.msgpack"``."""
    return f"step-{int(step):08d}.msgpack"


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
        async_save: copy the state to host memory in ``save`` and write it in a background
            thread; one save in flight (a second ``save`` waits for the first); errors of a
            background save are raised by the next call to ``save``, ``wait``, ``restore`` or ``close``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep_last: int = 3,
        keep_best: int = 1,
        best_metric: str | None = None,
        mode: Literal["min", "max"] = "min",
        async_save: bool = False,
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (got {keep_last}): a manager never deletes its last commit")
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {keep_best}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
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
        """The file path of ``step``'s checkpoint (whether or not it exists)."""
        return os.path.join(self.directory, checkpoint_name(step))

    def all_steps(self) -> list[int]:
        """The committed steps, ascending (files with their final name; temporary files are ignored)."""
        steps = []
        for name in os.listdir(self.directory):
            m = _STEP_FILE.match(name)
            if m:
                steps.append(int(m.group(1)))
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
    def save(self, state: Any, step: int | None = None, metrics: dict[str, Any] | None = None) -> int:
        """Save ``state`` as ``step`` (default: ``int(state.step)``) with ``metrics``; return the step.

        Synchronous: returns once the checkpoint is committed and old ones are retired.
        Async: returns once the state is copied to host memory.
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
        if self._executor is None:
            self._commit(state, step, clean)
        else:
            self._pending = self._executor.submit(self._commit, host_copy(state), step, clean)
        return step

    def _commit(self, tree: Any, step: int, metrics: dict[str, float]) -> None:
        digest = save(self.path_of(step), tree)
        with self._lock:
            self._meta[step] = {"digest": digest, "metrics": metrics}
            steps = self.all_steps()
            keep = set(steps[-self.keep_last:]) | {step}
            if self.keep_best:
                keep |= set(self._ranked_by_metric(steps)[: self.keep_best])
            doomed = [s for s in steps if s not in keep]
            for s in doomed:
                self._meta.pop(s, None)
            self._write_index()
            for s in doomed:
                try:
                    os.unlink(self.path_of(s))
                except FileNotFoundError:
                    pass

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
            return load(self.path_of(best), target, strict)
        if step is not None:
            path = self.path_of(int(step))
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"no checkpoint for step {step} in {self.directory}; committed: {self.all_steps()}"
                )
            return load(path, target, strict)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
        failures = []
        for s in reversed(steps):
            try:
                return load(self.path_of(s), target, strict)
            except TargetMismatchError:
                raise
            except CheckpointError as e:
                failures.append(str(e))
                warnings.warn(f"skipping an unreadable checkpoint, falling back to the previous one: {e}",
                              stacklevel=2)
        raise CheckpointError(f"every checkpoint in {self.directory} is unreadable:\n  " + "\n  ".join(failures))

    # ------------------------------------------------------------------ bookkeeping
    def _remove_stray_temp_files(self) -> None:
        for name in os.listdir(self.directory):
            if _TEMP_FILE.match(name):
                try:
                    os.unlink(os.path.join(self.directory, name))
                except OSError:
                    pass

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
