"""A distributed, resumable sampler: epoch e's order depends on (seed, e) only.

Like `DistributedSampler` with `set_epoch`, but it can start mid-epoch (for exact resume) and it
yields `(epoch, index)` keys so `Samples` can seed each sample's augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from milan.errors import DataError

__all__ = ["EpochSampler"]


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffled indices split over ranks; drops the tail so every rank gets the same count.

    Args:
        size: dataset length.
        rank, world_size: this process and how many there are.
        seed: shuffling seed shared by all ranks.
        batch_size: per-rank batch; the per-rank count is a multiple of it × `accum_steps` (drop_last).
        accum_steps: micro-batches per optimizer step (the count covers whole steps).
        shuffle: False keeps dataset order (evaluation).
    """

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 batch_size: int = 1, accum_steps: int = 1, shuffle: bool = True) -> None:
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.shuffle = shuffle
        step = batch_size * accum_steps
        self.per_rank = (size // world_size) // step * step
        if self.per_rank == 0:
            # the factors as the config states them, not their product (batch_size=512 when the config said 128)
            accum = f" × accum_steps={accum_steps}" if accum_steps > 1 else ""
            raise DataError(
                f"dataset of {size} images is too small for batch_size={batch_size}{accum} × {world_size} "
                f"process(es) = {step * world_size} images per step; lower the batch size or add data"
            )
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0, batch_size: int = 1) -> None:
        """Select the epoch, optionally skipping its first `start_batch` batches (resume)."""
        self.epoch, self.start = epoch, start_batch * batch_size

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        return order[self.rank: self.per_rank * self.world_size: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self.indices()[self.start:]])

    def __len__(self) -> int:
        return self.per_rank - self.start
