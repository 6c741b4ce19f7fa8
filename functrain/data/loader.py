"""A data loader whose position is two integers that live in the train state.

The batch at position ``(epoch, index)`` is a pure function of ``(dataset, seed, epoch,
index, rank, world_size)``: each epoch has its own permutation of the dataset, drawn from a
:class:`torch.Generator` seeded with ``(seed, epoch)``; ``index`` counts the samples that
all ranks together consumed in that epoch; each global batch of
``batch_size * world_size`` samples is cut into one contiguous slice per rank. A resumed run
therefore continues exactly where the saved state stopped, with no replay, even on another
number of ranks. Reading goes through an ordinary :class:`torch.utils.data.DataLoader`, so
``num_workers``, ``pin_memory`` and ``collate_fn`` behave as usual.

Example:
    >>> import torch
    >>> from functrain.data import Loader
    >>> data = torch.utils.data.TensorDataset(torch.arange(10.0))
    >>> loader = Loader(data, batch_size=4, seed=0)
    >>> loader.steps_per_epoch
    2
    >>> batches = loader.iterate(epoch=0, index=4)   # resume after the first batch
    >>> (x,), epoch, index = next(batches)
    >>> x.shape, epoch, index
    (torch.Size([4]), 1, 0)
    >>> bool(torch.equal(x, next(loader.iterate(0, 0))[0][0])) # the second batch, not the first
    False
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from functrain.core.rng import mix64

__all__ = ["Loader"]


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for one epoch of one loader seed."""
    return mix64(mix64(int(seed)) ^ mix64(int(epoch) + 0x9E3779B97F4A7C15)) >> 1


class _Positions:
    """The batch sampler: lists of dataset indices from a start position, across epochs."""

    def __init__(self, loader: Loader, epoch: int, index: int, stop_epoch: int | None) -> None:
        self.loader, self.epoch, self.index, self.stop_epoch = loader, epoch, index, stop_epoch

    def __iter__(self) -> Iterator[list[int]]:
        for indices, _, _ in self.loader._walk(self.epoch, self.index, self.stop_epoch):
            yield indices


class Loader:
    """Batches of a map-style dataset at a position ``(epoch, index)`` that can be saved.

    Args:
        dataset: a map-style dataset (``__getitem__`` and ``__len__``).
        batch_size: samples per batch on each rank.
        shuffle: a new permutation each epoch (else dataset order).
        seed: the data seed; epoch ``e`` uses a generator seeded with ``(seed, e)``.
        drop_last: drop the last, incomplete global batch of each epoch. With
            ``drop_last=False`` the last batch is smaller; across several ranks it is
            padded by wrapping around to the start of the epoch's permutation so every
            rank gets the same number of samples.
        collate_fn: passed to the DataLoader (default: torch's ``default_collate``).
        num_workers, pin_memory: passed to the DataLoader.
        rank, world_size: this process's shard; default to ``torch.distributed`` when it
            is initialized, else ``0`` and ``1``.

    Randomness inside ``dataset[i]`` (augmentation) is only reproducible across resumes
    when it is derived from ``i`` (and the epoch), not from a worker's generator.
    """

    def __init__(
        self,
        dataset: Dataset | Sequence[Any],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        map_style = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
        if isinstance(dataset, IterableDataset) or not map_style:
            raise TypeError(
                f"functrain.data.Loader needs a map-style dataset (with __getitem__ and __len__) so that it can seek "
                f"to a saved position; got {type(dataset).__name__}. Materialize the stream into a list or a "
                "TensorDataset, or write a map-style Dataset that reads sample i from disk."
            )
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        rank = (dist.get_rank() if initialized else 0) if rank is None else int(rank)
        world_size = (dist.get_world_size() if initialized else 1) if world_size is None else int(world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.collate_fn = collate_fn
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.rank = rank
        self.world_size = world_size
        self._cached: dict[int, torch.Tensor] = {}
        if self.drop_last and self.num_samples < self.global_batch_size:
            raise ValueError(
                f"the dataset has {self.num_samples} samples, fewer than one global batch of "
                f"{self.global_batch_size} (batch_size={self.batch_size} x world_size={self.world_size}); "
                "lower batch_size or pass drop_last=False"
            )

    # ----------------------------------------------------------------- sizes
    @property
    def num_samples(self) -> int:
        """Samples in the dataset."""
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def global_batch_size(self) -> int:
        """Samples consumed by all ranks together per batch: ``batch_size * world_size``."""
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (the same on every rank)."""
        n, g = self.num_samples, self.global_batch_size
        return n // g if self.drop_last else math.ceil(n / g)

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def epoch_samples(self) -> int:
        """The global sample count at which an epoch ends."""
        return self.steps_per_epoch * self.global_batch_size if self.drop_last else self.num_samples

    def fingerprint(self) -> dict[str, Any]:
        """What changes the batches a run sees (for config hashing); world size may change."""
        return {
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "drop_last": self.drop_last,
        }

    # ------------------------------------------------------------ positions
    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of the dataset in ``epoch`` (int64 indices), the same on every rank."""
        if epoch in self._cached:
            return self._cached[epoch]
        if self.shuffle:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            perm = torch.randperm(self.num_samples, generator=g)
        else:
            perm = torch.arange(self.num_samples)
        if len(self._cached) >= 2:  # the sampler may run ahead of the consumer by one epoch
            self._cached.pop(min(self._cached))
        self._cached[epoch] = perm
        return perm

    def normalize(self, epoch: int, index: int) -> tuple[int, int]:
        """The position as stored, moved to the next epoch when ``index`` is past its end."""
        epoch, index = int(epoch), int(index)
        if index < 0 or epoch < 0:
            raise ValueError(f"a data position is non-negative, got epoch={epoch}, index={index}")
        return (epoch + 1, 0) if index >= self.epoch_samples else (epoch, index)

    def indices_at(self, epoch: int, index: int) -> tuple[list[int], int, int]:
        """This rank's dataset indices of the batch at a position, and the next position."""
        epoch, index = self.normalize(epoch, index)
        perm = self.permutation(epoch)
        g, b = self.global_batch_size, self.batch_size
        end = index + g
        if end <= self.num_samples:
            chunk = perm[index:end]
        else:  # the last, incomplete batch (drop_last=False)
            rest = perm[index:]
            b = math.ceil(rest.numel() / self.world_size)
            pad = b * self.world_size - rest.numel()
            chunk = torch.cat([rest, perm[:pad]])
            end = self.num_samples
        indices = chunk[self.rank * b : (self.rank + 1) * b].tolist()
        next_epoch, next_index = self.normalize(epoch, min(end, self.num_samples))
        return indices, next_epoch, next_index

    def _walk(self, epoch: int, index: int, stop_epoch: int | None) -> Iterator[tuple[list[int], int, int]]:
        epoch, index = self.normalize(epoch, index)
        while stop_epoch is None or epoch < stop_epoch:
            indices, epoch, index = self.indices_at(epoch, index)
            yield indices, epoch, index

    # -------------------------------------------------------------- reading
    def iterate(self, epoch: int = 0, index: int = 0, stop_epoch: int | None = None) -> Iterator[tuple[Any, int, int]]:
        """Batches from position ``(epoch, index)`` on, each with the position after it.

        Yields ``(batch, next_epoch, next_index)``; crosses epoch boundaries (the last
        batch of epoch ``e`` comes with ``(e + 1, 0)``) and runs until ``stop_epoch``
        (forever when None). Store the yielded position in the state once the batch is
        consumed; passing it back to ``iterate`` continues with the next batch.
        """
        epoch, index = self.normalize(epoch, index)
        sampler = _Positions(self, epoch, index, stop_epoch)
        loader = DataLoader(
            self.dataset,  # type: ignore[arg-type]
            batch_sampler=sampler,  # type: ignore[arg-type]
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Worker seeds come from this generator, not from torch's global one.
            generator=torch.Generator().manual_seed(_epoch_seed(self.seed ^ 0x5EED, epoch * 2**32 + index)),
        )
        positions = self._walk(epoch, index, stop_epoch)
        for batch, (_, next_epoch, next_index) in zip(loader, positions):
            yield batch, next_epoch, next_index

    def epoch(self, epoch: int = 0) -> Iterator[Any]:
        """The batches of one epoch, in order."""
        for batch, _, _ in self.iterate(epoch, 0, stop_epoch=epoch + 1):
            yield batch

    def shard(self) -> Iterator[Any]:
        """This rank's contiguous share of the dataset, in dataset order, in batches of ``batch_size``.

        The shares of all ranks partition the dataset -- no sample padded, repeated or
        dropped (the last batch may be smaller, a share may be empty) -- which is what an
        exact distributed evaluation needs: each rank sums its metrics, then the sums are
        added across ranks (:func:`functrain.evaluate` does this).
        """
        n, w = self.num_samples, self.world_size
        start, end = self.rank * n // w, (self.rank + 1) * n // w
        order = list(range(start, end))
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        yield from DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate_fn,  # type: ignore[arg-type]
                              num_workers=self.num_workers, pin_memory=self.pin_memory)

    def __iter__(self) -> Iterator[Any]:
        """The batches of epoch 0 (what evaluation and prediction read)."""
        return self.epoch(0)

    def __repr__(self) -> str:
        return (
            f"Loader({type(self.dataset).__name__} of {self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, num_workers={self.num_workers}, "
            f"rank={self.rank}, world_size={self.world_size})"
        )
