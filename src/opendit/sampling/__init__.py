"""Sampling: a model from any checkpoint (load), the samplers with guidance (generate), grids (grid) and sample
folders for evaluation (folder)."""

from ..objectives import SAMPLERS
from .generate import generate
from .load import Loaded, load_for_sampling

__all__ = ["SAMPLERS", "Loaded", "generate", "load_for_sampling"]
