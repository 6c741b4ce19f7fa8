"""Stop requests by signal: the handler only records the signal; the loop acts at a step boundary.

SIGTERM, SIGINT and SIGUSR1 set a flag. ``train`` checks it after every micro-step (also
between evaluation batches), saves the state and raises :class:`Interrupted`, a
``SystemExit`` with code ``128 + signum``. A second signal before that exits at once.
Previous handlers are restored when the block ends. Handlers can only be installed from the
main thread; elsewhere the block runs without them.

Example:
    >>> import os, signal
    >>> from functrain.shell.signals import StopFlag
    >>> with StopFlag() as flag:
    ...     os.kill(os.getpid(), signal.SIGUSR1)
    ...     flag.signum == signal.SIGUSR1
    True
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

__all__ = ["StopFlag", "Interrupted", "SIGNALS"]

SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, n))


class Interrupted(SystemExit):
    """Training stopped by a signal after saving; ``code`` is ``128 + signum``."""

    def __init__(self, signum: int, saved: str | None) -> None:
        super().__init__(128 + signum)
        self.signum, self.saved = signum, saved

    def __str__(self) -> str:
        where = f"saved to {self.saved}" if self.saved else "nothing saved (no checkpoint_dir)"
        return f"stopped by {signal.Signals(self.signum).name}; {where}"


class StopFlag:
    """A context manager that installs the flag-setting handlers and restores the old ones."""

    def __init__(self, signals: tuple[int, ...] = SIGNALS) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            os._exit(128 + signum)  # a second signal: leave now
        self.signum = signum

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def requested(self) -> int | None:
        """The signal number if any rank received a stop signal, else None.

        With a process group of several ranks this is a collective (an all-reduce MAX of one
        integer): every rank must call it at the same point (a step boundary, an evaluation
        batch), and every rank gets the same answer. Never called from the handler.
        """
        from functrain.shell.distributed import agree_flag

        return agree_flag(self.signum or 0) or None
