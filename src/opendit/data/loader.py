"""Batches for a rank from a plan: in-memory data sets are indexed directly; image folders are read by a
DataLoader with workers that follows the plan's order."""

from __future__ import annotations

from typing import Iterator

import torch

from ..preemption import ignore_in_worker
from .datasets import InMemoryImages
from .sampler import GlobalBatchPlan


def plan_batches(dataset, plan: GlobalBatchPlan, epoch: int, offset: int = 0, num_workers: int = 0,
                 pin_memory: bool = False, features: bool = False
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], list | None]]:
    """Yield (images (B, C, S, S) float32 in [-1, 1], labels (B,), problems, features) for the rest of ``epoch``;
    ``problems`` lists the unreadable files met in this batch ("path: reason"; each was replaced by the next readable
    image, and a label of -1 marks a slot where none was found); ``features``: with ``features=True``, the encoder
    features stored with precomputed latents (a list, one (B, T, d) tensor per encoder), else None (not read)."""
    if isinstance(dataset, InMemoryImages) or hasattr(dataset, "batch"):  # in memory or memory-mapped latents
        for idx, flips in plan.epoch_batches(epoch, offset):
            yield (*dataset.batch(idx, flips), [], dataset.batch_features(idx, flips) if features else None)
        return
    batches = [list(zip(idx.tolist(), flips.tolist())) for idx, flips in plan.epoch_batches(epoch, offset)]
    if not batches:
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=ignore_in_worker if num_workers > 0 else None,
    )
    for x, y, problems in loader:
        yield x, y.long(), [line for p in problems if p for line in p.split("\n")], None
