"""Atomic, streamed checkpoint files: :func:`save`, :func:`load`, :func:`read_header`, :func:`verify`.

:func:`save` writes to a temporary file in the destination folder (``NAME.tmp-PID-RANDOM``),
streams the body array by array while hashing it, writes the header last, flushes,
fsyncs, renames the file over ``NAME`` and fsyncs the folder. A process killed at any
moment leaves either the old complete file or the new complete one under ``NAME``, and at
worst a stray temporary file (which :class:`~functrain.checkpoint.CheckpointManager` removes).

Example:
    >>> import os, tempfile, torch
    >>> from functrain.checkpoint.files import save, load
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.msgpack")
    >>> state = {"w": torch.ones(2, 2), "step": 3}
    >>> digest = save(path, state)
    >>> load(path, target=state)["step"]
    3
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import Any

from functrain.checkpoint.errors import CheckpointError, CheckpointSaveError
from functrain.checkpoint.format import (
    HEADER_SIZE,
    Decoder,
    HashingWriter,
    Header,
    decode_file_body,
    encode,
    finish_restore,
    pack_header,
    parse_header,
)

__all__ = ["save", "load", "read_header", "verify", "read_tree_info", "TEMP_MARK", "fsync_dir"]

TEMP_MARK = ".tmp-"
"""Temporary files are named ``<final name>.tmp-<pid>-<random hex>``."""


def fsync_dir(directory: str) -> None:
    """fsync a folder so a rename inside it survives a power cut (a no-op where folders can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path: str | os.PathLike[str], tree: Any, before_commit: Callable[[], None] | None = None) -> str:
    """Write ``tree`` to ``path`` atomically and durably; return its digest (hex sha256 of the body).

    Peak extra memory is about one array (the host copy of a device or strided tensor).
    An ``OSError`` while writing (disk full, permission) raises :class:`CheckpointSaveError`
    and leaves any previous file at ``path`` untouched. ``before_commit`` (if given) is called
    once the temporary file is complete and fsynced, just before the rename; if it raises,
    nothing is committed (the temporary file is removed) and its error propagates.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(bytes(HEADER_SIZE))  # zeros, not a valid header, until the body is complete
            sink = HashingWriter(f.write)
            encode(tree, sink.write)
            f.seek(0)
            f.write(pack_header(sink.size, sink.sha256.digest()))
            f.flush()
            os.fsync(f.fileno())
        if before_commit is not None:
            before_commit()
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, CheckpointSaveError):
            raise CheckpointSaveError(
                e.errno,
                f"could not save the checkpoint {path}: {e.strerror or e}. Nothing was replaced: the previous "
                "file at this path (if any) is intact. Free disk space or fix the folder's permissions.",
            ) from e
        raise
    fsync_dir(directory)
    return sink.sha256.hexdigest()


def _open(path: str) -> Any:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint file at {path}") from None


def _header_of(f: Any, path: str) -> Header:
    header = parse_header(f.read(HEADER_SIZE), path)
    size = os.fstat(f.fileno()).st_size
    if size != HEADER_SIZE + header.body_size:
        what = "truncated" if size < HEADER_SIZE + header.body_size else "followed by extra bytes"
        raise CheckpointError(
            f"{path}: the file is {what}: {size} bytes, its header says {HEADER_SIZE + header.body_size}; "
            "it was not written completely (use another checkpoint)"
        )
    return header


def read_header(path: str | os.PathLike[str]) -> Header:
    """The header of the checkpoint at ``path`` (validated, and the file size checked); body not read."""
    path = os.fspath(path)
    with _open(path) as f:
        return _header_of(f, path)


def load(path: str | os.PathLike[str], target: Any = None, strict: bool = True) -> Any:
    """The tree saved at ``path``; see :func:`functrain.checkpoint.from_bytes` for ``target`` and ``strict``.

    Never unpickles or runs code; a corrupt, truncated or foreign file raises
    :class:`CheckpointError` naming the file. The checksum is verified before returning.
    """
    path = os.fspath(path)
    with _open(path) as f:
        plain = decode_file_body(f, _header_of(f, path), path)
    return finish_restore(plain, target, strict, path)


def read_tree_info(path: str | os.PathLike[str], verify_checksum: bool = False,
                   keep_small: int = 0) -> tuple[Header, Any]:
    """The header and the tree with arrays as :class:`ArrayInfo` (no array data kept).

    Arrays of at most ``keep_small`` bytes are loaded as tensors (to show counters).
    """
    path = os.fspath(path)
    with _open(path) as f:
        header = _header_of(f, path)
        if verify_checksum:
            return header, decode_file_body(f, header, path, arrays="info", keep_small=keep_small)
        return header, Decoder(f, header.body_size, path, arrays="info", hash=False, keep_small=keep_small).body()


def verify(path: str | os.PathLike[str]) -> Header:
    """Check that ``path`` is a complete, uncorrupted, decodable checkpoint; return its header.

    Reads every byte (to check the sha256) but keeps no array in memory.
    """
    header, _ = read_tree_info(path, verify_checksum=True)
    return header
