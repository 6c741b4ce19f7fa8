"""Evaluation records, best-result selection and early stopping.

The decisions (is this score the best so far? has patience run out?) are pure functions
of the :class:`~functrain.core.state.Tracker` that lives in the state, so a resumed run
decides exactly as an uninterrupted one. The records are written to the run folder as
``results.json`` (every evaluation), ``latest.json`` and ``best.json``.

Example:
    >>> from functrain.core.state import Tracker
    >>> from functrain.shell.results import update_tracker
    >>> t = update_tracker(Tracker.create(), 0.5, step=10, mode="min")
    >>> t = update_tracker(t, 0.7, step=20, mode="min")
    >>> float(t.best_score), int(t.best_step), int(t.bad_evals)
    (0.5, 10, 1)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from functrain.core.state import Tracker

__all__ = ["update_tracker", "is_improvement", "should_stop", "score_of", "Results"]


def is_improvement(score: float, best: float, mode: str) -> bool:
    """Whether ``score`` beats ``best`` (NaN best: any finite score does; a NaN score never does)."""
    if mode not in ("min", "max"):
        raise ValueError(f"score mode must be 'min' or 'max', got {mode!r}")
    if math.isnan(score):
        return False
    if math.isnan(best):
        return True
    return score < best if mode == "min" else score > best


def update_tracker(tracker: Tracker, score: float, step: int, mode: str) -> Tracker:
    """The tracker after an evaluation that scored ``score`` at ``step``."""
    if is_improvement(float(score), float(tracker.best_score), mode):
        like = tracker.best_score
        return tracker.replace(
            best_score=torch.tensor(float(score), dtype=like.dtype, device=like.device),
            best_step=torch.full_like(tracker.best_step, int(step)),
            bad_evals=torch.zeros_like(tracker.bad_evals),
        )
    return tracker.replace(bad_evals=tracker.bad_evals + 1)


def should_stop(tracker: Tracker, patience: int | None) -> bool:
    """Early stopping: ``patience`` evaluations in a row without improvement."""
    return patience is not None and int(tracker.bad_evals) >= patience


def score_of(record: Mapping[str, Any], score: tuple[str, str, str]) -> float:
    """The configured ``(split, metric, mode)`` score in an evaluation record, with a clear error."""
    split, metric, _ = score
    if split not in record or metric not in record[split]:
        have = {k: sorted(v) for k, v in record.items() if isinstance(v, Mapping)}
        raise KeyError(f"score={score!r}: the evaluation has no {split}/{metric}; it has {have}. "
                       "Fix TrainConfig.score or the metric_fn's names")
    return float(record[split][metric])


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Results:
    """The evaluation records of a run, mirrored to ``results.json``/``latest.json``/``best.json``.

    A record is ``{"step", "epoch", split: {metric: value}}``. On a resume, records after the
    restored step are dropped (they are recomputed identically).
    """

    def __init__(self, directory: str | None, score: tuple[str, str, str] | None) -> None:
        self.directory, self.score = directory, score
        self.records: list[dict[str, Any]] = []
        if directory is not None and os.path.exists(self._path("results.json")):
            with open(self._path("results.json")) as f:
                self.records = list(json.load(f)["records"])

    def _path(self, name: str) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, name)

    def truncate(self, step: int) -> None:
        """Forget the records after ``step`` (a resume continues from there)."""
        self.records = [r for r in self.records if r["step"] <= step]

    def has(self, step: int) -> bool:
        return any(r["step"] == step for r in self.records)

    def add(self, record: dict[str, Any], tracker: Tracker) -> None:
        self.records = [r for r in self.records if r["step"] != record["step"]] + [record]
        self.write(tracker)

    def best(self, tracker: Tracker) -> dict[str, Any] | None:
        step = int(tracker.best_step)
        return next((r for r in self.records if r["step"] == step), None)

    def write(self, tracker: Tracker) -> None:
        if self.directory is None:
            return
        best = self.best(tracker)
        _write_json(self._path("results.json"), {
            "score": list(self.score) if self.score else None,
            "best_step": int(tracker.best_step),
            "records": self.records,
        })
        if self.records:
            _write_json(self._path("latest.json"), self.records[-1])
        if best is not None:
            _write_json(self._path("best.json"), best)
