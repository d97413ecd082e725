"""How a :class:`~samkit.train.Trainer` draws its batches: a loader cuts an epoch of the
training split into the steps' batches.

* :class:`Minibatch` (the default): batches of ``batch_size`` in an order that depends only on
  ``(seed, epoch)``, so a resumed run takes the very same batches; a batch as large as the
  split is the whole split in order (full batch). With ``stream=True`` the order is one seeded
  stream of permutations instead (each epoch the next permutation of ``Generator(seed)``,
  ``drop_last``): the order of ``samkit eos``'s minibatch runs.
* :class:`FullBatch`: every step on the whole training split.

Both yield ``(x, y, idx)`` (``idx``: the examples' positions, when asked for, else None).
Augmentation (random crops and flips of image batches) is seeded by ``(seed, step)``
(:func:`augment`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

_SHUFFLE, _AUGMENT = 1, 2


def derive_seed(seed: int, stream: int, index: int) -> int:
    """A distinct, reproducible 63-bit seed for each (seed, stream, index)."""
    x = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + index) % (1 << 64)
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) % (1 << 64)
    return x % (1 << 63)


Batch = tuple[Any, Tensor, Tensor | None]


class Minibatch:
    """Batches of ``batch_size`` (``None``: set by the trainer from its config), shuffled per
    epoch from ``(seed, epoch)`` (or one seeded stream: ``stream``); the last short batch is
    dropped with ``drop_last``."""

    def __init__(self, batch_size: int | None = None, drop_last: bool = False,
                 seed: int | None = None, stream: bool = False) -> None:
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(
                batch_size, int) or batch_size < 1):
            raise ValueError(f"Invalid batch_size: {batch_size!r} (allowed: an integer >= 1)")
        self.batch_size, self.drop_last, self.seed, self.stream = (
            batch_size, drop_last, seed, stream)

    def full_batch(self, n: int) -> bool:
        return self.batch_size >= n

    def batches(self, split: Any, epoch: int, generator: torch.Generator,
                indices: bool = False) -> Iterator[Batch]:
        """The batches of ``epoch`` (``generator``: a CPU generator the loader may seed)."""
        from samkit.data import iterate_batches

        n = len(split.y)
        if self.full_batch(n):  # one batch, in order: no shuffle
            batches = iterate_batches(split, self.batch_size, False, None,
                                      drop_last=self.drop_last, indices=indices)
        elif self.stream:
            return self._stream(split, epoch, indices)
        else:
            generator.manual_seed(derive_seed(self.seed, _SHUFFLE, epoch))
            batches = iterate_batches(split, self.batch_size, True, generator,
                                      drop_last=self.drop_last, indices=indices)
        return (batch if indices else (*batch, None) for batch in batches)

    def _stream(self, split: Any, epoch: int, indices: bool) -> Iterator[Batch]:
        n, size = len(split.y), self.batch_size
        order = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch + 1):  # the epoch's permutation: the (epoch + 1)-th of the stream
            perm = torch.randperm(n, generator=order)
        perm = perm.to(split.y.device)
        for start in range(0, n - size + 1, size):
            idx = perm[start: start + size]
            yield split.x[idx], split.y[idx], idx if indices else None

    def __repr__(self) -> str:
        return (f"Minibatch(batch_size={self.batch_size}, drop_last={self.drop_last}"
                + (", stream=True" if self.stream else "") + ")")


class FullBatch(Minibatch):
    """Every step on the whole training split, in order (gradient descent)."""

    def full_batch(self, n: int) -> bool:
        return True

    def batches(self, split, epoch, generator, indices=False):
        idx = torch.arange(len(split.y), device=split.y.device) if indices else None
        return iter([(split.x, split.y, idx)])

    def __repr__(self) -> str:
        return "FullBatch()"


def augment(x: Tensor, seed: int, step: int, generator: torch.Generator) -> Tensor:
    """Random crops and flips of the image batch ``x``, seeded by ``(seed, step)``."""
    from samkit.data import augment_batch

    generator.manual_seed(derive_seed(seed, _AUGMENT, step))
    return augment_batch(x, generator)


def for_step(batch: Batch, step: int, seed: int, augmented: bool, generator: torch.Generator,
             rank: int = 0, world_size: int = 1) -> Batch:
    """The batch step ``step`` trains on: augmented on the device (seeded by ``(seed, step)``)
    when ``augmented``, then under DDP this rank's slice of it (the same on every rank)."""
    x, y, idx = batch
    if augmented:
        x = augment(x, seed, step, generator)
    if world_size > 1:
        from samkit.distributed import shard_batch

        if idx is not None:  # the same slice as shard_batch's
            idx = idx.tensor_split(world_size)[rank]
        x, y = shard_batch(x, y, rank, world_size)
    return x, y, idx
