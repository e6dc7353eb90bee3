"""Which images each rank trains on, step by step: a seeded per-epoch permutation of the data set cut into global
batches; rank r takes the r-th slice of every global batch. Flips are drawn with the permutation.

The plan depends only on (seed, epoch, global batch): a run with N ranks of batch B sees exactly the batches of a
1-rank run of batch N*B, and a resumed run continues at the same sample offset in the same permutation.
"""

from __future__ import annotations

from typing import Iterator

import torch


class GlobalBatchPlan:
    def __init__(self, num_samples: int, global_batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, flip: bool = False):
        if global_batch % world_size:
            raise ValueError("the global batch must be divisible by the number of ranks")
        self.n, self.global_batch = num_samples, global_batch
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self.seed, self.shuffle, self.flip = seed, shuffle, flip

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch  # the incomplete last batch is dropped

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation, flip flags) of the whole data set for one epoch."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        flips = torch.rand(self.n, generator=g) < 0.5 if self.flip else torch.zeros(self.n, dtype=torch.bool)
        return perm, flips

    def epoch_batches(self, epoch: int, offset: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's (indices, flips) for each remaining step of ``epoch``, starting ``offset`` samples in."""
        perm, flips = self.order(epoch)
        lo = self.rank * self.local_batch
        start = offset
        while start + self.global_batch <= self.n:
            sl = slice(start + lo, start + lo + self.local_batch)
            yield perm[sl], flips[sl]
            start += self.global_batch
