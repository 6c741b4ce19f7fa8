"""The shell's side of data parallelism: the process group, sharded loaders and agreement between ranks.

``train`` calls these; they are small functions over ``torch.distributed`` usable on their own.
Without a process group of more than one rank every agreement is the identity, so the same
script runs alone (``python train.py``) and under ``torchrun``.

- :func:`init_from_env` starts the default process group from torchrun's environment
  (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ``LOCAL_RANK``) when there is
  none; gloo on CPU, NCCL when the state lives on CUDA. It returns whether it made the group,
  so the caller tears down only what it made (:func:`teardown`).
- :func:`shard_loader` rebinds a :class:`functrain.data.Loader` built before the group
  existed to this rank's shard.
- :func:`agree_flag`, :func:`agree_ok`, :func:`broadcast_object` and :func:`check_replicated`
  are the small collectives at step boundaries (never inside a signal handler).

Example:
    >>> from functrain.shell.distributed import agree_flag, world
    >>> world(), agree_flag(0), agree_flag(15)
    ((0, 1), 0, 15)
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["world", "is_distributed", "torchrun_env", "backend_for", "init_from_env", "teardown", "shard_loader",
           "agree_flag", "agree_ok", "broadcast_object", "check_replicated", "barrier"]

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether a default process group of more than one rank exists."""
    return world()[1] > 1


def torchrun_env(environ: Any = None) -> dict[str, int] | None:
    """``{"rank", "world_size", "local_rank"}`` from torchrun's variables, or None when they are absent."""
    env = os.environ if environ is None else environ
    if not all(v in env for v in TORCHRUN_VARS):
        return None
    try:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise ValueError(f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK must be integers: {e}; launch with torchrun") from e
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={size}); check the launcher's environment")
    return {"rank": rank, "world_size": size, "local_rank": local}


def backend_for(device: torch.device) -> str:
    """The process-group backend for a state on ``device``: NCCL on CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: torch.device, environ: Any = None) -> bool:
    """Start the default process group from torchrun's environment; return True when this call made it.

    Does nothing (False) when a group already exists (the user's is used as it is), when
    torchrun's variables are absent, or when ``WORLD_SIZE`` is 1.
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    env = torchrun_env(environ)
    if env is None or env["world_size"] == 1:
        return False
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(env["local_rank"])
    dist.init_process_group(backend, rank=env["rank"], world_size=env["world_size"])
    return True


def teardown(owned: bool, together: bool = False) -> None:
    """Destroy the default process group if ``owned`` (made by :func:`init_from_env`).

    ``together``: every rank is known to be tearing down (a finished or an agreed-interrupted
    run), so they meet at a barrier first. Without it, a rank that closed its connections
    while another was still finishing the last collective made gloo abort that rank at exit
    ("terminate called without an active exception", about 1 run in 15 of the 2-rank tests).
    After an error on one rank there is no barrier: the others must fail, not wait.
    """
    if owned and dist.is_available() and dist.is_initialized():
        try:
            if together:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def shard_loader(loader: Any, rank: int, world_size: int) -> Any:
    """``loader`` reading shard ``rank`` of ``world_size`` (a copy; the same loader when it already does).

    Objects without ``rank``/``world_size`` (not a functrain Loader) are returned as they are.
    """
    if not (hasattr(loader, "rank") and hasattr(loader, "world_size")):
        return loader
    if (loader.rank, loader.world_size) == (rank, world_size):
        return loader
    new = copy.copy(loader)
    new.rank, new.world_size, new._cached = rank, world_size, {}
    if new.drop_last and new.num_samples < new.global_batch_size:
        raise ValueError(
            f"the dataset has {new.num_samples} samples, fewer than one global batch of {new.global_batch_size} "
            f"(batch_size={new.batch_size} x {world_size} ranks); lower batch_size or pass drop_last=False"
        )
    return new


def _device() -> torch.device:
    """The device collectives of the default group use (CUDA for NCCL)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_flag(value: int) -> int:
    """The largest ``value`` over all ranks (a small all-reduce MAX); ``value`` alone without a group."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def agree_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (all-reduce MIN): a barrier that also carries failure."""
    if not is_distributed():
        return bool(ok)
    t = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if is_distributed():
        agree_ok(True)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable, small: a step number, an evaluation record)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]


def check_replicated(digest: str) -> None:
    """Raise on every rank when the ranks' state digests differ (the state must start replicated)."""
    if not is_distributed():
        return
    key = int(digest[:15], 16)
    lo, hi = agree_flag(-key), agree_flag(key)
    if -lo != hi:
        raise RuntimeError(
            f"rank {world()[0]}: the initial state differs across ranks (tree_digest {digest[:12]}...); data "
            "parallel training needs the same state on every rank: build the model and TrainState the same way "
            "on each rank (same seed, torch.manual_seed before building the model), or load them from one file"
        )
