"""Batches for a rank from a plan: in-memory data sets are indexed directly; image folders are read by a
DataLoader with workers that follows the plan's order."""

from __future__ import annotations

from typing import Iterator

import torch

from .datasets import InMemoryImages
from .sampler import GlobalBatchPlan


def plan_batches(dataset, plan: GlobalBatchPlan, epoch: int, offset: int = 0, num_workers: int = 0,
                 pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images (B, C, S, S) float32 in [-1, 1], labels (B,)) for the rest of ``epoch``."""
    if isinstance(dataset, InMemoryImages):
        for idx, flips in plan.epoch_batches(epoch, offset):
            yield dataset.batch(idx, flips)
        return
    batches = [list(zip(idx.tolist(), flips.tolist())) for idx, flips in plan.epoch_batches(epoch, offset)]
    if not batches:
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
    )
    for x, y in loader:
        yield x, y.long()
