"""What a run shows and leaves behind: console lines, a progress bar, TensorBoard scalars,
a heartbeat file, and the run folder's ``config.json`` (with library and torch versions).

Only rank 0 prints, writes events and files. The progress bar appears only on a TTY.

Example:
    >>> from functrain.shell.runlog import RunLog
    >>> log = RunLog(directory=None, total=10, progress=False, tensorboard=False)
    >>> log.scalars("train", {"loss": 0.5}, step=1)
    >>> log.close()
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["RunLog", "versions", "is_main_process"]


def is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def versions() -> dict[str, str]:
    """The versions that produced a run (recorded in its folder)."""
    try:
        from importlib.metadata import version

        functrain_version = version("functrain")
    except Exception:  # not installed (running from a checkout)
        functrain_version = "unknown"
    return {"functrain": functrain_version, "torch": torch.__version__, "python": platform.python_version()}


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


class RunLog:
    """Console, progress bar, TensorBoard and heartbeat for one ``train`` call.

    ``purge_step`` (the restored step) drops events a killed run wrote past its checkpoint.
    """

    def __init__(
        self,
        directory: str | None,
        total: int,
        *,
        initial: int = 0,
        progress: bool = True,
        tensorboard: bool = True,
        heartbeat: bool = False,
        purge_step: int | None = None,
        unit: str = "step",
    ) -> None:
        self.main = is_main_process()
        self.directory = directory
        self.writer = None
        self.bar = None
        self.heartbeat_path = os.path.join(directory, "heartbeat.json") if (heartbeat and directory) else None
        if not self.main:
            return
        if tensorboard and directory is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(directory, "tensorboard"), purge_step=purge_step)
        if progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True)

    def print(self, *parts: Any) -> None:
        """Print on rank 0 (through the progress bar when there is one)."""
        if not self.main:
            return
        text = " ".join(str(p) for p in parts)
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        """TensorBoard scalars ``prefix/name`` at ``step``."""
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", float(value), step)

    def advance(self, to: int, postfix: Mapping[str, float] | None = None) -> None:
        """Move the progress bar to ``to`` (steps or epochs), optionally with new postfix values."""
        if self.bar is not None:
            self.bar.update(max(0, to - self.bar.n))
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def postfix(self, values: Mapping[str, float]) -> None:
        """Show ``values`` after the progress bar (shown at its next refresh)."""
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def beat(self, step: int, status: str = "running", **extra: Any) -> None:
        """Rewrite ``heartbeat.json``: the step, the time and the process."""
        if self.main and self.heartbeat_path is not None:
            _write_json(self.heartbeat_path, {"step": step, "time": time.time(), "pid": os.getpid(),
                                              "status": status, **extra})

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
