"""Checkpoints of sharded states with ``torch.distributed.checkpoint`` (DCP), resharding on load.

A state whose params and optimizer state are DTensors (:func:`functrain.shard_state`)
is saved by every rank at once: each rank writes its own shards, DCP writes the global
layout, and :func:`load_sharded` reads into a *target* state of any layout -- the same
world size, another one, or plain unsharded tensors in a single process -- so a run
saved on 2 ranks resumes on 1, 2 or 4.

A checkpoint is a directory: DCP's ``.metadata`` and ``*.distcp`` files plus
``functrain.msgpack`` (a functrain msgpack file: format name, world size, and every
tensor's path, dtype and global shape), which is written last. The directory is written
under a temporary name and renamed into place by rank 0 after every rank finished, so a
killed save leaves the previous checkpoint, never a half-written one.

DCP is torch's own format: it needs torch to read and has no promise across torch
versions. For a portable copy, :func:`functrain.unshard` the state and save it with
:func:`functrain.checkpoint.save` (one msgpack file).

Example (every rank runs the same lines)::

    ft.checkpoint.save_sharded("run/step-100", state)
    target = ft.shard_state(ft.TrainState.create(model, opt))   # any world size
    state = ft.checkpoint.load_sharded("run/step-100", target)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from typing import Any

import optree
import torch
import torch.distributed as dist

from functrain.checkpoint.errors import CheckpointError, TargetMismatchError
from functrain.checkpoint.files import fsync_dir, load, save
from functrain.checkpoint.format import DTYPES
from functrain.core.struct import NAMESPACE

__all__ = ["save_sharded", "load_sharded", "is_sharded_checkpoint", "SHARDED_FORMAT", "META_NAME"]

SHARDED_FORMAT = "functrain-dcp"
SHARDED_VERSION = 1
META_NAME = "functrain.msgpack"
_PARTIAL, _OLD = ".partial", ".old"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _on_rank0(what: str, work: Any) -> None:
    """Run ``work()`` on rank 0 and agree on its success: every rank returns, or every rank raises.

    A plain barrier would leave the other ranks waiting forever when rank 0 fails; here they
    raise a :class:`CheckpointError` naming ``what`` while rank 0 raises its own error.
    """
    error = None
    if _rank() == 0:
        try:
            work()
        except Exception as e:  # noqa: BLE001 -- re-raised below, after telling the other ranks
            error = e
    if _distributed():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        ok = torch.tensor([0 if error is not None else 1], dtype=torch.int64, device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if error is None and not int(ok.item()):
            raise CheckpointError(f"rank {_rank()}: rank 0 failed to {what}; see rank 0's error")
    if error is not None:
        raise error


@contextlib.contextmanager
def _dcp_call(what: str) -> Iterator[None]:
    """Around a DCP save or load: its ``CheckpointException`` (a ``BaseException``) as a :class:`CheckpointError`.

    DCP raises it on every rank when any rank failed; the message names ``what`` and each
    failed rank's error. Also silences DCP's warning that it runs in one process: without a
    process group, that is the intent.
    """
    from torch.distributed.checkpoint import CheckpointException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        try:
            yield
        except CheckpointException as e:
            failures = "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}"
                                 for rank, (exc, _) in sorted(e.failures.items()))
            raise CheckpointError(f"{what} failed: {failures}") from e


def _flatten(tree: Any) -> tuple[dict[str, Any], Any]:
    paths, leaves, spec = optree.tree_flatten_with_path(tree, namespace=NAMESPACE)
    flat: dict[str, Any] = {}
    for path, leaf in zip(paths, leaves):
        key = "/".join(str(p) for p in path) or "<root>"
        if key in flat:
            raise ValueError(f"two leaves of the state share the checkpoint key {key!r}; rename a dict key "
                             "that contains '/'")
        flat[key] = leaf
    return flat, spec


def _describe(x: Any) -> list[Any]:
    return [str(x.dtype).removeprefix("torch."), list(x.shape)]


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a directory written by :func:`save_sharded`."""
    return os.path.isfile(os.path.join(os.fspath(path), META_NAME))


def save_sharded(directory: str | os.PathLike[str], state: Any) -> str:
    """Save ``state`` (DTensors and plain tensors) to ``directory``; every rank must call it.

    Plain tensors are taken as replicated (written once); non-tensor leaves go into the
    metadata. Returns the directory path. An existing checkpoint at ``directory`` is
    replaced only once the new one is complete.
    """
    import torch.distributed.checkpoint as dcp

    final = os.path.abspath(os.fspath(directory))
    partial = final + _PARTIAL
    flat, _ = _flatten(state)
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in flat.items() if not isinstance(v, torch.Tensor)}
    meta = {
        "format": SHARDED_FORMAT,
        "version": SHARDED_VERSION,
        "world_size": dist.get_world_size() if _distributed() else 1,
        "tensors": {k: _describe(v) for k, v in tensors.items()},
        "scalars": scalars,
    }

    def prepare() -> None:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a killed save

    def commit() -> None:
        save(os.path.join(partial, META_NAME), meta)  # last: its presence marks a complete checkpoint
        fsync_dir(partial)
        if os.path.exists(final):
            shutil.rmtree(final + _OLD, ignore_errors=True)
            os.replace(final, final + _OLD)
        os.replace(partial, final)
        fsync_dir(os.path.dirname(final))
        shutil.rmtree(final + _OLD, ignore_errors=True)

    _on_rank0(f"prepare {partial}", prepare)
    with _dcp_call(f"torch.distributed.checkpoint's save to {partial}"):
        dcp.save(tensors, checkpoint_id=partial, no_dist=not _distributed())
    _on_rank0(f"commit the sharded checkpoint {final}", commit)
    return final


def _read_meta(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, META_NAME)
    if not os.path.isdir(directory):
        if os.path.isdir(directory + _OLD):  # killed between the two renames of a replacing save
            return _read_meta(directory + _OLD)
        raise CheckpointError(f"{directory}: no such sharded checkpoint directory")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{directory}: no {META_NAME} in it, so it is not a complete functrain sharded checkpoint "
            "(a save killed before it finished, or a directory written by another tool)"
        )
    meta = load(path)
    if not isinstance(meta, dict) or meta.get("format") != SHARDED_FORMAT:
        raise CheckpointError(f"{path}: not a functrain sharded checkpoint (format {meta.get('format')!r})"
                              if isinstance(meta, dict) else f"{path}: not a functrain sharded checkpoint")
    if meta.get("version") != SHARDED_VERSION:
        raise CheckpointError(f"{path}: sharded format version {meta.get('version')} is not supported by this "
                              f"functrain (it reads version {SHARDED_VERSION}); upgrade functrain")
    meta["_dir"] = directory
    return meta


def _global_shape(x: torch.Tensor) -> list[int]:
    return list(x.shape)  # a DTensor's shape is its global shape


def _with_saved_metrics(target: Any, saved: dict[str, Any]) -> Any:
    """A TrainState target with ``metrics``/``eval_metrics`` keyed as saved (their keys are not known in advance)."""
    if not all(hasattr(target, f) for f in ("metrics", "eval_metrics", "replace")):
        return target
    free = {}
    for field in ("metrics", "eval_metrics"):
        prefix = field + "/"
        free[field] = {k[len(prefix):]: torch.empty(shape, dtype=DTYPES[dtype])
                       for k, (dtype, shape) in saved.items() if k.startswith(prefix)}
    return target.replace(**free)


def load_sharded(directory: str | os.PathLike[str], target: Any) -> Any:
    """The checkpoint in ``directory`` restored into the structure and layout of ``target``.

    Every rank calls it with its own ``target`` (for instance
    ``shard_state(TrainState.create(model, opt))`` on the new world size, or a plain state
    in a single process). Paths, dtypes and global shapes must match; the error names every
    difference. ``metrics`` and ``eval_metrics`` of a TrainState are taken as saved. ``target``
    is not changed.
    """
    import torch.distributed.checkpoint as dcp

    meta = _read_meta(os.path.abspath(os.fspath(directory)))
    where = meta.pop("_dir")
    saved = meta["tensors"]
    flat, spec = _flatten(_with_saved_metrics(target, saved))
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(tensors) - set(saved))
    unexpected = sorted(set(saved) - set(tensors))
    if missing or unexpected:
        raise TargetMismatchError(
            f"{where}: the checkpoint and the target state differ in structure; "
            f"in the target only: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"in the checkpoint only: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. "
            "Build the target with the same model and optimizer as the saved run."
        )
    wrong = [f"{k}: checkpoint {saved[k][0]} {tuple(saved[k][1])}, target "
             f"{str(v.dtype).removeprefix('torch.')} {tuple(_global_shape(v))}"
             for k, v in tensors.items() if [str(v.dtype).removeprefix("torch."), _global_shape(v)] != saved[k]]
    if wrong:
        raise TargetMismatchError(f"{where}: dtypes or shapes differ: " + "; ".join(wrong[:8]))
    dest = {k: v.detach().clone() for k, v in tensors.items()}  # DCP loads in place: never into the target
    with _dcp_call(f"{where}: torch.distributed.checkpoint's load"):
        dcp.load(dest, checkpoint_id=where, no_dist=not _distributed())
    leaves = []
    for k, v in flat.items():
        if isinstance(v, torch.Tensor):
            leaves.append(dest[k])
        else:
            if k not in meta["scalars"]:
                raise TargetMismatchError(f"{where}: the target has a non-tensor leaf {k}={v!r} the checkpoint lacks")
            leaves.append(meta["scalars"][k])
    return optree.tree_unflatten(spec, leaves)
