"""Labelled image data: datasets, the global batch plan, and the batch iterator."""

from .datasets import ImageFolder, InMemoryImages, build_dataset, default_image_size, load_cifar10, load_digits_dataset
from .loader import plan_batches
from .sampler import GlobalBatchPlan

__all__ = [
    "GlobalBatchPlan",
    "ImageFolder",
    "InMemoryImages",
    "build_dataset",
    "default_image_size",
    "load_cifar10",
    "load_digits_dataset",
    "plan_batches",
]
