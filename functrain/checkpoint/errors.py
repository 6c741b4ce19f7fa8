"""The errors and warnings of :mod:`functrain.checkpoint`.

Every failure to read a file is a :class:`CheckpointError` (a ``ValueError``) whose
message names the file and the reason; restoring into a target whose structure, shapes or
dtypes differ from the file raises :class:`TargetMismatchError` naming every differing path.

Example:
    >>> from functrain.checkpoint.errors import CheckpointError, TargetMismatchError
    >>> issubclass(TargetMismatchError, CheckpointError) and issubclass(CheckpointError, ValueError)
    True
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["CheckpointError", "TargetMismatchError", "CheckpointSaveError", "LoadReport", "PartialLoadWarning"]


class CheckpointError(ValueError):
    """A checkpoint could not be read: corrupt, truncated, foreign or unsupported."""


class TargetMismatchError(CheckpointError):
    """The file's tree differs from the target's in structure, keys, shapes or dtypes."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (disk full, permission...); the previous file is untouched."""


class LoadReport(NamedTuple):
    """What a non-strict load skipped, as lists of tree paths (``"params/w"``).

    missing: paths of the target not found in the file (the target's value was kept).
    unexpected: paths in the file that the target has no place for (ignored).
    mismatched: ``"path: reason"`` for leaves whose shape, dtype or type differ (target kept).
    """

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        lines = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("mismatched", self.mismatched)):
            if items:
                shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
                lines.append(f"{title} ({len(items)}): {shown}")
        return "; ".join(lines) if lines else "nothing skipped"


class PartialLoadWarning(UserWarning):
    """Issued by a non-strict load that skipped something; ``.report`` is the :class:`LoadReport`."""

    def __init__(self, message: str, report: LoadReport):
        super().__init__(message)
        self.report = report
