"""Pickle-free msgpack checkpoints: format, atomic files, a manager with retention.

Example:
    >>> import torch
    >>> from functrain import checkpoint as ckpt
    >>> state = {"w": torch.ones(3), "step": 1}
    >>> ckpt.tree_digest(ckpt.from_bytes(ckpt.to_bytes(state), target=state)) == ckpt.tree_digest(state)
    True
"""

from functrain.checkpoint.errors import (
    CheckpointError,
    CheckpointSaveError,
    LoadReport,
    PartialLoadWarning,
    TargetMismatchError,
)
from functrain.checkpoint.files import load, read_header, read_tree_info, save, verify
from functrain.checkpoint.format import ArrayInfo, Header, decode_msgpack, from_bytes, to_bytes, tree_digest
from functrain.checkpoint.manager import CheckpointManager, host_copy
from functrain.checkpoint.sharded import is_sharded_checkpoint, load_sharded, save_sharded

__all__ = [
    "to_bytes", "from_bytes", "tree_digest", "save", "load", "read_header", "verify", "read_tree_info",
    "decode_msgpack", "CheckpointManager", "host_copy", "Header", "ArrayInfo", "CheckpointError",
    "TargetMismatchError", "CheckpointSaveError", "LoadReport", "PartialLoadWarning",
    "save_sharded", "load_sharded", "is_sharded_checkpoint",
]
