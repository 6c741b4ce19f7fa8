"""Explicit random keys, in the manner of ``jax.random``.

A key is an ``int64`` tensor of shape ``(2,)``: ``(seed, counter)``. Keys are values: they
live in the train state and are advanced by the step functions, never by hidden global
state. To draw random numbers, a step derives a 63-bit seed from its key (and the process
rank) with :func:`seed_of`, and runs its body under :func:`seeded`, which seeds torch's
generators and restores them afterwards, so the caller's global RNG is untouched.

Example:
    >>> import torch
    >>> from functrain.core import rng
    >>> key = rng.key(0)
    >>> with rng.seeded(key):
    ...     a = torch.rand(2)
    >>> with rng.seeded(key):
    ...     b = torch.rand(2)
    >>> bool(torch.equal(a, b))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["key", "next_key", "fold_in", "split", "seed_of", "seeded", "mix64"]

_MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """SplitMix64's finalizer: a bijective, well-mixing map on 64-bit integers."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


_GOLDEN = 0x9E3779B97F4A7C15
_KEY, _FOLD, _SEED = 1, 2, 3  # domain tags: the same integers never hash alike in two roles


def _combine(tag: int, *values: int) -> int:
    """A 64-bit hash of a tagged tuple of integers (SplitMix64 steps, chained)."""
    h = mix64(tag * _GOLDEN)
    for v in values:
        h = mix64(h ^ mix64((int(v) + _GOLDEN) & _MASK64))
    return h


def _to_signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


def key(seed: int) -> torch.Tensor:
    """A new key from an integer seed (any Python int; reduced modulo 2**64)."""
    return torch.tensor([_to_signed(_combine(_KEY, int(seed))), 0], dtype=torch.int64)


def next_key(k: torch.Tensor) -> torch.Tensor:
    """The key that follows ``k``; a pure tensor op, safe inside compiled code."""
    return k + torch.tensor([0, 1], dtype=k.dtype, device=k.device)


def fold_in(k: torch.Tensor, data: int) -> torch.Tensor:
    """A new key derived from ``k`` and an integer (a rank, a member index, ...)."""
    seed, counter = (int(v) for v in k.tolist())
    return torch.tensor([_to_signed(_combine(_FOLD, seed, counter, int(data))), 0], dtype=torch.int64)


def split(k: torch.Tensor, num: int = 2) -> list[torch.Tensor]:
    """``num`` independent keys derived from ``k``."""
    return [fold_in(k, i) for i in range(num)]


def seed_of(k: torch.Tensor, rank: int = 0) -> int:
    """The non-negative 63-bit seed that ``k`` (and the rank) stands for."""
    if k.shape != (2,) or k.dtype != torch.int64:
        raise TypeError(
            f"a functrain RNG key is an int64 tensor of shape (2,), got {k.dtype} {tuple(k.shape)}; "
            "make one with functrain.random.key(seed)"
        )
    seed, counter = (int(v) for v in k.tolist())
    return _combine(_SEED, seed, counter, int(rank)) >> 1


def _device_generator(dev: torch.device) -> torch.Generator | None:
    """The default generator of an accelerator device (``cuda:1``...; no index: the current one).

    None for a backend that does not expose ``default_generators`` (MPS, say).
    """
    mod = torch.get_device_module(dev.type)
    gens = getattr(mod, "default_generators", None)
    if gens is None:
        return None
    return gens[dev.index if dev.index is not None else mod.current_device()]


@contextlib.contextmanager
def seeded(k: torch.Tensor, rank: int = 0, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with torch's generators seeded from ``k``; restore them afterwards.

    The CPU generator is always seeded and restored; the generator of ``device`` is too
    when it is an accelerator (``"cuda"``, ``"cuda:1"``, ...). Other devices' generators
    are left alone. This is :func:`torch.random.fork_rng` plus :func:`torch.manual_seed`
    restricted to those generators: ``torch.manual_seed`` itself also visits every
    accelerator backend (CUDA, XPU, MTIA... each formats a stack trace when it is not
    initialized), which costs ~150 us per call, as much as a small train step's kernels.
    """
    s = seed_of(k, rank)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gens = [torch.default_generator]
    if dev.type not in ("cpu", "meta"):
        gen = _device_generator(dev)
        if gen is None:  # a backend without per-device generators: the general (slow) path
            mod = torch.get_device_module(dev.type)
            index = dev.index if dev.index is not None else mod.current_device()
            with torch.random.fork_rng(devices=[index], device_type=dev.type):
                torch.manual_seed(s)
                yield
            return
        gens.append(gen)
    saved = [g.get_state() for g in gens]
    try:
        for g in gens:
            g.manual_seed(s)
        yield
    finally:
        for g, state in zip(gens, saved):
            g.set_state(state)
